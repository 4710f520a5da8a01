"""The model's implementation paths (attention.attention_impl): 'reference' (plain einsum attention, plain norms and
projections, autodiff), 'xla_cpu' (gqa_uptrain.xla_cpu) and 'dot_product_attention' (jax.nn.dot_product_attention)
compute the same function. Each path is held to the reference: outputs and gradients w.r.t. parameters and inputs,
MHA / GQA / MQA, masks (with fully-masked rows), relative bias, causal decoding with a cache, cross-attention and
dropout (same keep mask). float32: rtol 1e-5 with an absolute floor of 1e-6 of the tensor's largest entry (1e-5
for whole-model gradients, which sum rounding over every layer); bfloat16 tolerances at the test.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gqa_uptrain import attention, xla_cpu
from gqa_uptrain.attention import (Attention, attention_impl, grouped_dot_product_attention,
                                   reference_attention)
from gqa_uptrain.model import Transformer, init_params

FAST = ["xla_cpu", "dot_product_attention"]
KV_HEADS = {"mha": 4, "gqa": 2, "mqa": 1}  # of 4 query heads


def _close(got, want, rtol=1e-5, atol_scale=1e-6):
    """Elementwise rtol, plus an absolute floor scaled to the tensor's largest entry (for entries near 0)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol_scale * max(np.abs(want).max(), 1e-30))


def _trees_close(got, want, **kw):
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        try:
            _close(g, w, **kw)
        except AssertionError as e:
            raise AssertionError(f"{jax.tree_util.keystr(path)}: {e}") from None


# --- choosing the path -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dropout,expected", [
    ("cpu", False, "xla_cpu"), ("cpu", True, "xla_cpu"),
    ("gpu", False, "dot_product_attention"), ("gpu", True, "reference"),
    ("tpu", False, "dot_product_attention"), ("tpu", True, "reference"),
])
def test_auto_picks_by_backend(monkeypatch, caplog, backend, dropout, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(attention, "_logged_choices", set())
    with caplog.at_level(logging.INFO):
        assert attention_impl("auto", dropout=dropout) == expected
        assert attention_impl("auto", dropout=dropout) == expected
    logged = [r.getMessage() for r in caplog.records if "attention implementation" in r.getMessage()]
    assert logged == [f"attention implementation: {expected} (asked auto, backend {backend}, attention dropout "
                      f"{'on' if dropout else 'off'})"]  # once, however often it is asked


def test_explicit_choice_is_kept_and_checked():
    assert attention_impl("reference", backend="cpu") == "reference"
    assert attention_impl("dot_product_attention", backend="cpu") == "dot_product_attention"
    with pytest.raises(ValueError, match="has no attention dropout"):
        attention_impl("dot_product_attention", dropout=True, backend="gpu")
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'; valid: auto, reference"):
        attention_impl("flash")


def test_auto_resolves_at_trace_time_in_the_model(monkeypatch, tiny_config, rng):
    """The model asks attention_impl with its layers' dropout state: on a (pretend) GPU the deterministic pass
    takes dot_product_attention and the dropout pass the reference."""
    asked = []
    real = attention.attention_impl

    def spy(requested="auto", *, dropout=False, backend=None):
        chosen = real(requested, dropout=dropout, backend="gpu")
        asked.append((dropout, chosen))
        return chosen
    monkeypatch.setattr(attention, "attention_impl", spy)
    cfg = tiny_config.replace(dropout_rate=0.1)
    params = init_params(cfg, rng)
    enc, dec_in, dec_tgt = _batch(cfg.vocab_size)
    Transformer(cfg).apply({"params": params}, enc, dec_in, dec_tgt)
    assert {c for d, c in asked} == {"dot_product_attention"}
    asked.clear()
    Transformer(cfg).apply({"params": params}, enc, dec_in, dec_tgt, enable_dropout=True,
                           rngs={"dropout": jax.random.PRNGKey(3)})
    assert {c for d, c in asked if d} == {"reference"}
    with pytest.raises(ValueError, match="unknown attention implementation"):
        Transformer(cfg, impl="fast").apply({"params": params}, enc, dec_in, dec_tgt)


# --- the attention function ----------------------------------------------------------------------------------------

def _qkv_bias_mask(kv_heads, *, bias_batch=1, mask_heads=1, dtype=np.float32, b=3, lq=5, lk=6, h=4, d=8):
    rs = np.random.RandomState(kv_heads)
    q = rs.randn(b, lq, h, d).astype(dtype)
    k, v = (rs.randn(b, lk, kv_heads, d).astype(dtype) for _ in range(2))
    bias = None if bias_batch is None else rs.randn(bias_batch, h, lq, lk).astype(np.float32)
    mask = None
    if mask_heads is not None:
        m = rs.rand(b, mask_heads, lq, lk) > 0.3
        m[..., 0] = True
        m[0, :, 1] = False  # a query with nothing to attend to (a padding query)
        mask = jnp.asarray(m)
    ct = rs.randn(b, lq, h, d).astype(np.float32)  # nonzero on the fully-masked row too
    return (jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None if bias is None else jnp.asarray(bias), mask,
            jnp.asarray(ct))


def _attention_value_and_grads(impl, q, k, v, bias, mask, ct, **dropout):
    def f(q, k, v, bias):
        out = grouped_dot_product_attention(q, k, v, bias, mask, impl=impl, **dropout)
        return jnp.sum(out.astype(jnp.float32) * ct), out
    argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))(q, k, v, bias)
    return out, grads


@pytest.mark.parametrize("kind", list(KV_HEADS))
@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("bias_batch,mask_heads", [(1, 1), (3, 4), (None, 1), (1, None)])
def test_attention_paths_equal_reference(kind, impl, bias_batch, mask_heads):
    """Values and gradients w.r.t. q, k, v and the bias; a bias shared by the batch (its gradient is a batch sum)
    or one per example; a mask shared by the heads or one per head."""
    args = _qkv_bias_mask(KV_HEADS[kind], bias_batch=bias_batch, mask_heads=mask_heads)
    out, grads = _attention_value_and_grads(impl, *args)
    ref_out, ref_grads = _attention_value_and_grads("reference", *args)
    _close(out, ref_out)
    _trees_close(grads, ref_grads)


def test_reference_is_per_head_attention_over_repeated_kv():
    """The reference itself, against a loop over heads in numpy with K/V repeated per group (contiguous groups)."""
    q, k, v, bias, mask, _ = _qkv_bias_mask(2)
    got = np.asarray(reference_attention(q, k, v, bias, mask))
    q, k, v, bias, mask = (np.asarray(x) for x in (q, k, v, bias, mask))
    k, v = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)
    for bi in range(q.shape[0]):
        for hi in range(q.shape[2]):
            logits = np.where(mask[bi, 0], q[bi, :, hi] @ k[bi, :, hi].T + bias[0, hi], -1e10)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            np.testing.assert_allclose(got[bi, :, hi], (w / w.sum(-1, keepdims=True)) @ v[bi, :, hi], atol=1e-5)


@pytest.mark.parametrize("kind", list(KV_HEADS))
def test_dropout_paths_equal_reference(kind):
    """Attention dropout on xla_cpu and the reference draw the same keep mask from the same rng: same values and
    gradients (dot_product_attention has no dropout: attention_impl refuses it)."""
    args = _qkv_bias_mask(KV_HEADS[kind])
    dropout = dict(dropout_rate=0.3, dropout_rng=jax.random.PRNGKey(7), deterministic=False)
    out, grads = _attention_value_and_grads("xla_cpu", *args, **dropout)
    ref_out, ref_grads = _attention_value_and_grads("reference", *args, **dropout)
    _close(out, ref_out)
    _trees_close(grads, ref_grads)
    no_dropout, _ = _attention_value_and_grads("reference", *args)
    assert np.abs(np.asarray(ref_out - no_dropout)).max() > 1e-2  # the mask did something


@pytest.mark.parametrize("impl", FAST)
def test_attention_paths_bf16(impl):
    """bfloat16 q/k/v (logits and softmax in float32 on every path, rounding points differ: xla_cpu normalises
    after the weighted sum, the others before): within 2e-2 of the tensor's largest entry, values and gradients."""
    args = _qkv_bias_mask(2, dtype=jnp.bfloat16)
    out, grads = _attention_value_and_grads(impl, *args)
    ref_out, ref_grads = _attention_value_and_grads("reference", *args)
    assert out.dtype == jnp.bfloat16
    _close(out, ref_out, rtol=0, atol_scale=2e-2)
    _trees_close(grads, ref_grads, rtol=0, atol_scale=2e-2)


def test_fast_path_reductions_match_autodiff():
    r = np.random.RandomState(3)
    x = jnp.asarray(r.randn(4, 2, 3, 5, 6).astype(np.float32))
    _close(xla_cpu.sum_leading_axes(x, 2), x.sum((0, 1)))
    scale = jnp.asarray(r.randn(6).astype(np.float32))

    def grads(f):
        return jax.grad(lambda x, s: jnp.sum(jnp.sin(f(x, s))), argnums=(0, 1))(x, scale)
    _trees_close(grads(xla_cpu.scale_features), grads(lambda x, s: x * s))
    kernel = jnp.asarray(r.randn(6, 7).astype(np.float32))
    _close(xla_cpu.flat_matmul(x, kernel), x @ kernel)


# --- the attention layer: parameters, inputs, cache ------------------------------------------------------------------

def _layer(impl, kv_heads, cross=False):
    return Attention(num_heads=4, num_kv_heads=kv_heads, head_dim=8, out_features=16, is_cross_attention=cross,
                     impl=impl)


@pytest.mark.parametrize("kind", list(KV_HEADS))
@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("cross", [False, True])
def test_attention_layer_gradients_wrt_params_and_inputs(kind, impl, cross):
    rs = np.random.RandomState(0)
    xq = jnp.asarray(rs.randn(2, 5, 16).astype(np.float32))
    xkv = jnp.asarray(rs.randn(2, 7, 16).astype(np.float32)) if cross else xq
    lk = xkv.shape[1]
    mask = jnp.asarray(rs.rand(2, 1, 5, lk) > 0.2).at[..., 0].set(True)
    bias = None if cross else jnp.asarray(rs.randn(1, 4, 5, lk).astype(np.float32))
    params = _layer("reference", KV_HEADS[kind], cross).init(jax.random.PRNGKey(0), xq, xkv)["params"]

    def run(impl):
        def loss(params, xq, xkv):
            y = _layer(impl, KV_HEADS[kind], cross).apply({"params": params}, xq, xkv, bias=bias, mask=mask)
            return jnp.sum(jnp.tanh(y)), y
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, xq, xkv)
    (_, y), grads = run(impl)
    (_, ref_y), ref_grads = run("reference")
    _close(y, ref_y)
    _trees_close(grads, ref_grads)


# --- the model ---------------------------------------------------------------------------------------------------------

def _batch(vocab, seed=0):
    r = np.random.RandomState(seed)
    enc = r.randint(2, vocab, size=(2, 7))
    enc[0, 5:] = 0
    tgt = r.randint(2, vocab, size=(2, 5))
    tgt[1, 4:] = 0
    dec_in = np.concatenate([np.zeros((2, 1), int), tgt[:, :-1]], axis=1)
    return jnp.asarray(enc), jnp.asarray(dec_in), jnp.asarray(tgt)


def _model_value_and_grads(cfg, impl, params, batch, dropout_rng=None):
    enc, dec_in, tgt = batch
    model = Transformer(cfg, impl=impl)

    def loss(params):
        logits = model.apply({"params": params}, enc, dec_in, tgt, enable_dropout=dropout_rng is not None,
                             rngs=None if dropout_rng is None else {"dropout": dropout_rng})
        return -jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(tgt, cfg.vocab_size) * (tgt > 0)[..., None]), logits
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


def _kv_config(cfg, kind):
    g = KV_HEADS[kind]
    return cfg.replace(encoder_kv_heads=g, decoder_self_kv_heads=g, decoder_cross_kv_heads=g)


@pytest.mark.parametrize("kind", list(KV_HEADS))
@pytest.mark.parametrize("impl", FAST)
def test_model_paths_equal_reference(tiny_config, rng, kind, impl):
    """Whole model (encoder padding, causal decoder, cross-attention, shared relative biases, norms, MLP, logits):
    logits and every parameter's gradient."""
    cfg = _kv_config(tiny_config, kind)
    params = init_params(cfg, rng)
    batch = _batch(cfg.vocab_size)
    logits, grads = _model_value_and_grads(cfg, impl, params, batch)
    ref_logits, ref_grads = _model_value_and_grads(cfg, "reference", params, batch)
    _close(logits, ref_logits)
    _trees_close(grads, ref_grads, atol_scale=1e-5)


def test_model_dropout_paths_equal_reference(tiny_config, rng):
    cfg = _kv_config(tiny_config, "gqa").replace(dropout_rate=0.2)
    params = init_params(cfg, rng)
    batch = _batch(cfg.vocab_size)
    logits, grads = _model_value_and_grads(cfg, "xla_cpu", params, batch, jax.random.PRNGKey(4))
    ref_logits, ref_grads = _model_value_and_grads(cfg, "reference", params, batch, jax.random.PRNGKey(4))
    _close(logits, ref_logits)
    _trees_close(grads, ref_grads, atol_scale=1e-5)
    with pytest.raises(ValueError, match="has no attention dropout"):
        _model_value_and_grads(cfg, "dot_product_attention", params, batch, jax.random.PRNGKey(4))


def _decode_all(cfg, impl, params, enc, dec_in):
    """One token per cached call (the first creates the cache): logits [batch, tgt_len, vocab]."""
    model = Transformer(cfg, impl=impl)
    encoded = model.apply({"params": params}, enc, method=model.encode)
    variables, steps = {"params": params}, []
    for t in range(dec_in.shape[1]):
        logits, state = model.apply(variables, encoded, enc, dec_in[:, t:t + 1], decode=True, mutable=["cache"],
                                    max_decode_length=dec_in.shape[1], method=model.decode)
        variables = {"params": params, "cache": state["cache"]}
        steps.append(logits)
    return jnp.concatenate(steps, axis=1)


@pytest.mark.parametrize("kind", ["gqa", "mqa"])
@pytest.mark.parametrize("impl", FAST)
def test_cached_decoding_paths_equal_reference(tiny_config, rng, kind, impl):
    cfg = _kv_config(tiny_config, kind)
    params = init_params(cfg, rng)
    enc, dec_in, _ = _batch(cfg.vocab_size)
    got = _decode_all(cfg, impl, params, enc, dec_in)
    _close(got, _decode_all(cfg, "reference", params, enc, dec_in))
    # and the cache agrees with the full forward of the reference
    _close(got, Transformer(cfg, impl="reference").apply({"params": params}, enc, dec_in), rtol=2e-5)


@pytest.mark.parametrize("impl", FAST)
def test_model_paths_bf16(tiny_config, rng, impl):
    """bfloat16 activations, float32 parameters: logits within 2e-2 and gradients within 5e-2 of each tensor's
    largest entry (rounding points differ between paths; measured ~<1% here)."""
    cfg = _kv_config(tiny_config, "gqa").replace(dtype="bfloat16")
    params = init_params(cfg, rng)
    batch = _batch(cfg.vocab_size)
    logits, grads = _model_value_and_grads(cfg, impl, params, batch)
    ref_logits, ref_grads = _model_value_and_grads(cfg, "reference", params, batch)
    _close(logits, ref_logits, rtol=0, atol_scale=2e-2)
    _trees_close(grads, ref_grads, rtol=0, atol_scale=5e-2)


def test_parameter_tree_is_the_same_on_every_path(tiny_config, rng):
    cfg = _kv_config(tiny_config, "gqa")
    enc, dec_in, _ = _batch(cfg.vocab_size)
    shapes = {impl: traverse_util.flatten_dict(jax.eval_shape(
        lambda: Transformer(cfg, impl=impl).init(rng, enc, dec_in))["params"], sep="/")
        for impl in ["reference", *FAST]}
    assert shapes["reference"].keys() == shapes["xla_cpu"].keys() == shapes["dot_product_attention"].keys()

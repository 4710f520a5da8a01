import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gqa_uptrain.attention import grouped_dot_product_attention, relative_position_bucket
from gqa_uptrain.config import ConfigError, ModelConfig
from gqa_uptrain.model import Transformer, init_params


def _batch(vocab, seed=0):
    r = np.random.RandomState(seed)
    enc = r.randint(2, vocab, size=(2, 7))
    enc[0, 5:] = 0  # padding
    dec_tgt = r.randint(2, vocab, size=(2, 5))
    dec_tgt[1, 4:] = 0
    dec_in = np.concatenate([np.zeros((2, 1), int), dec_tgt[:, :-1]], axis=1)
    return jnp.asarray(enc), jnp.asarray(dec_in), jnp.asarray(dec_tgt)


def _logits(cfg, params, enc, dec_in, dec_tgt=None):
    return Transformer(cfg).apply({"params": params}, enc, dec_in, dec_tgt)


def _reference_mha(q, k, v, bias, mask):
    """Loop-per-head numpy attention: [b, lq, h, d] x [b, lk, h, d]."""
    b, lq, h, d = q.shape
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            logits = q[bi, :, hi] @ k[bi, :, hi].T + bias[0, hi]
            logits = np.where(mask[bi, 0], logits, -1e10)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[bi, :, hi] = w @ v[bi, :, hi]
    return out


def test_attention_equals_reference_mha_when_kv_heads_equal_heads():
    r = np.random.RandomState(0)
    q = r.randn(2, 5, 4, 8).astype(np.float32)
    k, v = r.randn(2, 6, 4, 8).astype(np.float32), r.randn(2, 6, 4, 8).astype(np.float32)
    bias = r.randn(1, 4, 5, 6).astype(np.float32)
    mask = r.rand(2, 1, 5, 6) > 0.3
    mask[..., 0] = True
    got = grouped_dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(bias),
                                        jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), _reference_mha(q, k, v, bias, mask), atol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_grouped_attention_uses_contiguous_groups(num_kv_heads):
    """Query head i must read KV head i // (H/G): compare with explicitly repeated K/V."""
    r = np.random.RandomState(1)
    q = r.randn(2, 5, 4, 8).astype(np.float32)
    k, v = (r.randn(2, 6, num_kv_heads, 8).astype(np.float32) for _ in range(2))
    bias = r.randn(1, 4, 5, 6).astype(np.float32)
    mask = np.ones((2, 1, 5, 6), bool)
    rep = 4 // num_kv_heads
    expected = _reference_mha(q, np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2), bias, mask)
    got = grouped_dot_product_attention(*(jnp.asarray(x) for x in (q, k, v, bias, mask)))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
    # A strided grouping (i % G) would give a different answer whenever G > 1.
    if num_kv_heads > 1:
        strided = _reference_mha(q, np.tile(k, (1, 1, rep, 1)), np.tile(v, (1, 1, rep, 1)), bias, mask)
        assert np.abs(strided - expected).max() > 1e-3


def test_gqa_with_equal_heads_in_group_matches_mha(tiny_config, rng):
    """An MHA model whose K/V heads are equal within each group == the GQA model holding one head per group."""
    mha = tiny_config
    g = 2
    gqa = mha.replace(decoder_self_kv_heads=g, decoder_cross_kv_heads=g, encoder_kv_heads=1)
    params = traverse_util.flatten_dict(init_params(mha, rng), sep="/")
    d, h = mha.head_dim, mha.num_heads
    gqa_params = dict(params)
    for name, w in params.items():
        kind = name.split("/")[2] if name.startswith(("encoder/layers", "decoder/layers")) else None
        if kind in ("attention", "self_attention", "encoder_decoder_attention") and name.split("/")[3] in ("key", "value"):
            groups = 1 if kind == "attention" else g
            heads = np.asarray(w).reshape(w.shape[0], groups, h // groups, d)
            first = heads[:, :, :1]  # make every head in a group equal to the group's first head
            params[name] = jnp.asarray(np.broadcast_to(first, heads.shape).reshape(w.shape))
            gqa_params[name] = jnp.asarray(first.reshape(w.shape[0], groups * d))
    params = traverse_util.unflatten_dict(params, sep="/")
    gqa_params = traverse_util.unflatten_dict(gqa_params, sep="/")
    enc, dec_in, dec_tgt = _batch(mha.vocab_size)
    want = _logits(mha, params, enc, dec_in, dec_tgt)
    got = _logits(gqa, gqa_params, enc, dec_in, dec_tgt)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    # Sanity: the K/V weights really are narrower.
    assert gqa_params["decoder"]["layers_0"]["self_attention"]["key"]["kernel"].shape == (mha.d_model, g * d)


def test_decoder_is_causal(tiny_config, rng):
    cfg = tiny_config.replace(decoder_self_kv_heads=2, decoder_cross_kv_heads=1)
    params = init_params(cfg, rng)
    enc, dec_in, _ = _batch(cfg.vocab_size)
    base = _logits(cfg, params, enc, dec_in)
    changed = dec_in.at[:, 3:].set((dec_in[:, 3:] + 7) % cfg.vocab_size)
    after = _logits(cfg, params, enc, changed)
    np.testing.assert_allclose(np.asarray(after[:, :3]), np.asarray(base[:, :3]), atol=1e-6)
    assert np.abs(np.asarray(after[:, 3:]) - np.asarray(base[:, 3:])).max() > 1e-4


def test_encoder_padding_is_ignored(tiny_config, rng):
    params = init_params(tiny_config, rng)
    enc, dec_in, _ = _batch(tiny_config.vocab_size)
    longer = jnp.concatenate([enc, jnp.zeros((2, 3), enc.dtype)], axis=1)
    np.testing.assert_allclose(np.asarray(_logits(tiny_config, params, longer, dec_in)),
                               np.asarray(_logits(tiny_config, params, enc, dec_in)), atol=1e-5)


def test_cached_decoding_matches_full_forward(tiny_config, rng):
    cfg = tiny_config.replace(decoder_self_kv_heads=2, decoder_cross_kv_heads=1)
    params = init_params(cfg, rng)
    model = Transformer(cfg)
    enc, dec_in, _ = _batch(cfg.vocab_size)
    full = model.apply({"params": params}, enc, dec_in)
    encoded = model.apply({"params": params}, enc, method=model.encode)
    logits, state = model.apply({"params": params}, encoded, enc, dec_in[:, :2], decode=True,
                                max_decode_length=dec_in.shape[1], method=model.decode, mutable=["cache"])
    steps = [logits]
    for t in range(2, dec_in.shape[1]):
        logits, state = model.apply({"params": params, "cache": state["cache"]}, encoded, enc, dec_in[:, t:t + 1],
                                    decode=True, method=model.decode, mutable=["cache"])
        steps.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=2e-5)
    ck = state["cache"]["decoder"]["layers_0"]["self_attention"]["cached_key"]
    assert ck.shape == (2, 2, dec_in.shape[1], cfg.head_dim)  # [batch, kv_heads, max_len, head_dim]
    xk = state["cache"]["decoder"]["layers_0"]["encoder_decoder_attention"]["cached_key"]
    assert xk.shape == (2, 1, enc.shape[1], cfg.head_dim)


def _bucket_reference(rel, bidirectional, num_buckets=32, max_distance=128):
    import math
    n = -rel
    ret = 0
    if bidirectional:
        num_buckets //= 2
        ret += num_buckets if n < 0 else 0
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket(bidirectional):
    rel = np.arange(-300, 300)
    got = np.asarray(relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional, num_buckets=32,
                                              max_distance=128))
    want = np.array([_bucket_reference(int(x), bidirectional) for x in rel])
    np.testing.assert_array_equal(got, want)
    assert got.min() == 0 and got.max() == (31 if bidirectional else 31)


def test_dropout_changes_training_output_only(tiny_config, rng):
    cfg = tiny_config.replace(dropout_rate=0.3)
    params = init_params(cfg, rng)
    enc, dec_in, _ = _batch(cfg.vocab_size)
    model = Transformer(cfg)
    a = model.apply({"params": params}, enc, dec_in, enable_dropout=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b = model.apply({"params": params}, enc, dec_in, enable_dropout=True, rngs={"dropout": jax.random.PRNGKey(2)})
    c = model.apply({"params": params}, enc, dec_in)
    d = model.apply({"params": params}, enc, dec_in)
    assert np.abs(np.asarray(a - b)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))


def test_bf16_activations_keep_float32_params_and_logits(tiny_config, rng):
    cfg = tiny_config.replace(dtype="bfloat16")
    params = init_params(cfg, rng)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    enc, dec_in, _ = _batch(cfg.vocab_size)
    lo = _logits(cfg, params, enc, dec_in)
    hi = _logits(tiny_config, params, enc, dec_in)
    assert lo.dtype == jnp.float32
    assert np.abs(np.asarray(lo - hi)).max() < 0.25 * np.abs(np.asarray(hi)).max()


@pytest.mark.parametrize("kw,needle", [
    (dict(decoder_self_kv_heads=3), "decoder_self_kv_heads=3 does not divide num_heads=4"),
    (dict(decoder_cross_kv_heads=8), "decoder_cross_kv_heads=8 exceeds num_heads=4"),
    (dict(encoder_kv_heads=0), "encoder_kv_heads must be a positive integer"),
    (dict(d_model=0), "d_model must be a positive integer"),
    (dict(dtype="float64"), "dtype must be"),
])
def test_config_errors_are_clear(tiny_config, kw, needle):
    with pytest.raises(ConfigError, match=needle):
        tiny_config.replace(**kw)


def test_config_roundtrip(tiny_config):
    cfg = tiny_config.with_decoder_kv_heads(2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_heads": 3})


def test_kv_cache_bytes(tiny_config):
    cfg = tiny_config.with_decoder_kv_heads(1)
    assert cfg.kv_cache_bytes_per_token() == 2 * cfg.num_decoder_layers * 1 * cfg.head_dim * 4
    assert tiny_config.kv_cache_bytes_per_token() == 4 * cfg.kv_cache_bytes_per_token()

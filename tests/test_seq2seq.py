"""EncoderDecoderModel: the one loss / score / predict the trainer, `eval`, `convert --compare` and decode use."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_uptrain import decode
from gqa_uptrain.model import Transformer
from gqa_uptrain.seq2seq import NUM_REAL_TARGET_TOKENS, EncoderDecoderModel, batches_from_pairs, shift_right


def _batch(cfg, b=4, src=7, tgt=6, seed=0):
    r = np.random.default_rng(seed)
    enc = r.integers(2, cfg.vocab_size, size=(b, src)).astype(np.int32)
    enc[1, -3:] = 0
    targets = r.integers(2, cfg.vocab_size, size=(b, tgt)).astype(np.int32)
    targets[0, -2:] = 0
    targets[2, -1:] = 0
    return {"encoder_input_tokens": enc, "decoder_input_tokens": shift_right(targets),
            "decoder_target_tokens": targets}


def _logits(cfg, params, batch, targets_mask=True):
    return np.asarray(Transformer(cfg).apply(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"] if targets_mask else None), np.float64)


def _log_softmax(logits):
    m = logits.max(-1, keepdims=True)
    logz = m + np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return logits - logz, logz[..., 0]


@pytest.mark.parametrize("lnf", [None, 100.0, NUM_REAL_TARGET_TOKENS])
def test_loss_fn_equals_direct_computation(tiny_config, rng, lnf):
    model = EncoderDecoderModel(tiny_config, z_loss=1e-3, loss_normalizing_factor=lnf)
    params = model.init(rng)
    batch = _batch(tiny_config)
    objective, sums = jax.jit(model.loss_fn)(params, batch, None)
    logits = _logits(tiny_config, params, batch)
    logp, logz = _log_softmax(logits)
    t = batch["decoder_target_tokens"]
    w = (t > 0).astype(np.float64)  # no decoder_loss_weights: non-padding targets count
    ce = -(np.take_along_axis(logp, t[..., None], -1)[..., 0] * w).sum()
    z = (1e-3 * logz ** 2 * w).sum()
    norm = {None: t.size, 100.0: 100.0, NUM_REAL_TARGET_TOKENS: w.sum()}[lnf]
    np.testing.assert_allclose(float(sums["cross_entropy"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(sums["z_loss"]), z, rtol=1e-5)
    np.testing.assert_allclose(float(objective), (ce + z) / norm, rtol=1e-5)
    assert float(sums["weight"]) == w.sum() == 21
    assert float(sums["correct"]) == ((logits.argmax(-1) == t) * w).sum()
    # evaluate: the same sums as means over tokens.
    m = model.evaluate(params, [batch])
    assert m["loss"] == pytest.approx(ce / w.sum(), rel=1e-5) and m["target_tokens"] == 21


def test_loss_weights_and_dropout(tiny_config, rng):
    """decoder_loss_weights select the tokens; a dropout rng only matters with a non-zero dropout rate."""
    model = EncoderDecoderModel(tiny_config)
    params = model.init(rng)
    batch = _batch(tiny_config)
    weights = np.zeros_like(batch["decoder_target_tokens"])
    weights[1] = 1
    one_row = model.loss_sums(params, {**batch, "decoder_loss_weights": weights})
    row = {k: v[1:2] for k, v in batch.items()}
    np.testing.assert_allclose(float(one_row["cross_entropy"]), float(model.loss_sums(params, row)["cross_entropy"]),
                               rtol=1e-5)
    key = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(np.asarray(model.compute_logits(params, batch, key)),
                                  np.asarray(model.compute_logits(params, batch)))
    dropped = EncoderDecoderModel(tiny_config.replace(dropout_rate=0.5))
    assert not np.allclose(np.asarray(dropped.compute_logits(params, batch, key)),
                           np.asarray(dropped.compute_logits(params, batch)))


def test_score_batch_is_sum_of_token_log_probs(tiny_config, rng):
    model = EncoderDecoderModel(tiny_config)
    params = model.init(rng)
    batch = _batch(tiny_config)
    t = batch["decoder_target_tokens"]
    # Scoring does not mask decoder padding (a 0 inside a hypothesis is a token): compare with unmasked logits.
    logp, _ = _log_softmax(_logits(tiny_config, params, batch, targets_mask=False))
    tok = np.take_along_axis(logp, t[..., None], -1)[..., 0]
    scores, aux = jax.jit(model.score_batch, static_argnums=2)(params, batch, True)
    np.testing.assert_allclose(np.asarray(aux["token_scores"]), tok, atol=1e-5)
    np.testing.assert_allclose(np.asarray(scores), tok.sum(-1), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["argmax"]), logp.argmax(-1))
    # Weights mask positions; decoder_input_tokens default to the shifted targets.
    w = (t > 0).astype(np.int32)
    no_dec_in = {k: v for k, v in batch.items() if k != "decoder_input_tokens"}
    masked = model.score_batch(params, {**no_dec_in, "decoder_loss_weights": w})
    np.testing.assert_allclose(np.asarray(masked), (tok * w).sum(-1), rtol=1e-5)
    # Valid target positions: the loss and the score agree (masking trailing padding changes nothing before it).
    sums = model.loss_sums(params, batch)
    assert float(sums["cross_entropy"]) == pytest.approx(-float(np.asarray(masked).sum()), rel=1e-5)


def test_predict_batch_delegates_to_decode(tiny_config, rng):
    model = EncoderDecoderModel(tiny_config)
    params = model.init(rng)
    batch = _batch(tiny_config)
    enc = batch["encoder_input_tokens"]
    np.testing.assert_array_equal(np.asarray(model.predict_batch(params, batch, 6)),
                                  np.asarray(decode.greedy_decode(tiny_config, params, enc, 6)))
    key = jax.random.PRNGKey(5)
    np.testing.assert_array_equal(
        np.asarray(model.predict_batch(params, batch, 6, "sample", rng=key, temperature=0.8, top_k=5)),
        np.asarray(decode.sample_decode(tiny_config, params, enc, 6, key, temperature=0.8, top_k=5)))
    np.testing.assert_array_equal(
        np.asarray(model.predict_batch(params, batch, 6, "beam", num_beams=2, alpha=0.0)),
        np.asarray(decode.beam_search(tiny_config, params, enc, 6, num_beams=2, alpha=0.0).best))
    with pytest.raises(ValueError, match="unknown decoding method"):
        model.predict_batch(params, batch, 6, "nucleus")


def test_init_and_abstract_params_agree(tiny_config, rng):
    model = EncoderDecoderModel(tiny_config)
    params = model.init(rng)
    abstract = nn.meta.unbox(model.abstract_params())
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail(f"{a.shape} {b.shape}"),
                 params, abstract)
    with pytest.raises(ValueError, match="loss_normalizing_factor"):
        EncoderDecoderModel(tiny_config, loss_normalizing_factor="MEAN")


def test_batches_from_pairs_pads_and_shifts():
    pairs = [([5, 6, 1], [7, 1]), ([5, 1], [8, 9, 10, 1]), ([4, 1], [3, 1])]
    b0, b1 = batches_from_pairs(pairs, 2)
    np.testing.assert_array_equal(b0["decoder_target_tokens"][1], [8, 9, 10, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(b0["decoder_input_tokens"][1], [0, 8, 9, 10, 1, 0, 0, 0])
    assert b0["encoder_input_tokens"].shape == (2, 8) and b1["encoder_input_tokens"].shape == (1, 8)


def test_model_is_a_static_jit_argument(tiny_config, rng):
    """Frozen and hashable: equal models hit one compiled program."""
    a, b = EncoderDecoderModel(tiny_config, z_loss=1e-4), EncoderDecoderModel(tiny_config, z_loss=1e-4)
    assert a == b and hash(a) == hash(b)
    params = a.init(rng)
    fn = jax.jit(lambda m, p, x: m.loss_sums(p, x), static_argnums=0)
    x = {k: jnp.asarray(v) for k, v in _batch(tiny_config).items()}
    fn(a, params, x)
    fn(b, params, x)
    assert fn._cache_size() == 1


def test_convert_compare_loss_is_the_model_loss(tiny_config, rng):
    """`convert --compare`'s held-out loss (flat '/'-keyed parameters, scored 3 rows at a time) is the mean
    cross-entropy over all non-padding targets, as the model's loss_sums give it for the whole set at once."""
    from flax import traverse_util

    from gqa_uptrain.cli.convert_cmd import evaluate_loss
    model = EncoderDecoderModel(tiny_config)
    params = model.init(rng)
    batch = _batch(tiny_config, b=7, seed=2)
    flat = traverse_util.flatten_dict(params, sep="/")
    got = evaluate_loss(flat, tiny_config, (batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                                            batch["decoder_target_tokens"]), batch_size=3)
    sums = model.loss_sums(params, batch)
    assert got == pytest.approx(float(sums["cross_entropy"] / sums["weight"]), rel=1e-5)

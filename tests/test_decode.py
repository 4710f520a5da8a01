import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_uptrain import decode
from gqa_uptrain.model import Transformer, init_params
from gqa_uptrain.seq2seq import score_sequences

L = 8


def _inputs(vocab: int, seed: int = 0) -> np.ndarray:
    """Three rows of mixed lengths (0 = padding): 7, 4 and 2 real tokens."""
    enc = np.random.RandomState(seed).randint(2, vocab, (3, 7)).astype(np.int32)
    enc[1, 4:] = 0
    enc[2, 2:] = 0
    return enc


def _shift_right(tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    return np.concatenate([np.zeros((tokens.shape[0], 1), tokens.dtype), tokens[:, :-1]], axis=1)


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    """Jitted teacher-forced forward pass (full recompute, no cache): (params, enc, dec_in) -> logits."""
    model = Transformer(cfg)
    return jax.jit(lambda params, enc, dec_in: model.apply({"params": params}, enc, dec_in))


def _naive_greedy(cfg, params, enc, length, eos_id=1) -> np.ndarray:
    """Reference: recompute the full forward pass for every new token, no cache. The decoder input always has
    `length` positions; causality makes position t independent of the not-yet-decoded ones."""
    out = np.zeros((enc.shape[0], length), np.int32)
    done = np.zeros(enc.shape[0], bool)
    for t in range(length):
        logits = np.asarray(_forward(cfg)(params, enc, _shift_right(out)))
        tok = np.where(done, 0, logits[:, t].argmax(-1))
        out[:, t] = tok
        done |= tok == eos_id
    return out


def _peaked(params, scale=4.0):
    """Sharpen the output layer so random models make confident, tie-free choices (and emit EOS sometimes)."""
    params = jax.tree.map(lambda x: x, params)
    params["decoder"]["logits_dense"]["kernel"] = params["decoder"]["logits_dense"]["kernel"] * scale
    return params


@pytest.mark.parametrize("kv", [(4, 4), (1, 1), (2, 1)], ids=["mha", "mqa", "gqa_self2_cross1"])
def test_cached_greedy_matches_full_forward_and_naive_loop(tiny_config, rng, kv):
    cfg = tiny_config.replace(decoder_self_kv_heads=kv[0], decoder_cross_kv_heads=kv[1])
    params = init_params(cfg, rng)
    enc = _inputs(cfg.vocab_size)
    tokens, step_logits = decode.greedy_decode(cfg, params, enc, L, return_logits=True)
    tokens = np.asarray(tokens)
    # Every step's cached logits equal the full forward recompute on the decoded prefix.
    full = np.asarray(_forward(cfg)(params, enc, _shift_right(tokens)))
    live = np.asarray(decode.sequence_mask(tokens))
    np.testing.assert_allclose(np.asarray(step_logits)[live], full[live], atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(tokens, _naive_greedy(cfg, params, enc, L))


def test_eos_stops_and_pads(tiny_config, rng):
    params = init_params(tiny_config, rng)
    enc = _inputs(tiny_config.vocab_size)
    free = np.asarray(decode.greedy_decode(tiny_config, params, enc, L, eos_id=None))
    # Declare the token row 0 emits at step 2 to be EOS: row 0 must stop there and pad with 0 afterwards,
    # and every other row is unchanged up to its own first occurrence of that token.
    eos = int(free[0, 2])
    first = int(np.flatnonzero(free[0] == eos)[0])
    got = np.asarray(decode.greedy_decode(tiny_config, params, enc, L, eos_id=eos))
    for r in range(enc.shape[0]):
        hits = np.flatnonzero(free[r] == eos)
        stop = hits[0] if hits.size else L - 1
        np.testing.assert_array_equal(got[r, : stop + 1], free[r, : stop + 1])
        assert (got[r, stop + 1:] == 0).all()
    assert got[0, first] == eos and (got[0, first + 1:] == 0).all() and first < L - 1


def test_mixed_length_batch_equals_single_rows(tiny_config, rng):
    cfg = tiny_config.with_decoder_kv_heads(2)
    params = init_params(cfg, rng)
    enc = _inputs(cfg.vocab_size)
    enc[2, :4] = enc[1, :4] + 1  # rows 1 and 2: 4 real tokens (one compile for the unpadded [1, 4] shape)
    batched = np.asarray(decode.greedy_decode(cfg, params, enc, L))
    for r in (1, 2):
        row = enc[r: r + 1, :4]
        np.testing.assert_array_equal(np.asarray(decode.greedy_decode(cfg, params, row, L))[0], batched[r])
    assert (batched[1] != batched[2]).any()


@pytest.mark.parametrize("g", [4, 2, 1])
def test_kv_cache_bytes_scale_with_groups(tiny_config, rng, g):
    cfg = tiny_config.with_decoder_kv_heads(g)
    params = init_params(cfg, rng)
    enc = _inputs(cfg.vocab_size)
    batch, src = enc.shape
    length = 16
    _, cache = decode.prefill(cfg, params, enc, length)
    measured = decode.cache_bytes(cache)
    layers, hd, item = cfg.num_decoder_layers, cfg.head_dim, 4
    assert measured["self"] == 2 * layers * g * hd * length * batch * item
    assert measured["cross"] == 2 * layers * g * hd * src * batch * item
    assert measured["self"] == cfg.kv_cache_bytes_per_token() * length * batch
    k = cache["decoder"]["layers_1"]["self_attention"]["cached_key"]
    assert k.shape == (batch, g, length, hd)


def test_top_k_1_and_tiny_top_p_sampling_equal_greedy(tiny_config, rng):
    params = init_params(tiny_config, rng)
    enc = _inputs(tiny_config.vocab_size)
    greedy = np.asarray(decode.greedy_decode(tiny_config, params, enc, L))
    for seed in range(2):
        key = jax.random.PRNGKey(seed)
        np.testing.assert_array_equal(np.asarray(decode.sample_decode(
            tiny_config, params, enc, L, key, temperature=1.5, top_k=1)), greedy)
        np.testing.assert_array_equal(np.asarray(decode.sample_decode(
            tiny_config, params, enc, L, key, temperature=1.0, top_p=1e-6)), greedy)
    # Plain sampling from a random model is not greedy (and is reproducible for a fixed key).
    a = np.asarray(decode.sample_decode(tiny_config, params, enc, L, jax.random.PRNGKey(3), temperature=2.0))
    b = np.asarray(decode.sample_decode(tiny_config, params, enc, L, jax.random.PRNGKey(3), temperature=2.0))
    np.testing.assert_array_equal(a, b)
    assert (a != greedy).any()


def test_filter_logits_hand_values():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda x: (np.asarray(x) > decode.NEG_INF / 2)[0].tolist()  # noqa: E731
    assert keep(decode.filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    # Mass before each sorted token: 0, .5, .7, .85, .95 -> top_p=0.7 keeps the first two, 0.71 the first three.
    assert keep(decode.filter_logits(logits, top_p=0.7)) == [True, True, False, False, False]
    assert keep(decode.filter_logits(logits, top_p=0.71)) == [True, True, True, False, False]
    assert keep(decode.filter_logits(logits, top_p=0.01)) == [True, False, False, False, False]
    assert keep(decode.filter_logits(logits, top_k=3, top_p=0.9)) == [True, True, True, False, False]
    shuffled = logits[:, ::-1]
    assert keep(decode.filter_logits(shuffled, top_p=0.7)) == [False, False, False, True, True]


def test_sampling_frequencies_follow_softmax(tiny_config, rng):
    """First-token frequencies over many samples match softmax(logits / T) restricted to the top 3."""
    params = init_params(tiny_config, rng)
    enc = np.repeat(_inputs(tiny_config.vocab_size)[:1], 1000, axis=0)
    logits, _ = decode.prefill(tiny_config, params, enc[:1], 1)
    probs = np.asarray(jax.nn.softmax(decode.filter_logits(logits[0] / 2.0, top_k=3)))
    first = np.asarray(decode.sample_decode(tiny_config, params, enc, 1, jax.random.PRNGKey(7), temperature=2.0,
                                            top_k=3))[:, 0]
    freq = np.bincount(first, minlength=tiny_config.vocab_size) / len(first)
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs > 1e-6))
    np.testing.assert_allclose(freq, probs, atol=0.05)


def test_length_penalty_values():
    np.testing.assert_allclose(float(decode.length_penalty(1, 0.6)), 1.0)
    np.testing.assert_allclose(float(decode.length_penalty(7, 0.6)), 2.0 ** 0.6, rtol=1e-6)
    np.testing.assert_allclose(float(decode.length_penalty(13, 0.0)), 1.0)


def test_beam_one_equals_greedy(tiny_config, rng):
    cfg = tiny_config.with_decoder_kv_heads(2)
    params = init_params(cfg, rng)
    enc = _inputs(cfg.vocab_size, seed=1)
    # Use as EOS a token that greedy emits mid-sequence, so stopping and padding are exercised.
    free = np.asarray(decode.greedy_decode(cfg, params, enc, L, eos_id=None))
    eos = int(free[0, 3])
    greedy = np.asarray(decode.greedy_decode(cfg, params, enc, L, eos_id=eos))
    assert (greedy[0] == 0).any() or free[0, 3] == 0
    out = decode.beam_search(cfg, params, enc, L, num_beams=1, alpha=0.0, eos_id=eos)
    np.testing.assert_array_equal(np.asarray(out.best), greedy)
    # The reported score is the sequence's own log-probability (alpha = 0).
    logp = score_sequences(cfg, params, enc, greedy)
    want = np.asarray(jnp.sum(jnp.where(decode.sequence_mask(greedy, eos), logp, 0.0), axis=1))
    np.testing.assert_allclose(np.asarray(out.scores[:, 0]), want, rtol=1e-4, atol=1e-4)


def _exhaustive(cfg, params, enc, length, alpha):
    """Every hypothesis of a 4-token vocabulary: ends in EOS (id 1) at step t < length, or runs to length."""
    hyps = []
    for t in range(length):
        for prefix in itertools.product([0, 2, 3], repeat=t):
            hyps.append(list(prefix) + [1] + [0] * (length - t - 1))
    hyps += [list(p) for p in itertools.product([0, 2, 3], repeat=length)]
    hyps = np.array(hyps, np.int32)
    logp = score_sequences(cfg, params, np.repeat(enc, len(hyps), axis=0), hyps)
    mask = decode.sequence_mask(hyps)
    total = np.asarray(jnp.sum(jnp.where(mask, logp, 0.0), axis=1))
    lengths = np.asarray(mask.sum(axis=1))
    return hyps, total / np.asarray(decode.length_penalty(lengths, alpha))


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_search_finds_exhaustive_optimum(tiny_config, rng, alpha):
    cfg = tiny_config.replace(vocab_size=4).with_decoder_kv_heads(2)
    params = init_params(cfg, rng)
    enc = _inputs(cfg.vocab_size, seed=2)[:1]
    length = 3
    hyps, scores = _exhaustive(cfg, params, enc, length, alpha)
    # 4 tokens x 9 live prefixes = 36 candidates at the last step: 36 beams search exhaustively.
    out = decode.beam_search(cfg, params, enc, length, num_beams=36, alpha=alpha)
    order = np.argsort(-scores)
    np.testing.assert_array_equal(np.asarray(out.best)[0], hyps[order[0]])
    np.testing.assert_allclose(np.asarray(out.scores)[0, :5], scores[order[:5]], rtol=1e-5, atol=1e-5)
    # A narrow beam returns a real hypothesis whose score is its true score and no better than the optimum.
    small = decode.beam_search(cfg, params, enc, length, num_beams=2, alpha=alpha)
    idx = [int(np.flatnonzero((hyps == s).all(1))[0]) for s in np.asarray(small.sequences)[0]]
    np.testing.assert_allclose(np.asarray(small.scores)[0], scores[idx], rtol=1e-5, atol=1e-5)
    assert scores[idx[0]] <= scores[order[0]] + 1e-6


def test_score_sequences_matches_manual_log_softmax(tiny_config, rng):
    params = init_params(tiny_config, rng)
    enc = _inputs(tiny_config.vocab_size)
    tgt = np.array([[5, 6, 1, 0], [7, 1, 0, 0], [9, 9, 9, 9]], np.int32)
    logits = np.asarray(Transformer(tiny_config).apply({"params": params}, enc, _shift_right(tgt)))
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    want = np.take_along_axis(logp, tgt[:, :, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(score_sequences(tiny_config, params, enc, tgt)), want, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(decode.sequence_mask(tgt)),
                                  [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])


def test_greedy_matches_hf_generate():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from gqa_uptrain import hf

    torch.manual_seed(2)
    hf_cfg = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = transformers.T5ForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():  # HF's random init makes every row repeat one token; wider weights give varied output
        for name, p in model.named_parameters():
            if p.ndim == 2 and "shared" not in name:
                p.normal_(0.0, 2.0 * p.shape[1] ** -0.5)
    cfg, params = hf.params_from_hf({k: v.detach().numpy() for k, v in model.state_dict().items()}, model.config)
    params = jax.tree.map(jnp.asarray, params)
    enc = _inputs(64, seed=3)
    length = 10

    def hf_greedy(eos):
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor(enc, dtype=torch.long),
                                 attention_mask=torch.tensor(enc > 0, dtype=torch.long), do_sample=False,
                                 num_beams=1, max_new_tokens=length, eos_token_id=eos).numpy()[:, 1:]
        return np.pad(out, ((0, 0), (0, length - out.shape[1])))  # drop the start token, pad like ours

    ref = hf_greedy(1)
    np.testing.assert_array_equal(np.asarray(decode.greedy_decode(cfg, params, enc, length)), ref)
    assert len(np.unique(ref)) > 3  # varied output, not one repeated token
    # Declare a token seen mid-sequence EOS: both implementations must stop and pad identically.
    eos = int(ref[2, 3])
    ref = hf_greedy(eos)
    assert (ref == 0).any()
    np.testing.assert_array_equal(np.asarray(decode.greedy_decode(cfg, params, enc, length, eos_id=eos)), ref)

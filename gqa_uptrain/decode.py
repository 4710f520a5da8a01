"""Generation over the decoder KV cache: greedy, temperature / top-k / top-p sampling and beam search.

How a batch is decoded (all inside one jit-compiled function per method and shape):
  1. the encoder runs once: encoded [batch, src_len, d_model];
  2. a prefill call feeds the start token (id 0) and creates the 'cache' collection: per decoder layer the
     self-attention cache cached_key / cached_value [batch, G_self, max_decode_length, head_dim] and the
     cross-attention K/V [batch, G_cross, src_len, head_dim], projected once from the encoder output;
  3. a `lax.while_loop` feeds one token [batch, 1] per step, writing its K/V at the step index. The loop stops
     early when every row has emitted EOS (or, for beam search, when no live beam can beat the finished ones).
Because the cache holds G (not H) heads, its size and the bytes read per step fall by H / G.

Token conventions (T5): pad 0, EOS 1, the decoder starts from 0. Outputs are [batch, max_decode_length] with
the EOS kept and zeros after it. `eos_id=None` disables stopping (exactly max_decode_length tokens; benchmarks).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gqa_uptrain.config import ModelConfig
from gqa_uptrain.model import Transformer

Array = jax.Array
PAD_ID = 0
EOS_ID = 1
# Finite so that arithmetic on masked entries (sums, divisions by the length penalty) never makes NaNs.
NEG_INF = -1.0e10

__all__ = ["PAD_ID", "EOS_ID", "METHODS", "greedy_decode", "greedy_decode_from_encoded", "sample_decode", "beam_search",
           "BeamSearchOutput", "generate", "filter_logits", "length_penalty", "prefill", "cache_bytes",
           "encode_and_prefill", "decode_step", "sequence_mask", "pad_batch", "Generator"]


# ------------------------------------------------------------------------------------------ model calls


def _encode(model: Transformer, params: Any, encoder_input_tokens: Array) -> Array:
    return model.apply({"params": params}, encoder_input_tokens, method=model.encode)


def _prefill(model: Transformer, params: Any, encoded: Array, encoder_input_tokens: Array,
             max_decode_length: int) -> tuple[Array, Any]:
    """Start token at position 0 -> (logits for output position 0 [batch, vocab], cache)."""
    bos = jnp.full((encoded.shape[0], 1), PAD_ID, jnp.int32)
    logits, state = model.apply({"params": params}, encoded, encoder_input_tokens, bos, decode=True,
                                max_decode_length=max_decode_length, method=model.decode, mutable=["cache"])
    return logits[:, 0], state["cache"]


def _step(model: Transformer, params: Any, cache: Any, encoded: Array, encoder_input_tokens: Array,
          tokens: Array) -> tuple[Array, Any]:
    """One cached step: tokens [batch] (the previous output) -> (logits [batch, vocab], updated cache).

    `encoded` is not re-projected: cross-attention reads its cached K/V; it is passed for its shape only.
    """
    logits, state = model.apply({"params": params, "cache": cache}, encoded, encoder_input_tokens,
                                tokens[:, None], decode=True, method=model.decode, mutable=["cache"])
    return logits[:, 0], state["cache"]


def encode_and_prefill(config: ModelConfig, max_decode_length: int):
    """(params, encoder_input_tokens) -> (encoded, logits for output position 0, cache): what a decode loop runs
    before its first step (ahead-of-time compiled by gqa_uptrain/aot.py)."""
    model = Transformer(config)

    def fn(params: Any, encoder_input_tokens: Array) -> tuple[Array, Array, Any]:
        encoded = _encode(model, params, encoder_input_tokens)
        logits, cache = _prefill(model, params, encoded, encoder_input_tokens, max_decode_length)
        return encoded, logits, cache
    return fn


def decode_step(config: ModelConfig):
    """(params, cache, encoded, encoder_input_tokens, tokens [batch]) -> (logits [batch, vocab], cache): the body
    of every decode loop here (greedy, sampling, beam search), and what gqa_uptrain/aot.py compiles."""
    model = Transformer(config)
    return functools.partial(_step, model)


def prefill(config: ModelConfig, params: Any, encoder_input_tokens: Array,
            max_decode_length: int) -> tuple[Array, Any]:
    """Encode and run the prefill call -> (logits [batch, vocab] f32 for the first output token, cache)."""
    model = Transformer(config)
    enc = jnp.asarray(encoder_input_tokens, jnp.int32)
    return _prefill(model, params, _encode(model, params, enc), enc, max_decode_length)


def cache_bytes(cache: Any) -> dict[str, int]:
    """Bytes held by the decode cache, measured from its arrays.

    Returns {'self': decoder self-attention K+V, 'cross': cross-attention K+V, 'total': both}.
    """
    from flax import traverse_util
    flat = traverse_util.flatten_dict(jax.tree.map(lambda x: x, dict(cache)))
    out = {"self": 0, "cross": 0}
    for path, leaf in flat.items():
        if path[-1] not in ("cached_key", "cached_value"):
            continue
        kind = "cross" if "encoder_decoder_attention" in path else "self"
        out[kind] += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
    out["total"] = out["self"] + out["cross"]
    return out


# --------------------------------------------------------------------------------- token choice rules


def filter_logits(logits: Array, top_k: Array | int = 0, top_p: Array | float = 1.0) -> Array:
    """Mask all but the top-k logits and/or the smallest set whose probability reaches top_p (nucleus).

    logits [..., vocab] -> same shape, masked entries set to NEG_INF. top_k=0 / top_p=1 disable a filter.
    top_k and top_p may be traced scalars (one compiled sampler serves every setting). Ties at the k-th value
    are all kept; the most likely token always survives.
    """
    vocab = logits.shape[-1]
    sorted_logits = -jnp.sort(-logits, axis=-1)
    top_k = jnp.asarray(top_k, jnp.int32)
    kth = jnp.take(sorted_logits, jnp.clip(top_k - 1, 0, vocab - 1), axis=-1)[..., None]
    logits = jnp.where((top_k > 0) & (logits < kth), NEG_INF, logits)
    sorted_logits = jnp.where((top_k > 0) & (sorted_logits < kth), NEG_INF, sorted_logits)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep token j (in sorted order) while the mass strictly before it is below top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < jnp.asarray(top_p, jnp.float32)
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, NEG_INF, logits)


def length_penalty(length: Array | int, alpha: float) -> Array:
    """T5X / GNMT brevity penalty ((5 + length) / 6) ** alpha; beam scores are log-prob / penalty."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


# ------------------------------------------------------------------------- greedy / sampling loop


_LOOP_STATIC = ("config", "max_decode_length", "sample", "return_logits")


@functools.partial(jax.jit, static_argnames=_LOOP_STATIC)
def _decode_loop(params: Any, encoder_input_tokens: Array, rng: Array, eos_id: Array, temperature: Array,
                 top_k: Array, top_p: Array, **static) -> tuple[Array, Array | None]:
    """Encoder once, then the cached loop: tokens [batch, L] (and logits [batch, L, vocab] if return_logits)."""
    encoded = _encode(Transformer(static["config"]), params, encoder_input_tokens)
    return _loop(params, encoded, encoder_input_tokens, rng, eos_id, temperature, top_k, top_p, **static)


@functools.partial(jax.jit, static_argnames=_LOOP_STATIC)
def _decode_loop_from_encoded(params: Any, encoded: Array, encoder_input_tokens: Array, rng: Array, eos_id: Array,
                              temperature: Array, top_k: Array, top_p: Array, **static) -> tuple[Array, Array | None]:
    return _loop(params, encoded, encoder_input_tokens, rng, eos_id, temperature, top_k, top_p, **static)


def _eos_array(eos_id: int | None) -> Array:
    # EOS is traced (one compilation for every EOS id); -1 never matches a token, so None decodes to the end.
    return jnp.int32(-1 if eos_id is None else eos_id)


def _loop(params: Any, encoded: Array, encoder_input_tokens: Array, rng: Array, eos_id: Array, temperature: Array,
          top_k: Array, top_p: Array, *, config: ModelConfig, max_decode_length: int, sample: bool,
          return_logits: bool) -> tuple[Array, Array | None]:
    """Prefill + while_loop over the cache (traced inside a jit).

    sample=False: argmax. sample=True: temperature / top_k / top_p are traced scalars (one compile for all).
    """
    model = Transformer(config)
    enc = encoder_input_tokens
    b, length = enc.shape[0], max_decode_length
    logits, cache = _prefill(model, params, encoded, enc, length)

    def choose(logits: Array, key: Array) -> Array:
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if not sample:
            return greedy
        scaled = filter_logits(logits / jnp.maximum(temperature, 1e-6), top_k, top_p)
        drawn = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    def select(i, logits, tokens, finished, all_logits, key):
        key, sub = jax.random.split(key)
        tok = jnp.where(finished, PAD_ID, choose(logits, sub))
        tokens = tokens.at[:, i].set(tok)
        finished = finished | (tok == eos_id)
        if return_logits:
            all_logits = all_logits.at[:, i].set(logits)
        return tokens, finished, all_logits, key

    tokens = jnp.zeros((b, length), jnp.int32)
    all_logits = jnp.zeros((b, length, config.vocab_size), jnp.float32) if return_logits else jnp.zeros(())
    tokens, finished, all_logits, rng = select(0, logits, tokens, jnp.zeros((b,), bool), all_logits, rng)

    def cond(state):
        i, _, finished, *_ = state
        return (i < length) & ~jnp.all(finished)

    def body(state):
        i, tokens, finished, cache, all_logits, key = state
        prev = jax.lax.dynamic_index_in_dim(tokens, i - 1, axis=1, keepdims=False)
        logits, cache = decode_step(config)(params, cache, encoded, enc, prev)
        tokens, finished, all_logits, key = select(i, logits, tokens, finished, all_logits, key)
        return i + 1, tokens, finished, cache, all_logits, key

    state = (jnp.ones((), jnp.int32), tokens, finished, cache, all_logits, rng)
    _, tokens, _, _, all_logits, _ = jax.lax.while_loop(cond, body, state)
    return tokens, (all_logits if return_logits else None)


def _check_inputs(config: ModelConfig, encoder_input_tokens: Any, max_decode_length: int) -> Array:
    enc = jnp.asarray(encoder_input_tokens, jnp.int32)
    if enc.ndim != 2:
        raise ValueError(f"encoder_input_tokens must be [batch, src_len], got shape {enc.shape}")
    if max_decode_length < 1:
        raise ValueError(f"max_decode_length must be >= 1, got {max_decode_length}")
    return enc


def greedy_decode(config: ModelConfig, params: Any, encoder_input_tokens: Any, max_decode_length: int,
                  eos_id: int | None = EOS_ID, return_logits: bool = False):
    """Greedy decoding with the KV cache.

    encoder_input_tokens [batch, src_len] int (0 = padding; rows may have different lengths).
    Returns tokens [batch, max_decode_length] int32 (EOS kept, 0 after it); with return_logits also the logits
    [batch, max_decode_length, vocab] f32 each token was chosen from (rows after their EOS: undefined).
    """
    enc = _check_inputs(config, encoder_input_tokens, max_decode_length)
    tokens, logits = _decode_loop(params, enc, jax.random.PRNGKey(0), _eos_array(eos_id), 0.0, 0, 1.0,
                                  config=config, max_decode_length=max_decode_length, sample=False,
                                  return_logits=return_logits)
    return (tokens, logits) if return_logits else tokens


def greedy_decode_from_encoded(config: ModelConfig, params: Any, encoded: Array, encoder_input_tokens: Any,
                               max_decode_length: int, eos_id: int | None = EOS_ID) -> Array:
    """Greedy decoding given the encoder output encoded [batch, src_len, d_model] (e.g. to time the decoder
    alone). Returns tokens [batch, max_decode_length]."""
    enc = _check_inputs(config, encoder_input_tokens, max_decode_length)
    tokens, _ = _decode_loop_from_encoded(params, encoded, enc, jax.random.PRNGKey(0), _eos_array(eos_id), 0.0, 0,
                                          1.0, config=config, max_decode_length=max_decode_length, sample=False,
                                          return_logits=False)
    return tokens


def sample_decode(config: ModelConfig, params: Any, encoder_input_tokens: Any, max_decode_length: int,
                  rng: Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  eos_id: int | None = EOS_ID) -> Array:
    """Ancestral sampling from softmax(logits / temperature), optionally restricted to top_k / top_p.

    temperature 0 falls back to greedy. Returns tokens [batch, max_decode_length] int32.
    """
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    enc = _check_inputs(config, encoder_input_tokens, max_decode_length)
    tokens, _ = _decode_loop(params, enc, rng, _eos_array(eos_id), jnp.float32(temperature), jnp.int32(top_k),
                             jnp.float32(top_p), config=config, max_decode_length=max_decode_length, sample=True,
                             return_logits=False)
    return tokens


# -------------------------------------------------------------------------------------- beam search


class BeamSearchOutput(NamedTuple):
    """sequences [batch, num_beams, L] int32 best first; scores [batch, num_beams] f32 = log-prob / penalty."""

    sequences: Array
    scores: Array

    @property
    def best(self) -> Array:
        """[batch, L] highest-scoring sequence per row."""
        return self.sequences[:, 0]


def _cache_batch_axis(x: Array) -> int:
    """The batch axis of a cache entry: 1 in a scanned model's [layers, batch, G, length, head_dim] K/V, else 0."""
    return 1 if x.ndim == 5 else 0


def _reorder_cache(cache: Any, flat_index: Array) -> Any:
    """Reorder self-attention caches to follow the surviving beams. Cross-attention K/V are identical for all
    beams of a row and the step counter is a scalar, so both are left as they are. A scanned model's cache
    (ModelConfig.scan_layers) is [layers, batch, ...]: gathered per layer."""
    def fix(path, x):
        names = [getattr(p, "key", None) for p in path]
        if "self_attention" in names and x.ndim > 0:
            return jnp.take(x, flat_index, axis=_cache_batch_axis(x))
        return x
    return jax.tree_util.tree_map_with_path(fix, cache)


@functools.partial(jax.jit, static_argnames=("config", "max_decode_length", "num_beams"))
def _beam_search(params: Any, encoder_input_tokens: Array, alpha: Array, eos: Array, *, config: ModelConfig,
                 max_decode_length: int, num_beams: int) -> BeamSearchOutput:
    model = Transformer(config)
    b, k, length, vocab = encoder_input_tokens.shape[0], num_beams, max_decode_length, config.vocab_size
    enc = encoder_input_tokens
    encoded = _encode(model, params, enc)
    logits, cache = _prefill(model, params, encoded, enc, length)
    # Beams live in the batch dimension: row r, beam j -> r * k + j. Prefill once per row, then copy.
    tile = lambda x: jnp.repeat(x, k, axis=_cache_batch_axis(x)) if x.ndim > 0 else x  # noqa: E731
    cache, encoded, enc, logits = jax.tree.map(tile, (cache, encoded, enc, logits))

    def select(i, logits, st):
        alive_seqs, alive_logp, fin_seqs, fin_scores, fin_flags, cache = st
        logp = jax.nn.log_softmax(logits, axis=-1).reshape(b, k, vocab)
        cand = (alive_logp[:, :, None] + logp).reshape(b, k * vocab)
        # 2k candidates guarantee k that do not end in EOS.
        vals, idx = jax.lax.top_k(cand, 2 * k)
        src, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
        seqs = jnp.take_along_axis(alive_seqs, src[:, :, None], axis=1)
        seqs = jax.lax.dynamic_update_slice_in_dim(seqs, tok[:, :, None], i, axis=2)
        ends = tok == eos
        # Live beams: best k candidates that did not just end.
        live_vals, live_pos = jax.lax.top_k(vals + ends * NEG_INF, k)
        alive_seqs = jnp.take_along_axis(seqs, live_pos[:, :, None], axis=1)
        live_src = jnp.take_along_axis(src, live_pos, axis=1)
        flat = (jnp.arange(b)[:, None] * k + live_src).reshape(-1)
        cache = _reorder_cache(cache, flat)
        # Finished: candidates that just emitted EOS merge into the k best so far. As in HF, only an EOS ranked
        # among the top k candidates counts (so num_beams=1 reduces to greedy), and never one from a dead beam.
        rank = jnp.arange(2 * k)[None, :]
        new_flags = ends & (rank < k) & (vals > NEG_INF / 2)
        new_scores = jnp.where(new_flags, vals / length_penalty(i + 1, alpha), NEG_INF)
        all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)
        all_seqs = jnp.concatenate([fin_seqs, seqs], axis=1)
        all_flags = jnp.concatenate([fin_flags, new_flags], axis=1)
        fin_scores, pos = jax.lax.top_k(all_scores, k)
        fin_seqs = jnp.take_along_axis(all_seqs, pos[:, :, None], axis=1)
        fin_flags = jnp.take_along_axis(all_flags, pos, axis=1)
        return alive_seqs, live_vals, fin_seqs, fin_scores, fin_flags, cache

    init_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
    st = (jnp.zeros((b, k, length), jnp.int32), init_logp, jnp.zeros((b, k, length), jnp.int32),
          jnp.full((b, k), NEG_INF, jnp.float32), jnp.zeros((b, k), bool), cache)
    st = select(0, logits, st)
    max_penalty = length_penalty(length, alpha)

    def cond(state):
        i, (_, alive_logp, _, fin_scores, fin_flags, _) = state
        # With alpha >= 0 a live beam's score can at best become best_logp / penalty(L) (log-probs only fall).
        best_alive = jnp.max(alive_logp, axis=1) / max_penalty
        worst_fin = jnp.min(jnp.where(fin_flags, fin_scores, NEG_INF), axis=1)
        done = jnp.all(fin_flags, axis=1) & (best_alive < worst_fin)
        return (i < length) & ~jnp.all(done)

    def body(state):
        i, st = state
        alive_seqs, cache = st[0], st[5]
        prev = jax.lax.dynamic_index_in_dim(alive_seqs, i - 1, axis=2, keepdims=False).reshape(-1)
        logits, cache = decode_step(config)(params, cache, encoded, enc, prev)
        return i + 1, select(i, logits, st[:5] + (cache,))

    _, st = jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), st))
    alive_seqs, alive_logp, fin_seqs, fin_scores, _, _ = st
    # Live beams that reached max_decode_length without EOS are complete hypotheses too (scored at length L).
    # When the loop stopped early they cannot beat any finished beam, so merging them is always safe.
    alive_scores = jnp.where(alive_logp > NEG_INF / 2, alive_logp / max_penalty, NEG_INF)
    scores, pos = jax.lax.top_k(jnp.concatenate([fin_scores, alive_scores], axis=1), k)
    seqs = jnp.take_along_axis(jnp.concatenate([fin_seqs, alive_seqs], axis=1), pos[:, :, None], axis=1)
    return BeamSearchOutput(seqs, scores)


def beam_search(config: ModelConfig, params: Any, encoder_input_tokens: Any, max_decode_length: int,
                num_beams: int = 4, alpha: float = 0.6, eos_id: int | None = EOS_ID) -> BeamSearchOutput:
    """Beam search with the T5X length penalty: a finished hypothesis y scores log p(y) / ((5 + |y|) / 6)**alpha,
    |y| counting its EOS; hypotheses that reach max_decode_length without EOS compete with |y| = L.
    Returns BeamSearchOutput(sequences [batch, num_beams, L], scores [batch, num_beams]) best first.

    With alpha = 0 and num_beams = 1 this is exactly greedy decoding.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (the early-stopping bound assumes it), got {alpha}")
    if 2 * num_beams > num_beams * config.vocab_size:
        raise ValueError(f"vocab_size={config.vocab_size} is too small for beam search")
    enc = _check_inputs(config, encoder_input_tokens, max_decode_length)
    return _beam_search(params, enc, jnp.float32(alpha), _eos_array(eos_id), config=config,
                        max_decode_length=max_decode_length, num_beams=num_beams)


# ------------------------------------------------------------------------------------- one entry point


METHODS = ("greedy", "sample", "beam")


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown decoding method {method!r}; choose greedy, sample or beam")
    return method


def generate(config: ModelConfig, params: Any, encoder_input_tokens: Any, max_decode_length: int,
             method: str = "greedy", *, rng: Array | None = None, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, num_beams: int = 4, alpha: float = 0.6, eos_id: int | None = EOS_ID) -> Array:
    """Tokens [batch, max_decode_length] int32 with `method`: 'greedy' (greedy_decode), 'sample' (sample_decode
    with rng, default PRNGKey(0), temperature, top_k, top_p) or 'beam' (the best of beam_search's num_beams
    beams, length penalty alpha). The options of the other methods are ignored."""
    args = (config, params, encoder_input_tokens, max_decode_length)
    if _check_method(method) == "greedy":
        return greedy_decode(*args, eos_id=eos_id)
    if method == "sample":
        return sample_decode(*args, rng=jax.random.PRNGKey(0) if rng is None else rng, temperature=temperature,
                             top_k=top_k, top_p=top_p, eos_id=eos_id)
    return beam_search(*args, num_beams=num_beams, alpha=alpha, eos_id=eos_id).best


# ------------------------------------------------------------------------------------------- helpers


def sequence_mask(tokens: Any, eos_id: int = EOS_ID) -> Array:
    """[batch, L] bool: positions up to and including the first EOS (all positions if there is none)."""
    tokens = jnp.asarray(tokens)
    is_eos = (tokens == eos_id).astype(jnp.int32)
    eos_before = jnp.cumsum(is_eos, axis=-1) - is_eos
    return eos_before == 0


# ---------------------------------------------------------------------------------------- text in/out


def _bucket(n: int, minimum: int = 8) -> int:
    """Round a length up to a power of two so a stream of batches compiles only a few shapes."""
    size = minimum
    while size < n:
        size *= 2
    return size


def pad_batch(rows: Sequence[Sequence[int]], max_length: int | None = None) -> np.ndarray:
    """Token id lists -> int32 [batch, width] padded with 0; width is the longest row rounded up to a power of
    two (at least 8), capped at max_length (longer rows are truncated)."""
    width = _bucket(max(len(r) for r in rows))
    if max_length is not None:
        width = min(width, max_length)
    out = np.zeros((len(rows), width), np.int32)
    for r, ids in enumerate(rows):
        ids = list(ids)[:width]
        out[r, : len(ids)] = ids
    return out


class Generator:
    """Text in, text out over a seqio vocabulary (e.g. `gqa_uptrain.data.bundled_vocabulary()`).

    method: 'greedy' | 'sample' | 'beam'; options: temperature, top_k, top_p, seed (sample); num_beams, alpha
    (beam). Inputs are encoded with EOS appended (as the seqio tasks do), truncated to max_input_length and
    padded to a power-of-two length; outputs are cut at EOS and detokenised.
    """

    def __init__(self, config: ModelConfig, params: Any, vocabulary: Any, *, max_input_length: int = 512,
                 max_decode_length: int = 64, method: str = "greedy", temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, num_beams: int = 4, alpha: float = 0.6, seed: int = 0):
        _check_method(method)
        if vocabulary.vocab_size > config.vocab_size:
            raise ValueError(f"vocabulary has {vocabulary.vocab_size} ids but the model's vocab_size is "
                             f"{config.vocab_size}: wrong vocabulary for this checkpoint")
        self.config, self.params, self.vocabulary = config, params, vocabulary
        self.max_input_length, self.max_decode_length, self.method = max_input_length, max_decode_length, method
        self.sample_options = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.beam_options = dict(num_beams=num_beams, alpha=alpha)
        self._rng = jax.random.PRNGKey(seed)

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> int32 [batch, bucketed src_len] with EOS appended and 0 padding."""
        ids = [list(self.vocabulary.encode(t))[: self.max_input_length - 1] + [EOS_ID] for t in texts]
        return pad_batch(ids, self.max_input_length)

    def generate_tokens(self, encoder_input_tokens: Any) -> np.ndarray:
        """[batch, src_len] -> output ids [batch, max_decode_length] with the configured method."""
        options = {}
        if self.method == "sample":
            self._rng, options["rng"] = jax.random.split(self._rng)
            options.update(self.sample_options)
        elif self.method == "beam":
            options.update(self.beam_options)
        return np.asarray(generate(self.config, self.params, encoder_input_tokens, self.max_decode_length,
                                   self.method, **options))

    def decode_tokens(self, tokens: np.ndarray) -> list[str]:
        texts = []
        for row in np.asarray(tokens).tolist():
            row = row[: row.index(EOS_ID)] if EOS_ID in row else row
            texts.append(self.vocabulary.decode(row))
        return texts

    def generate(self, texts: Sequence[str]) -> list[str]:
        """One batch of input strings -> output strings."""
        if not texts:
            return []
        return self.decode_tokens(self.generate_tokens(self.encode_batch(texts)))

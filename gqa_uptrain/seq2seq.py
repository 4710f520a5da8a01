"""The encoder-decoder model as one object: initialisation, loss, scoring and prediction on a batch.

`EncoderDecoderModel` wraps the Flax `model.Transformer` the way T5X's `t5x/models.py` `EncoderDecoderModel` wraps
its module, so that everything that computes a number from parameters and a batch goes through one place:

  init / abstract_params    parameters (unboxed arrays) / boxed shapes, without allocating anything
  loss_fn                   training objective (T5X weighted cross-entropy + z-loss over the loss normalizing
                            factor) and the loss sums behind every reported loss; used by the training step
  loss_sums / evaluate      the same sums without dropout: the trainer's periodic eval, `gqa-uptrain eval` and
                            `convert --compare` all report `cross_entropy / weight` from them
  score_batch               teacher-forced log-likelihood per sequence (and per token)
  predict_batch             greedy / sampling / beam search, delegating to `gqa_uptrain.decode`

A batch is a dict of int32 [batch, length] arrays named as seqio's `EncDecFeatureConverter` names them:
encoder_input_tokens, decoder_input_tokens (the targets shifted right, starting from 0), decoder_target_tokens and
optionally decoder_loss_weights (default: decoder_target_tokens > 0) and the packing features
(encoder_segment_ids, decoder_segment_ids). Methods are pure functions of (params, batch): callers jit them
(the training step, `make_eval_step`, `evaluate`, `score_sequences`), so the compiled programs stay where they
were and nothing here adds a jit boundary of its own inside them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gqa_uptrain import decode
from gqa_uptrain.config import ModelConfig
from gqa_uptrain.model import Transformer, abstract_params, check_remat_policy, init_params

Array = jax.Array
Batch = Mapping[str, Any]

# loss_normalizing_factor: divide the summed loss by the number of non-padding target tokens of the global batch.
NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"
SUM_KEYS = ("cross_entropy", "z_loss", "correct", "weight")


def _argmax_last_axis(x: Array) -> Array:
    """[..., n] -> [...] int32: jnp.argmax(x, -1) for NaN-free x (the first index attaining the maximum), written as
    a max and a min reduction: XLA:CPU's variadic (value, index) argmax reduction took ~5 ms on the
    [16, 32, 4224] logits, several times the whole loss; the max is shared with logsumexp."""
    m = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == m, iota, x.shape[-1]), axis=-1)


def shift_right(targets: Any) -> np.ndarray:
    """decoder_target_tokens [batch, length] -> decoder_input_tokens: start token 0, then the targets but the
    last (what seqio's EncDecFeatureConverter computes for unpacked data)."""
    targets = np.asarray(targets, np.int32)
    return np.concatenate([np.zeros((targets.shape[0], 1), np.int32), targets[:, :-1]], axis=1)


def loss_weights(batch: Batch) -> Array:
    """decoder_loss_weights as float32 [batch, length]; without it, every non-padding target token counts."""
    targets = batch["decoder_target_tokens"]
    return jnp.asarray(batch.get("decoder_loss_weights", jnp.asarray(targets) > 0), jnp.float32)


def metrics_from_sums(sums: Mapping[str, Any]) -> dict[str, Any]:
    """Loss sums (SUM_KEYS) -> per-token means: loss (cross-entropy, nats), z_loss, accuracy, and the token count.

    Works on arrays (inside a jitted step) and on Python floats alike."""
    w = jnp.maximum(sums["weight"], 1.0) if isinstance(sums["weight"], jax.Array) else max(sums["weight"], 1.0)
    return {"loss": sums["cross_entropy"] / w, "z_loss": sums["z_loss"] / w, "accuracy": sums["correct"] / w,
            "target_tokens": sums["weight"]}


@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel:
    """A T5.1.1 encoder-decoder with its loss. Frozen and hashable: it can be a static jit argument.

    z_loss: coefficient of the z-loss term z_loss * logsumexp(logits)^2 (T5X); only the objective includes it,
      reported `loss` is always plain cross-entropy.
    loss_normalizing_factor: what the summed training loss is divided by: a number; NUM_REAL_TARGET_TOKENS (the
      non-padding target tokens of the batch); or None = batch * targets length of the batch given to `normalizer`
      (the Mesh TensorFlow / T5X fine-tuning convention, e.g. 2048 * 114 = 233472).
    remat_policy: activation rematerialisation per layer (model.REMAT_POLICIES); changes memory, never values.
    """

    config: ModelConfig
    z_loss: float = 0.0
    loss_normalizing_factor: float | str | None = None
    remat_policy: str = "none"

    def __post_init__(self) -> None:
        check_remat_policy(self.remat_policy)
        lnf = self.loss_normalizing_factor
        if isinstance(lnf, str) and lnf != NUM_REAL_TARGET_TOKENS:
            raise ValueError(f"loss_normalizing_factor must be a number, None or {NUM_REAL_TARGET_TOKENS!r}, "
                             f"got {lnf!r}")

    @property
    def module(self) -> Transformer:
        return Transformer(self.config, remat_policy=self.remat_policy)

    # ------------------------------------------------------------------------------------------ parameters

    def init(self, rng: Array) -> Any:
        """Parameters (unboxed arrays) with T5X's initialisers. Jit it with out_shardings to create them sharded."""
        return init_params(self.config, rng)

    def abstract_params(self) -> Any:
        """Boxed (LogicallyPartitioned) ShapeDtypeStructs of the parameters; nothing is allocated."""
        return abstract_params(self.config)

    # ---------------------------------------------------------------------------------------------- loss

    def compute_logits(self, params: Any, batch: Batch, dropout_rng: Array | None = None) -> Array:
        """Teacher-forced logits [batch, tgt_len, vocab] float32; dropout only with a dropout_rng (and a
        non-zero dropout_rate). Decoder padding comes from decoder_target_tokens (> 0)."""
        enable_dropout = dropout_rng is not None and self.config.dropout_rate > 0
        return self.module.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                                 batch["decoder_target_tokens"], batch.get("encoder_segment_ids"),
                                 batch.get("decoder_segment_ids"), enable_dropout=enable_dropout,
                                 rngs={"dropout": dropout_rng} if enable_dropout else None)

    def loss_sums(self, params: Any, batch: Batch, dropout_rng: Array | None = None) -> dict[str, Array]:
        """Sums over the weighted target tokens of one (micro)batch, each a float32 scalar: cross_entropy,
        z_loss (already times the coefficient), correct (argmax predictions equal to the target), weight."""
        logits = self.compute_logits(params, batch, dropout_rng)
        targets = batch["decoder_target_tokens"]
        weights = loss_weights(batch)
        logz = jax.nn.logsumexp(logits, axis=-1)  # [b, t]
        ce = logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return {"cross_entropy": jnp.sum(ce * weights),
                "z_loss": jnp.sum(self.z_loss * jnp.square(logz) * weights),
                "correct": jnp.sum((_argmax_last_axis(logits) == targets) * weights),
                "weight": jnp.sum(weights)}

    def normalizer(self, batch: Batch) -> Array:
        """The loss normalizing factor for this (global) batch, float32 scalar."""
        lnf = self.loss_normalizing_factor
        if lnf == NUM_REAL_TARGET_TOKENS:
            return jnp.maximum(jnp.sum(loss_weights(batch)), 1.0)
        if lnf is None:
            lnf = np.prod(np.shape(batch["decoder_target_tokens"]))
        return jnp.asarray(float(lnf), jnp.float32)

    def loss_fn(self, params: Any, batch: Batch, dropout_rng: Array | None,
                normalizer: Array | None = None) -> tuple[Array, dict[str, Array]]:
        """(objective, loss sums): objective = (cross-entropy + z-loss sums) / normalizer, what is differentiated.

        normalizer: default `self.normalizer(batch)`; a microbatch passes its global batch's, so that accumulated
        gradients equal those of the whole batch.
        """
        sums = self.loss_sums(params, batch, dropout_rng)
        if normalizer is None:
            normalizer = self.normalizer(batch)
        return (sums["cross_entropy"] + sums["z_loss"]) / normalizer, sums

    def evaluate_sums(self, params: Any, batches: Iterable[Batch]) -> dict[str, float]:
        """`loss_sums` (no dropout) summed over batches, as Python floats (accumulated on the host in float64).
        One compiled program per batch shape."""
        tot = dict.fromkeys(SUM_KEYS, 0.0)
        for batch in batches:
            for k, v in _jit_loss_sums(self, params, {k: jnp.asarray(v) for k, v in batch.items()}).items():
                tot[k] += float(v)
        if tot["weight"] <= 0:
            raise ValueError("no target tokens to evaluate")
        return tot

    def evaluate(self, params: Any, batches: Iterable[Batch]) -> dict[str, float]:
        """Held-out metrics over batches: loss (mean cross-entropy per target token), z_loss, accuracy,
        target_tokens."""
        return metrics_from_sums(self.evaluate_sums(params, batches))

    # -------------------------------------------------------------------------------------------- scoring

    def score_batch(self, params: Any, batch: Batch, return_intermediates: bool = False
                    ) -> Array | tuple[Array, dict[str, Array]]:
        """Teacher-forced log-likelihood of decoder_target_tokens: sequence scores [batch] f32, the sum over
        tokens of log p(target_t | target_<t, inputs) times decoder_loss_weights (default: every position).

        With return_intermediates also {'token_scores': weighted log-probs [batch, length], 'argmax': the
        model's most likely token at each position [batch, length] int32}.

        The decoder is not told where padding is: a 0 inside a decoded hypothesis is a token, not padding, and
        causality already keeps positions after a sequence's end from changing earlier ones.
        decoder_input_tokens defaults to the targets shifted right.
        """
        targets = jnp.asarray(batch["decoder_target_tokens"], jnp.int32)
        dec_in = batch.get("decoder_input_tokens")
        if dec_in is None:
            dec_in = jnp.concatenate([jnp.zeros((targets.shape[0], 1), jnp.int32), targets[:, :-1]], axis=1)
        logits = self.module.apply({"params": params}, batch["encoder_input_tokens"], dec_in)
        logp = jax.nn.log_softmax(logits, axis=-1)
        weights = jnp.asarray(batch.get("decoder_loss_weights", jnp.ones(targets.shape)), jnp.float32)
        token_scores = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * weights
        sequence_scores = jnp.sum(token_scores, axis=-1)
        if not return_intermediates:
            return sequence_scores
        return sequence_scores, {"token_scores": token_scores, "argmax": _argmax_last_axis(logits)}

    # ------------------------------------------------------------------------------------------ prediction

    def predict_batch(self, params: Any, batch: Batch, max_decode_length: int, method: str = "greedy",
                      **options: Any) -> Array:
        """Decoded tokens [batch, max_decode_length] int32 for batch['encoder_input_tokens'] (EOS kept, 0 after).

        method 'greedy', 'sample' (options rng, temperature, top_k, top_p) or 'beam' (num_beams, alpha; the best
        beam); eos_id in options. See `gqa_uptrain.decode.generate`.
        """
        return decode.generate(self.config, params, batch["encoder_input_tokens"], max_decode_length, method,
                               **options)


@functools.partial(jax.jit, static_argnums=0)
def _jit_loss_sums(model: EncoderDecoderModel, params: Any, batch: Batch) -> dict[str, Array]:
    return model.loss_sums(params, batch)


@functools.partial(jax.jit, static_argnums=0)
def _jit_token_scores(model: EncoderDecoderModel, params: Any, batch: Batch) -> tuple[Array, Array]:
    _, aux = model.score_batch(params, batch, return_intermediates=True)
    return aux["token_scores"], aux["argmax"]


def token_scores(config: ModelConfig, params: Any, encoder_input_tokens: Any, target_tokens: Any
                 ) -> tuple[Array, Array]:
    """Teacher-forced (log p of each target token [batch, tgt_len] f32, unmasked; argmax prediction
    [batch, tgt_len] int32), jitted. Mask with `decode.sequence_mask` (decoded hypotheses) or
    `target_tokens > 0` (padded references) before summing."""
    batch = {"encoder_input_tokens": jnp.asarray(encoder_input_tokens, jnp.int32),
             "decoder_target_tokens": jnp.asarray(target_tokens, jnp.int32)}
    return _jit_token_scores(EncoderDecoderModel(config), params, batch)


def score_sequences(config: ModelConfig, params: Any, encoder_input_tokens: Any, target_tokens: Any) -> Array:
    """Teacher-forced log p(target_t | target_<t, input) per position: [batch, tgt_len] f32, unmasked."""
    return token_scores(config, params, encoder_input_tokens, target_tokens)[0]


def batches_from_pairs(pairs: Iterable[tuple[Any, Any]], batch_size: int) -> list[dict[str, np.ndarray]]:
    """(input ids, target ids) pairs -> model batches of at most batch_size rows, in order, each padded with 0 to
    its longest row rounded up to a power of two (`decode.pad_batch`), decoder inputs shifted right."""
    pairs = list(pairs)
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        tgt = decode.pad_batch([t for _, t in chunk])
        out.append({"encoder_input_tokens": decode.pad_batch([x for x, _ in chunk]),
                    "decoder_input_tokens": shift_right(tgt), "decoder_target_tokens": tgt})
    return out

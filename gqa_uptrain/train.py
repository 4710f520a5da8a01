"""Trainer: seqio data -> sharded, jitted Adafactor steps -> orbax checkpoints, metrics and periodic eval.

One loop serves three run modes (gin files in configs/runs/): pre-training from scratch, the paper's uptraining
(restore converted GQA parameters, fresh optimiser state, continue T5's rsqrt schedule for a fraction alpha of the
original steps) and fine-tuning (constant learning rate, dropout).

Run directory (MODEL_DIR):
  config.json, model.gin            the model (so `checkpoint.load_params(MODEL_DIR)` works)
  train_config.json                 the resolved TrainConfig of the first launch
  checkpoints/<step>/{params,opt_state,data,data_iterators}   ocp.CheckpointManager items; `data` is JSON with the
                                    data position, `data_iterators` the tf.data iterator state of every process
                                    (with checkpoint_dataset; see gqa_uptrain/dataset_checkpoint.py)
  best/                             with keep_best: config.json + checkpoints/<step>/params, the parameters with the
                                    lowest eval loss so far (`checkpoint.load_params(MODEL_DIR/best)`)
  metrics.jsonl, tensorboard/       train / eval metrics

Determinism and resumption: the seqio pipeline is deterministic for a fixed seed (shuffle and span-corruption noise
are seeded), each step consumes exactly one global batch, and the dropout key is fold_in(seed, step). A checkpoint
stores the number of batches consumed and (checkpoint_dataset, the default) each process's tf.data iterator state; a
resumed run restores the iterators, or, when the checkpoint has no usable iterator state, rebuilds the pipeline and
skips that many batches. Either way it sees exactly the examples an uninterrupted run sees and ends with the same
parameters (bitwise on CPU).

Data sharding: the data is split into `num_data_shards` seqio shards (default: one per process); process p reads the
shards p*k ... p*k+k-1 (k = shards / processes) and contributes their batches, concatenated, as its rows of the
global batch. The global batch therefore depends on `num_data_shards`, not on how many processes read it, so a
1-process run with num_data_shards=2 sees exactly what a 2-process run sees.

Loss: T5X's weighted cross-entropy plus z-loss (z_loss * logsumexp(logits)^2), summed over target tokens and divided
by `loss_normalizing_factor`: a constant (default: batch_size * targets_length, the Mesh TensorFlow / T5X fine-tuning
convention, e.g. 2048*114 = 233472), or "NUM_REAL_TARGET_TOKENS" (the number of non-padding target tokens in the
global batch). Reported `loss` is always the per-token mean cross-entropy so runs are comparable.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from gqa_uptrain import preemption
from gqa_uptrain import sharding as sharding_lib
from gqa_uptrain.checkpoint import Manifest
from gqa_uptrain.config import ModelConfig
from gqa_uptrain.model import Transformer, abstract_params, check_remat_policy
from gqa_uptrain.optim import (OptimizerConfig, check_range, learning_rate_schedule, make_optimizer,
                               opt_state_shardings)

NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"
TRAIN_CONFIG_FILE = "train_config.json"
ITERATOR_STATE = "data_iterators"  # checkpoint item with the tf.data iterator state, and its key in the `data` item
BATCH_AXES = ("data", "fsdp")
MODEL_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                  "encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions")


class NonFiniteLossError(ValueError):
    """Training produced a NaN/Inf loss or gradient; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything about a training run except the model architecture (`ModelConfig`)."""

    model_dir: str
    # Data (seqio).
    mixture_or_task_name: str = "gqa_span_corruption"
    inputs_length: int = 512
    targets_length: int = 114
    pack: bool = False
    shuffle: bool = True
    batch_size: int = 128  # global, in sequences (packed sequences when pack=True)
    num_microbatches: int = 1  # gradient accumulation: batch_size / num_microbatches sequences per forward pass
    num_data_shards: int | None = None  # default: jax.process_count()
    seed: int = 0  # data order, span-corruption noise, dropout, and from-scratch initialisation
    # Length: explicit train_steps, or uptrain_fraction * original_steps.
    train_steps: int | None = None
    uptrain_fraction: float | None = None
    original_steps: int | None = None  # default: the source step recorded in INITIAL_CHECKPOINT's manifest
    # Initialisation: parameters only, used when MODEL_DIR has no checkpoint yet (never when resuming).
    initial_checkpoint: str | None = None
    continue_schedule: bool = False  # learning-rate schedule continues from original_steps (uptraining)
    # Optimisation.
    optimizer: OptimizerConfig = OptimizerConfig()
    z_loss: float = 1e-4
    loss_normalizing_factor: float | str | None = None  # None: batch_size * targets_length
    # Checkpoints.
    save_every: int = 1000
    keep_checkpoints: int | None = 3
    keep_best: bool = False  # also keep the parameters with the lowest eval loss in MODEL_DIR/best (needs eval)
    async_checkpointing: bool = True
    # Also save each process's tf.data iterator state, so a resumed run restores it instead of recomputing every
    # batch already consumed; costs the pipeline's buffers (mostly the shuffle buffer) per checkpoint and process.
    checkpoint_dataset: bool = True
    # Evaluation on fixed validation examples (0 disables).
    eval_every: int = 1000
    eval_examples: int = 64
    eval_split: str = "validation"
    # Logging.
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    # Scale: mesh over (data, fsdp, model), read by sharding.parse_mesh; "" = all devices on `data`.
    mesh: str = ""
    # Activation rematerialisation per encoder/decoder layer in the training step (model.REMAT_POLICIES: "none",
    # "full", "minimal", "dots"). Memory vs recomputation only: same loss, gradients and parameter tree.
    remat_policy: str = "none"

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise ValueError("TrainConfig.model_dir (MODEL_DIR) must be set")
        for name in ("inputs_length", "targets_length", "batch_size", "num_microbatches", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.num_microbatches:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} is not divisible by "
                             f"num_microbatches={self.num_microbatches}")
        if self.train_steps is None and self.uptrain_fraction is None:
            raise ValueError("set TRAIN_STEPS, or UPTRAIN_FRACTION (with ORIGINAL_STEPS or an INITIAL_CHECKPOINT "
                             "that records its pre-training step)")
        if self.uptrain_fraction is not None:
            check_range("UPTRAIN_FRACTION (TrainConfig.uptrain_fraction)", self.uptrain_fraction, 0, 1e6)
        check_range("Z_LOSS (TrainConfig.z_loss)", self.z_loss, 0, 1e6)
        lnf = self.loss_normalizing_factor
        if lnf is not None and not isinstance(lnf, str):
            check_range("LOSS_NORMALIZING_FACTOR (TrainConfig.loss_normalizing_factor)", lnf, 0, math.inf,
                         low_open=True)
        if isinstance(lnf, str) and lnf != NUM_REAL_TARGET_TOKENS:
            raise ValueError(f"TrainConfig.loss_normalizing_factor must be a number, None or "
                             f"{NUM_REAL_TARGET_TOKENS!r}, got {lnf!r}")
        check_remat_policy(self.remat_policy)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------------------ data


def _check_task(name: str) -> None:
    from gqa_uptrain import data  # registers the bundled tasks; imports seqio/TF quietly
    seqio = data.seqio
    if name not in seqio.TaskRegistry.names() and name not in seqio.MixtureRegistry.names():
        known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
        raise ValueError(f"seqio task or mixture {name!r} is not registered (MIXTURE_OR_TASK_NAME); "
                         f"registered: {', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")


def feature_lengths(cfg: TrainConfig) -> dict[str, int]:
    return {"inputs": cfg.inputs_length, "targets": cfg.targets_length}


def _converted_dataset(cfg: TrainConfig, split: str, shuffle: bool, num_epochs: int | None, shard: tuple[int, int]
                       | None, seed: int):
    from gqa_uptrain.tf_quiet import seqio  # via tf_quiet: a plain import prints TF start-up lines
    _check_task(cfg.mixture_or_task_name)
    shard_info = seqio.ShardInfo(index=shard[0], num_shards=shard[1]) if shard else None
    try:
        return seqio.get_dataset(cfg.mixture_or_task_name, task_feature_lengths=feature_lengths(cfg),
                                 dataset_split=split, shuffle=shuffle, num_epochs=num_epochs, shard_info=shard_info,
                                 seed=seed, use_cached=False,
                                 feature_converter=seqio.EncDecFeatureConverter(pack=cfg.pack))
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"cannot read split {split!r} of {cfg.mixture_or_task_name!r}: {e}") from None


def _to_model_batch(ex: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.int32) for k, v in ex.items() if k in MODEL_FEATURES}


class TrainBatches:
    """Iterator over this process's rows of the global batches: dicts of int32 [rows, length].

    Holds plain tf.data iterators (`iterators`, one per local data shard, named `shard_<s>_of_<n>`, in shard order)
    rather than numpy iterators, because those are what TensorFlow can checkpoint (gqa_uptrain/dataset_checkpoint.py).
    """

    def __init__(self, iterators: dict[str, Any]) -> None:
        self.iterators = iterators

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [_to_model_batch(next(it)) for it in self.iterators.values()]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def skip(self, n: int) -> None:
        """Advance past n global batches (the resume path without iterator state). Done on the iterators rather
        than with tf.data's `Dataset.skip`, which would add a node to the pipeline and make the iterator state
        saved later unrestorable into a fresh pipeline."""
        for it in self.iterators.values():
            for _ in range(n):
                next(it)


def train_batches(cfg: TrainConfig, start_batch: int = 0, process_index: int | None = None,
                  process_count: int | None = None) -> TrainBatches:
    """This process's rows of every global batch from `start_batch` on.

    rows = batch_size / process_count; batch n is the same whatever the process count (see module docstring).
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    shards = cfg.num_data_shards or pc
    if shards % pc or cfg.batch_size % shards:
        raise ValueError(f"num_data_shards={shards} must be a multiple of the process count {pc} and divide "
                         f"batch_size={cfg.batch_size}")
    per_shard = cfg.batch_size // shards
    k = shards // pc
    iterators = {}
    for s in range(pi * k, pi * k + k):
        ds = _converted_dataset(cfg, "train", cfg.shuffle, None, (s, shards), cfg.seed)
        iterators[f"shard_{s}_of_{shards}"] = iter(ds.batch(per_shard, drop_remainder=True))
    batches = TrainBatches(iterators)
    if start_batch:
        batches.skip(start_batch)
    return batches


def _iterator_state_key(cfg: TrainConfig, process_count: int) -> dict[str, Any]:
    """What saved iterator state depends on (recorded in the `data` item): the files each process holds and the
    pipeline they were saved from. tf.data itself only checks the pipeline's structure, not e.g. the lengths."""
    return {"process_count": process_count, "num_data_shards": cfg.num_data_shards or process_count,
            "batch_size": cfg.batch_size, "mixture_or_task_name": cfg.mixture_or_task_name,
            "inputs_length": cfg.inputs_length, "targets_length": cfg.targets_length, "pack": cfg.pack,
            "shuffle": cfg.shuffle, "seed": cfg.seed}


def skip_reason(cfg: TrainConfig, data_state: Mapping[str, Any], process_count: int) -> str | None:
    """None if a run resuming from a checkpoint with this `data` item restores the saved iterator state; otherwise
    why it rebuilds the pipeline and skips the consumed batches instead (always correct: the skip path only needs
    the global batch to be the same, which depends on num_data_shards and batch_size, not on the process count)."""
    if not cfg.checkpoint_dataset:
        return "CHECKPOINT_DATASET is False"
    saved = data_state.get(ITERATOR_STATE)
    if not saved:
        return "the checkpoint has no data iterator state (written with CHECKPOINT_DATASET=False or before it existed)"
    now = _iterator_state_key(cfg, process_count)
    diff = [k for k in now if saved.get(k) != now[k]]
    if diff:
        return ("its iterator state was saved with " + ", ".join(f"{k}={saved.get(k)!r}" for k in diff)
                + "; this run has " + ", ".join(f"{k}={now[k]!r}" for k in diff))
    return None


def eval_batches(cfg: TrainConfig) -> list[dict[str, np.ndarray]]:
    """The first `eval_examples` examples of the eval split (unshuffled, fixed noise), in global batches of
    `batch_size` padded with all-zero rows (zero loss weight). Every process holds all of them."""
    ds = _converted_dataset(cfg, cfg.eval_split, False, 1, None, cfg.seed)
    rows = [_to_model_batch(ex) for ex in ds.take(cfg.eval_examples).as_numpy_iterator()]
    if not rows:
        raise ValueError(f"split {cfg.eval_split!r} of {cfg.mixture_or_task_name!r} has no examples")
    out = []
    for i in range(0, len(rows), cfg.batch_size):
        chunk = rows[i:i + cfg.batch_size]
        batch = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
        pad = cfg.batch_size - len(chunk)
        out.append({k: np.pad(v, [(0, pad), (0, 0)]) for k, v in batch.items()})
    return out


# ------------------------------------------------------------------------------------------------------------ loss


def _argmax_last_axis(x: jax.Array) -> jax.Array:
    """[..., n] -> [...] int32: jnp.argmax(x, -1) for NaN-free x (the first index attaining the maximum), written as
    a max and a min reduction: XLA:CPU's variadic (value, index) argmax reduction took ~5 ms on the
    [16, 32, 4224] logits, several times the whole loss; the max is shared with logsumexp."""
    m = jnp.max(x, axis=-1, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == m, iota, x.shape[-1]), axis=-1)


def _loss_sums(config: ModelConfig, params: Any, batch: Mapping[str, jax.Array], dropout_rng: jax.Array | None,
               z_loss: float, remat_policy: str = "none") -> dict[str, jax.Array]:
    """Sums over the target tokens of one (micro)batch: cross-entropy, z-loss, correct predictions, weight.

    remat_policy only matters when this is differentiated (the training step); it never changes the values.
    """
    model = Transformer(config, remat_policy=remat_policy)
    enable_dropout = dropout_rng is not None
    logits = model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                         batch["decoder_target_tokens"], batch.get("encoder_segment_ids"),
                         batch.get("decoder_segment_ids"), enable_dropout=enable_dropout,
                         rngs={"dropout": dropout_rng} if enable_dropout else None)
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights", (targets > 0).astype(jnp.int32)).astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)  # [b, t]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = logz - target_logit
    return {"cross_entropy": jnp.sum(ce * weights), "z_loss": jnp.sum(z_loss * jnp.square(logz) * weights),
            "correct": jnp.sum((_argmax_last_axis(logits) == targets) * weights), "weight": jnp.sum(weights)}


def _normalizer(cfg: TrainConfig, batch: Mapping[str, jax.Array]) -> jax.Array:
    lnf = cfg.loss_normalizing_factor
    if lnf == NUM_REAL_TARGET_TOKENS:
        w = batch.get("decoder_loss_weights", (batch["decoder_target_tokens"] > 0).astype(jnp.int32))
        return jnp.maximum(jnp.sum(w.astype(jnp.float32)), 1.0)
    return jnp.asarray(float(lnf) if lnf is not None else float(cfg.batch_size * cfg.targets_length), jnp.float32)


def _microbatches(batch: Mapping[str, jax.Array], m: int, mesh_axes: Any) -> dict[str, jax.Array]:
    """[B, L] -> [m, B/m, L], microbatch j = rows j, j+m, ...: every device keeps its rows (no resharding)."""
    def split(x):
        x = x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, PartitionSpec(None, mesh_axes)) if mesh_axes else x
    return {k: split(v) for k, v in batch.items()}


def make_train_step(model_config: ModelConfig, cfg: TrainConfig, optimizer: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array], batch_mesh_axes: Any = None
                    ) -> Callable[[Any, Any, jax.Array, dict], tuple[Any, Any, jax.Array, dict]]:
    """(params, opt_state, step, batch) -> (params, opt_state, step + 1, metrics); not yet jitted.

    batch: dict of int32 [batch_size, length]; gradients are accumulated over `num_microbatches` with lax.scan.
    """
    m = cfg.num_microbatches
    use_dropout = model_config.dropout_rate > 0

    def loss_fn(params, mb, rng, normalizer):
        sums = _loss_sums(model_config, params, mb, rng if use_dropout else None, cfg.z_loss, cfg.remat_policy)
        return (sums["cross_entropy"] + sums["z_loss"]) / normalizer, sums

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def step_fn(params, opt_state, step, batch):
        rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step)
        normalizer = _normalizer(cfg, batch)
        mbs = _microbatches(batch, m, batch_mesh_axes)

        def body(carry, xs):
            i, mb = xs
            g, sums = grad_fn(params, mb, jax.random.fold_in(rng, i), normalizer)
            return jax.tree.map(jnp.add, carry, (g, sums)), None

        zeros = (jax.tree.map(jnp.zeros_like, params),
                 {k: jnp.zeros((), jnp.float32) for k in ("cross_entropy", "z_loss", "correct", "weight")})
        (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(m), mbs))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        w = jnp.maximum(sums["weight"], 1.0)
        metrics = {"loss": sums["cross_entropy"] / w, "z_loss": sums["z_loss"] / w, "accuracy": sums["correct"] / w,
                   "objective": (sums["cross_entropy"] + sums["z_loss"]) / normalizer,
                   "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(step),
                   "target_tokens": sums["weight"]}
        return params, opt_state, step + 1, metrics

    return step_fn


def batch_shardings(cfg: TrainConfig, mesh: jax.sharding.Mesh) -> tuple[NamedSharding, NamedSharding]:
    """(sharding of a [batch_size, length] batch array, replicated sharding) for this mesh; checks that the
    batch splits evenly over data*fsdp and the microbatches."""
    mesh_shape = dict(mesh.shape)
    n_batch_shards = math.prod(mesh_shape.get(a, 1) for a in BATCH_AXES)
    if cfg.batch_size % (n_batch_shards * cfg.num_microbatches):
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by data*fsdp={n_batch_shards} times "
                         f"num_microbatches={cfg.num_microbatches}")
    return (NamedSharding(mesh, PartitionSpec(sharding_lib.batch_mesh_axes(mesh_shape))),
            NamedSharding(mesh, PartitionSpec()))


def jit_train_step(model_config: ModelConfig, cfg: TrainConfig, optimizer: optax.GradientTransformation,
                   schedule: Callable[[jax.Array], jax.Array], mesh: jax.sharding.Mesh, param_sh: Any,
                   opt_sh: Any) -> Callable:
    """The jitted training step `train` runs, with its shardings and donation. One definition shared with
    ahead-of-time compilation (gqa_uptrain/aot.py), so what is compiled for a TPU topology is what trains.
    Trace it (call or .lower) inside `jax.set_mesh(mesh)` and `nn.logical_axis_rules(DEFAULT_RULES)`."""
    batch_sharding, replicated = batch_shardings(cfg, mesh)
    step_fn = make_train_step(model_config, cfg, optimizer, schedule, sharding_lib.batch_mesh_axes(dict(mesh.shape)))
    return jax.jit(step_fn, in_shardings=(param_sh, opt_sh, replicated, batch_sharding),
                   out_shardings=(param_sh, opt_sh, replicated, replicated), donate_argnums=(0, 1))


def make_eval_step(model_config: ModelConfig, cfg: TrainConfig) -> Callable[[Any, dict], dict]:
    # No cfg.remat_policy here: eval has no backward pass, so there is nothing to rematerialise.
    def eval_fn(params, batch):
        return _loss_sums(model_config, params, batch, None, cfg.z_loss)
    return eval_fn


# ------------------------------------------------------------------------------------------------------------ state


@dataclasses.dataclass
class TrainResult:
    params: Any
    opt_state: Any
    step: int
    metrics: list[dict[str, Any]]  # one record per logged train step of this process's run
    eval_metrics: list[dict[str, Any]]
    resumed_from: int | None
    # How a resumed run got its data position: "restored" (iterator state) or "skipped" (pipeline rebuilt).
    data_resume: str | None = None


def recorded_source_step(directory: str) -> int | None:
    """The pre-training step a checkpoint directory's manifest.json records, if any (a training MODEL_DIR has
    no manifest, so None)."""
    manifest = Manifest.read(directory)
    return manifest.pretrain_step if manifest else None


def resolve_length(cfg: TrainConfig, source_manifest: Manifest | None) -> tuple[int, int | None]:
    """(train_steps, original_steps): explicit TRAIN_STEPS wins; else round(alpha * original_steps), with
    ORIGINAL_STEPS or else the pre-training step INITIAL_CHECKPOINT's manifest records."""
    original = cfg.original_steps or (source_manifest.pretrain_step if source_manifest is not None else None)
    if cfg.train_steps is not None:
        return int(cfg.train_steps), original
    if original is None:
        raise ValueError("UPTRAIN_FRACTION needs the original pre-training steps: set ORIGINAL_STEPS, or use an "
                         "INITIAL_CHECKPOINT whose manifest.json records its source step")
    return max(1, int(round(cfg.uptrain_fraction * original))), original


def describe_run(cfg: TrainConfig, train_steps: int, original_steps: int | None, mesh_shape: Mapping[str, int],
                 resumed_from: int | None, model_dir: pathlib.Path) -> str:
    """One line saying what this run will do, printed before the first step: a wrong MODEL_DIR, a step count not
    derived as intended or an unexpected fresh start is visible before any compute is spent."""
    if cfg.train_steps is not None:
        how = "TRAIN_STEPS"
    else:
        src = "ORIGINAL_STEPS" if cfg.original_steps else "the source checkpoint's recorded step"
        how = f"α={cfg.uptrain_fraction:g} x {original_steps} original steps, from {src}"
    start = (f"resuming from step {resumed_from}" if resumed_from is not None
             else f"fresh from {cfg.initial_checkpoint}" if cfg.initial_checkpoint else "fresh from random init")
    mesh = " ".join(f"{k}={v}" for k, v in mesh_shape.items())
    return (f"train: {train_steps} steps ({how}); {start}; task {cfg.mixture_or_task_name}; batch {cfg.batch_size} "
            f"x lengths {cfg.inputs_length}/{cfg.targets_length}{' packed' if cfg.pack else ''}; mesh {mesh}; "
            f"into {model_dir}")


def _global_from_host(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


BEST_DIR = "best"


def _best_manager(model_dir: pathlib.Path, cfg: TrainConfig):
    """Parameters of the lowest-eval-loss step: orbax keeps the single best of the saves it is given."""
    import orbax.checkpoint as ocp
    from gqa_uptrain.checkpoint import TRAIN_CHECKPOINTS_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["loss"], best_mode="min",
                                           create=True, enable_async_checkpointing=cfg.async_checkpointing)
    return ocp.CheckpointManager((model_dir / BEST_DIR / TRAIN_CHECKPOINTS_DIR).absolute(),
                                 item_names=("params",), options=options)


def _checkpoint_manager(model_dir: pathlib.Path, cfg: TrainConfig):
    import orbax.checkpoint as ocp
    from gqa_uptrain.checkpoint import TRAIN_CHECKPOINTS_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True,
                                           enable_async_checkpointing=cfg.async_checkpointing)
    return ocp.CheckpointManager((model_dir / TRAIN_CHECKPOINTS_DIR).absolute(),
                                 item_names=("params", "opt_state", "data", ITERATOR_STATE), options=options)


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ------------------------------------------------------------------------------------------------------------ loop


def train(model_config: ModelConfig, cfg: TrainConfig, *, devices: list | None = None,
          callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run (or resume) training into cfg.model_dir until cfg's number of steps; returns the final state.

    Resumes automatically from the latest complete checkpoint in MODEL_DIR/checkpoints; otherwise initialises
    parameters from cfg.initial_checkpoint (parameters only, fresh optimiser state) or from scratch.
    Raises NonFiniteLossError on a NaN/Inf loss or gradient norm (after the pending checkpoint save completes).
    """
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from gqa_uptrain import checkpoint as ckpt_lib
    from gqa_uptrain import dataset_checkpoint
    from gqa_uptrain import recovery
    from gqa_uptrain.metrics import MetricWriter, has_record, truncate_metrics

    model_dir = pathlib.Path(cfg.model_dir).absolute()
    primary = jax.process_index() == 0
    devices = list(devices if devices is not None else jax.devices())
    mesh = sharding_lib.make_mesh(cfg.mesh, devices, flag="MESH (TrainConfig.mesh)")
    mesh_shape = dict(mesh.shape)
    rules = sharding_lib.DEFAULT_RULES
    batch_sharding, replicated = batch_shardings(cfg, mesh)

    # MODEL_DIR must describe the same model when it already exists.
    if (model_dir / ckpt_lib.CONFIG_FILE).exists():
        existing = ckpt_lib.read_config(model_dir)
        # Dropout, activation dtype and layer scanning change the run, not the parameters.
        same = dict(dropout_rate=0.0, dtype="float32", scan_layers=False)
        if existing.replace(**same) != model_config.replace(**same):
            raise ValueError(f"{model_dir / ckpt_lib.CONFIG_FILE} describes a different model than this run's "
                             "model config; use a new MODEL_DIR")

    boxed = abstract_params(model_config)
    param_sh = sharding_lib.param_shardings(boxed, mesh, rules, head_dim=model_config.head_dim)
    param_shapes = nn.meta.unbox(boxed)

    if cfg.initial_checkpoint:
        ckpt_lib.check_disjoint(cfg.initial_checkpoint, model_dir, "INITIAL_CHECKPOINT", "MODEL_DIR")
    mngr = _checkpoint_manager(model_dir, cfg)
    # Newest checkpoint that restores; damaged ones are moved aside (gqa_uptrain/recovery.py). The optimiser
    # state's tree does not depend on the schedule offset read from `data`, so cfg.optimizer gives its shapes.
    probe_abstract, probe_sh = opt_state_shardings(make_optimizer(cfg.optimizer), param_sh, param_shapes, mesh,
                                                   cfg.optimizer.min_dim_size_to_factor)
    latest, restored = recovery.restore_newest_good(mngr, model_dir, lambda s: mngr.restore(s, args=ocp.args.Composite(
        data=ocp.args.JsonRestore(), params=ocp.args.StandardRestore(_with_shardings(param_shapes, param_sh)),
        opt_state=ocp.args.StandardRestore(_with_shardings(probe_abstract, probe_sh)))), primary)
    if latest is not None:
        data_state = restored["data"]
        if primary:  # the steps after the checkpoint are run again: drop their records
            truncate_metrics(model_dir, latest)
        train_steps, original_steps = int(data_state["train_steps"]), data_state.get("original_steps")
        if cfg.train_steps is not None and cfg.train_steps != train_steps:
            train_steps = int(cfg.train_steps)  # allow extending a finished run with a larger TRAIN_STEPS
        shards = cfg.num_data_shards or jax.process_count()
        if data_state.get("num_data_shards") != shards or data_state.get("batch_size") != cfg.batch_size:
            raise ValueError(f"checkpoint step {latest} in {model_dir} was written with batch_size="
                             f"{data_state.get('batch_size')}, num_data_shards={data_state.get('num_data_shards')}; "
                             f"this run has {cfg.batch_size}, {shards}: resuming would change the data order")
        schedule_offset = int(data_state.get("schedule_offset", 0))
        start_step = int(data_state["step"])
        data_skip_reason = skip_reason(cfg, data_state, jax.process_count())
    else:
        source_manifest = Manifest.read(cfg.initial_checkpoint) if cfg.initial_checkpoint else None
        train_steps, original_steps = resolve_length(cfg, source_manifest)
        if cfg.continue_schedule and not original_steps:
            raise ValueError("continue_schedule needs ORIGINAL_STEPS or an INITIAL_CHECKPOINT recording its step")
        schedule_offset = int(original_steps) if cfg.continue_schedule else cfg.optimizer.step_offset

    opt_cfg = dataclasses.replace(cfg.optimizer, step_offset=schedule_offset)
    optimizer = make_optimizer(opt_cfg)
    schedule = learning_rate_schedule(opt_cfg)
    opt_abstract, opt_sh = opt_state_shardings(optimizer, param_sh, param_shapes, mesh,
                                               opt_cfg.min_dim_size_to_factor)

    # Host copy of the initial parameters, read before the mesh context (orbax restores them unsharded).
    loaded = None
    if latest is None and cfg.initial_checkpoint:
        loaded = ckpt_lib.load_params(cfg.initial_checkpoint)
        ckpt_lib.check_params_match_config(loaded.params, model_config, source=str(cfg.initial_checkpoint))

    resumed_from = data_resume = None
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if latest is not None:
            params, opt_state = restored["params"], restored["opt_state"]
            resumed_from = start_step
            if data_skip_reason is None:
                batches = train_batches(cfg)
                try:
                    mngr.restore(latest, args=ocp.args.Composite(**{
                        ITERATOR_STATE: dataset_checkpoint.DatasetIteratorRestore(batches.iterators)}))
                except (ValueError, FileNotFoundError) as e:
                    raise ValueError(f"checkpoint step {latest}: {str(e).splitlines()[0]} (resume with "
                                     "--gin.CHECKPOINT_DATASET=False to rebuild the pipeline and skip "
                                     "instead)") from None
                data_resume, how = "restored", "data iterators restored from the checkpoint"
            else:
                batches = train_batches(cfg, start_batch=start_step)
                data_resume = "skipped"
                how = f"rebuilt the data pipeline and skipped {start_step} batches, as {data_skip_reason}"
            if primary:
                print(f"resuming from step {start_step} in {model_dir}: {how}", file=sys.stderr, flush=True)
        else:
            if loaded is not None:
                params = jax.tree.map(lambda x, s, a: _global_from_host(np.asarray(x, a.dtype), s),
                                      loaded.params, param_sh, param_shapes)
            else:
                init = jax.jit(lambda rng: nn.meta.unbox(Transformer(model_config).init(
                    rng, jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32))["params"]),
                    out_shardings=param_sh)
                params = init(jax.random.PRNGKey(cfg.seed))
            opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
            start_step = 0
            batches = train_batches(cfg)
            if primary:
                model_dir.mkdir(parents=True, exist_ok=True)
                ckpt_lib.write_config_files(model_dir, model_config)
                (model_dir / TRAIN_CONFIG_FILE).write_text(json.dumps(
                    {**cfg.to_dict(), "resolved_train_steps": train_steps, "resolved_original_steps": original_steps,
                     "schedule_offset": schedule_offset}, indent=2, sort_keys=True, default=str) + "\n")

        if primary:
            print(describe_run(cfg, train_steps, original_steps, mesh_shape, resumed_from, model_dir),
                  file=sys.stderr, flush=True)
        train_step = jit_train_step(model_config, cfg, optimizer, schedule, mesh, param_sh, opt_sh)
        eval_step = jax.jit(make_eval_step(model_config, cfg), in_shardings=(param_sh, batch_sharding),
                            out_shardings=replicated)

        def data_state(step: int) -> dict[str, Any]:
            return {"step": step, "batches_consumed": step, "train_steps": train_steps,
                    "original_steps": original_steps, "schedule_offset": schedule_offset, "seed": cfg.seed,
                    "batch_size": cfg.batch_size, "num_data_shards": cfg.num_data_shards or jax.process_count(),
                    "mixture_or_task_name": cfg.mixture_or_task_name,
                    ITERATOR_STATE: _iterator_state_key(cfg, jax.process_count()) if cfg.checkpoint_dataset
                    else None}

        def ensure_finite(step: int) -> None:
            # On device, before anything is written: a checkpoint never holds NaN/Inf, so the last saved step
            # really is the last good one.
            if not bool(recovery.all_finite(params, opt_state)):
                mngr.wait_until_finished()
                raise NonFiniteLossError(
                    f"non-finite parameters or optimizer state after step {step}; not saved. Last good checkpoint: "
                    f"{'step ' + str(last_saved) if last_saved is not None else 'none'} in "
                    f"{model_dir / ckpt_lib.TRAIN_CHECKPOINTS_DIR}. Lower the learning rate or check the data.")

        def save(step: int) -> None:
            ensure_finite(step)
            items = {"params": ocp.args.StandardSave(params), "opt_state": ocp.args.StandardSave(opt_state),
                     "data": ocp.args.JsonSave(data_state(step))}
            if cfg.checkpoint_dataset:
                # Written before save() returns (a synchronous item): `batches` has yielded exactly `step` batches.
                items[ITERATOR_STATE] = dataset_checkpoint.DatasetIteratorSave(batches.iterators)
            mngr.save(step, args=ocp.args.Composite(**items), force=True)

        writer = MetricWriter(model_dir, enabled=primary, tensorboard=cfg.tensorboard)
        evals = eval_batches(cfg) if cfg.eval_every and cfg.eval_examples else []
        if cfg.keep_best and not evals:
            raise ValueError("keep_best needs evaluation: set EVAL_EVERY and EVAL_EXAMPLES > 0")
        best_mngr = _best_manager(model_dir, cfg) if cfg.keep_best else None
        if best_mngr is not None and primary:
            ckpt_lib.write_config_files(model_dir / BEST_DIR, model_config)
        eval_arrays = [{k: _global_from_host(v, batch_sharding) for k, v in b.items()} for b in evals]

        def run_eval(step: int) -> dict[str, float]:
            tot: dict[str, float] = {}
            for b in eval_arrays:
                for k, v in eval_step(params, b).items():
                    tot[k] = tot.get(k, 0.0) + float(v)
            w = max(tot.get("weight", 0.0), 1.0)
            rec = {"loss": tot["cross_entropy"] / w, "z_loss": tot["z_loss"] / w, "accuracy": tot["correct"] / w,
                   "target_tokens": tot["weight"]}
            writer.write(step, rec, split="eval")
            return rec

        history: list[dict[str, Any]] = []
        eval_history: list[dict[str, Any]] = []
        step = start_step
        step_arr = _global_from_host(np.asarray(step, np.int32), replicated)
        local_rows = cfg.batch_size // jax.process_count()
        tokens_per_step = cfg.batch_size * (cfg.inputs_length + cfg.targets_length)
        bar = tqdm(total=train_steps, initial=step, desc="train", unit="step", disable=not (primary and cfg.progress),
                   dynamic_ncols=True)
        last_saved = latest
        t_last, steps_since = time.perf_counter(), 0
        try:
            if (resumed_from is not None and eval_arrays and step and (step % cfg.eval_every == 0
                                                                         or step == train_steps)
                    and jax.process_count() == 1 and not has_record(model_dir, step, "eval")):
                # The run that saved this step was stopped before its evaluation was written. (Single process:
                # every process must agree to run the collective eval, and only process 0 reads metrics.jsonl.)
                eval_history.append({"step": step, **run_eval(step)})
            while step < train_steps:
                local = next(batches)
                batch = {k: jax.make_array_from_process_local_data(batch_sharding, v, (cfg.batch_size, v.shape[1]))
                         for k, v in local.items()}
                assert next(iter(local.values())).shape[0] == local_rows
                params, opt_state, step_arr, metrics = train_step(params, opt_state, step_arr, batch)
                step += 1
                steps_since += 1
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not (math.isfinite(host["loss"]) and math.isfinite(host["grad_norm"])
                        and math.isfinite(host["objective"])):
                    mngr.wait_until_finished()
                    raise NonFiniteLossError(
                        f"non-finite loss={host['loss']} / grad_norm={host['grad_norm']} at step {step}; training "
                        f"stopped without saving. Last good checkpoint: "
                        f"{'step ' + str(last_saved) if last_saved is not None else 'none'} in "
                        f"{model_dir / ckpt_lib.TRAIN_CHECKPOINTS_DIR}. Lower the learning rate or check the data.")
                if callback is not None:
                    callback(step, host)
                if step % cfg.log_every == 0 or step == train_steps:
                    now = time.perf_counter()
                    dt = max(now - t_last, 1e-9)
                    rec = {**host, "steps_per_second": steps_since / dt,
                           "tokens_per_second": steps_since * tokens_per_step / dt}
                    writer.write(step, rec)
                    history.append({"step": step, **rec})
                    bar.set_postfix(loss=f"{host['loss']:.4f}", tok_s=f"{rec['tokens_per_second']:.0f}")
                    t_last, steps_since = now, 0
                bar.update(1)
                if step % cfg.save_every == 0 or step == train_steps:
                    save(step)
                    last_saved = step
                if eval_arrays and (step % cfg.eval_every == 0 or step == train_steps):
                    eval_history.append({"step": step, **run_eval(step)})
                    if best_mngr is not None:
                        ensure_finite(step)
                        best_mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                                       metrics={"loss": eval_history[-1]["loss"]}, force=True)
                # SIGTERM / SIGUSR1 (preemption, time limit): checkpoint now and stop; a re-run resumes here.
                if step < train_steps and (signum := preemption.stop_requested()) is not None:
                    if last_saved != step:
                        save(step)
                    mngr.wait_until_finished()
                    raise preemption.Preempted(step, signum)
            if last_saved != step:
                save(step)
            mngr.wait_until_finished()
            if best_mngr is not None:
                best_mngr.wait_until_finished()
        finally:
            bar.close()
            writer.close()
            mngr.close()
            if best_mngr is not None:
                best_mngr.close()
    return TrainResult(params, opt_state, step, history, eval_history, resumed_from, data_resume)

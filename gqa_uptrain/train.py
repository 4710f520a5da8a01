"""Training: seqio data -> sharded, jitted Adafactor steps -> orbax checkpoints, metrics and periodic eval.

`train()` is the entry point. It wires this module's data, loss and step functions to the run's start
(gqa_uptrain/train_state.py: resume, converted checkpoint or random init), the loop (gqa_uptrain/trainer.py: steps,
metrics fetched at log steps, eval, saves, keep-best, stop signals) and the checkpoint managers
(gqa_uptrain/run_checkpoints.py).

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

Loss (`seq2seq.EncoderDecoderModel.loss_fn`): T5X's weighted cross-entropy plus z-loss (z_loss *
logsumexp(logits)^2), summed over target tokens and divided by `loss_normalizing_factor`: a constant (default:
batch_size * targets_length, the Mesh TensorFlow / T5X fine-tuning convention, e.g. 2048*114 = 233472), or
"NUM_REAL_TARGET_TOKENS" (the number of non-padding target tokens in the global batch). Reported `loss` is always the
per-token mean cross-entropy so runs are comparable. The periodic eval scores a fixed validation set (noise seed
`data.VALIDATION_SEED`, not SEED) with the same model loss, so it prints what `gqa-uptrain eval` prints.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from gqa_uptrain import sharding as sharding_lib
from gqa_uptrain import train_state
from gqa_uptrain import trainer as trainer_lib
from gqa_uptrain.config import ModelConfig
from gqa_uptrain.model import abstract_params, check_remat_policy
from gqa_uptrain.seq2seq import NUM_REAL_TARGET_TOKENS, SUM_KEYS, EncoderDecoderModel, metrics_from_sums
from gqa_uptrain.optim import OptimizerConfig, check_range
from gqa_uptrain.run_checkpoints import BEST_DIR, ITERATOR_STATE, RunCheckpoints
BATCH_AXES = ("data", "fsdp")
MODEL_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
                  "encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions")


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
    # Initialisation: used when MODEL_DIR has no checkpoint yet (never when resuming).
    initial_checkpoint: str | None = None
    continue_schedule: bool = False  # learning-rate schedule continues from original_steps (uptraining)
    # Restore the Adafactor state INITIAL_CHECKPOINT carries (`convert --carry-optimizer-state`); False (or a
    # checkpoint without one) starts the optimizer fresh, as the paper does.
    restore_optimizer_state: bool = True
    # Optimisation.
    optimizer: OptimizerConfig = OptimizerConfig()
    z_loss: float = 1e-4
    loss_normalizing_factor: float | str | None = None  # None: batch_size * targets_length
    # Checkpoints.
    save_every: int = 1000
    keep_checkpoints: int | None = 3
    # Extra steps to save and keep whatever KEEP_CHECKPOINTS says (e.g. the α points of one uptraining run that a
    # sweep evaluates, gqa_uptrain/sweep.py); positive and <= the run's length. Saving changes no parameter.
    save_steps: tuple[int, ...] = ()
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
        steps = self.save_steps
        if isinstance(steps, int) or not all(isinstance(x, int) and not isinstance(x, bool) for x in steps):
            raise ValueError(f"TrainConfig.save_steps (SAVE_STEPS) must be a tuple of step numbers, got {steps!r}")
        object.__setattr__(self, "save_steps", tuple(sorted(set(steps))))
        if self.train_steps is not None:
            train_state.check_save_steps(self.save_steps, self.train_steps)

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
    """The validation set: the first `eval_examples` examples of the eval split, unshuffled, with the
    span-corruption noise drawn from `data.VALIDATION_SEED` (not the training seed), so every run, whatever its
    SEED, and `gqa-uptrain eval` score the same examples. In global batches of `batch_size` padded with all-zero
    rows (zero loss weight). Every process holds all of them."""
    from gqa_uptrain.data import VALIDATION_SEED
    ds = _converted_dataset(cfg, cfg.eval_split, False, 1, None, VALIDATION_SEED)
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


def seq2seq_model(model_config: ModelConfig, cfg: TrainConfig) -> EncoderDecoderModel:
    """The model object whose loss_fn the training step differentiates and whose loss_sums the eval step reports."""
    return EncoderDecoderModel(model_config, z_loss=cfg.z_loss, loss_normalizing_factor=cfg.loss_normalizing_factor,
                               remat_policy=cfg.remat_policy)


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
    model = seq2seq_model(model_config, cfg)
    grad_fn = jax.grad(model.loss_fn, has_aux=True)

    def step_fn(params, opt_state, step, batch):
        rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step)
        normalizer = model.normalizer(batch)
        mbs = _microbatches(batch, m, batch_mesh_axes)

        def body(carry, xs):
            i, mb = xs
            g, sums = grad_fn(params, mb, jax.random.fold_in(rng, i), normalizer)
            return jax.tree.map(jnp.add, carry, (g, sums)), None

        zeros = (jax.tree.map(jnp.zeros_like, params), {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS})
        (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(m), mbs))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {**metrics_from_sums(sums), "objective": (sums["cross_entropy"] + sums["z_loss"]) / normalizer,
                   "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(step)}
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
    """(params, batch) -> the model's loss sums without dropout; not yet jitted."""
    # No remat: eval has no backward pass, so there is nothing to rematerialise.
    return dataclasses.replace(seq2seq_model(model_config, cfg), remat_policy="none").loss_sums


# ------------------------------------------------------------------------------------------------------------ state

# Where a run starts lives in gqa_uptrain/train_state.py, the loop in gqa_uptrain/trainer.py; these names stay here.
TRAIN_CONFIG_FILE = train_state.TRAIN_CONFIG_FILE
recorded_source_step = train_state.recorded_source_step
resolve_length = train_state.resolve_length
describe_run = train_state.describe_run
NonFiniteLossError = trainer_lib.NonFiniteLossError


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


# ------------------------------------------------------------------------------------------------------------ loop


def train(model_config: ModelConfig, cfg: TrainConfig, *, devices: list | None = None,
          callback: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run (or resume) training into cfg.model_dir until cfg's number of steps; returns the final state.

    Resumes automatically from the latest complete checkpoint in MODEL_DIR/checkpoints; otherwise initialises
    parameters from cfg.initial_checkpoint (fresh optimiser state, unless the checkpoint carries Adafactor's and
    cfg.restore_optimizer_state) or from scratch (gqa_uptrain/train_state.py); the loop is gqa_uptrain/trainer.py.
    `callback(step, record)` is called with each logged train record (every LOG_EVERY steps and at the last step).
    Raises NonFiniteLossError on a NaN/Inf loss or gradient norm, detected at the next log step, save or eval
    (after the pending checkpoint save completes).
    """
    from gqa_uptrain import checkpoint as ckpt_lib

    model_dir = pathlib.Path(cfg.model_dir).absolute()
    primary = jax.process_index() == 0
    devices = list(devices if devices is not None else jax.devices())
    mesh = sharding_lib.make_mesh(cfg.mesh, devices, flag="MESH (TrainConfig.mesh)")
    rules = sharding_lib.DEFAULT_RULES
    batch_sharding, replicated = batch_shardings(cfg, mesh)
    train_state.check_model_dir(model_dir, model_config)
    boxed = abstract_params(model_config)
    param_sh = sharding_lib.param_shardings(boxed, mesh, rules, head_dim=model_config.head_dim)
    if cfg.initial_checkpoint:
        ckpt_lib.check_disjoint(cfg.initial_checkpoint, model_dir, "INITIAL_CHECKPOINT", "MODEL_DIR")
    evals = eval_batches(cfg) if cfg.eval_every and cfg.eval_examples else []
    if cfg.keep_best and not evals:
        raise ValueError("keep_best needs evaluation: set EVAL_EVERY and EVAL_EXAMPLES > 0")

    pc = jax.process_count()
    data = train_state.DataPipeline(
        open=lambda start: train_batches(cfg, start_batch=start),
        skip_reason=lambda item: skip_reason(cfg, item, pc),
        state_key=_iterator_state_key(cfg, pc) if cfg.checkpoint_dataset else None)

    def to_global(local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        assert next(iter(local.values())).shape[0] == cfg.batch_size // pc
        return {k: jax.make_array_from_process_local_data(batch_sharding, v, (cfg.batch_size, v.shape[1]))
                for k, v in local.items()}

    ckpts = RunCheckpoints(model_dir, cfg.keep_checkpoints, cfg.keep_best, cfg.async_checkpointing,
                           cfg.save_steps)
    try:
        state = train_state.initialise(model_config, cfg, mesh, rules, nn.meta.unbox(boxed), param_sh, ckpts,
                                       data, primary)
        if primary:
            print(train_state.describe_run(cfg, state.train_steps, state.original_steps, dict(mesh.shape),
                                           state.resumed_from, model_dir), file=sys.stderr, flush=True)
            if cfg.keep_best:
                ckpt_lib.write_config_files(model_dir / BEST_DIR, model_config)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            trainer = trainer_lib.Trainer(
                cfg, state, ckpts,
                train_step=jit_train_step(model_config, cfg, state.optimizer, state.schedule, mesh, param_sh,
                                          state.opt_shardings),
                eval_step=jax.jit(make_eval_step(model_config, cfg), in_shardings=(param_sh, batch_sharding),
                                  out_shardings=replicated),
                eval_arrays=[{k: train_state.global_from_host(v, batch_sharding) for k, v in b.items()}
                             for b in evals],
                to_global=to_global, replicated=replicated, data_state_key=data.state_key, primary=primary,
                callback=callback)
            trainer.run()
    finally:
        ckpts.close()
    return TrainResult(state.params, state.opt_state, trainer.step, trainer.history, trainer.eval_history,
                       state.resumed_from, state.data_resume)

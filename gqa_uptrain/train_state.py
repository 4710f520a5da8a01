"""Where a training run starts: resume from MODEL_DIR, or parameters from a converted checkpoint, or random init.

`initialise` returns a `RunState`: parameters and optimiser state (sharded on the mesh), the step, the data iterator
positioned at that step, and the run's length and schedule offset. The three starts:
- **resume**: MODEL_DIR/checkpoints holds a checkpoint. The newest one that restores is used (damaged ones are moved
  aside, gqa_uptrain/recovery.py); the data position comes from the saved tf.data iterator state, or the pipeline is
  rebuilt and the consumed batches skipped (`DataPipeline.skip_reason` says when). INITIAL_CHECKPOINT is ignored.
- **converted checkpoint** (INITIAL_CHECKPOINT): its parameters; Adafactor's state and step when the
  checkpoint carries them (`convert --carry-optimizer-state`, `carried_opt_state`), else a fresh state.
- **random init**: T5X's initialisers with the run's seed, fresh optimiser state.
This module reads checkpoints and writes only MODEL_DIR's description (config files, train_config.json) on a fresh
start; the loop, metrics and saving are gqa_uptrain/trainer.py.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import TYPE_CHECKING, Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding

from gqa_uptrain.checkpoint import Manifest
from gqa_uptrain.config import ModelConfig
from gqa_uptrain.optim import learning_rate_schedule, make_optimizer, opt_state_shardings
from gqa_uptrain.run_checkpoints import ITERATOR_STATE, RunCheckpoints, with_shardings

if TYPE_CHECKING:
    from gqa_uptrain.train import TrainBatches, TrainConfig

TRAIN_CONFIG_FILE = "train_config.json"


@dataclasses.dataclass(frozen=True)
class DataPipeline:
    """How the run's training data is opened and what its saved state depends on (from gqa_uptrain/train.py).

    open(start_batch): this process's batch iterator from global batch `start_batch` on (0 = the start).
    skip_reason(data_item): None if a checkpoint with this `data` item restores its iterator state, else why the
        pipeline is rebuilt and skipped instead.
    state_key: what the iterator state saved now depends on (recorded in the `data` item), None when the run saves
        no iterator state (CHECKPOINT_DATASET=False).
    """

    open: Callable[[int], "TrainBatches"]
    skip_reason: Callable[[Mapping[str, Any]], str | None]
    state_key: dict[str, Any] | None


@dataclasses.dataclass
class RunState:
    """Everything the loop starts from. params / opt_state are global arrays on the run's mesh."""

    params: Any
    opt_state: Any
    step: int
    batches: "TrainBatches"
    train_steps: int
    original_steps: int | None
    schedule_offset: int
    optimizer: optax.GradientTransformation
    schedule: Callable[[jax.Array], jax.Array]
    opt_shardings: Any
    resumed_from: int | None = None  # the checkpoint step resumed from, None on a fresh start
    data_resume: str | None = None  # "restored" (iterator state) or "skipped" (pipeline rebuilt), when resumed
    last_saved: int | None = None  # newest checkpoint step on disk

    def data_item(self, cfg: "TrainConfig", step: int, state_key: dict[str, Any] | None) -> dict[str, Any]:
        """The checkpoint's `data` item at `step` (JSON): the data position and what resuming checks against."""
        return {"step": step, "batches_consumed": step, "train_steps": self.train_steps,
                "original_steps": self.original_steps, "schedule_offset": self.schedule_offset, "seed": cfg.seed,
                "batch_size": cfg.batch_size, "num_data_shards": cfg.num_data_shards or jax.process_count(),
                "mixture_or_task_name": cfg.mixture_or_task_name, ITERATOR_STATE: state_key}


def recorded_source_step(directory: str) -> int | None:
    """The pre-training step a checkpoint directory's manifest.json records, if any (a training MODEL_DIR has
    no manifest, so None)."""
    manifest = Manifest.read(directory)
    return manifest.pretrain_step if manifest else None


def check_save_steps(save_steps: tuple[int, ...], train_steps: int) -> None:
    """ValueError naming the first of SAVE_STEPS outside 1..train_steps (the run's resolved length)."""
    bad = [s for s in save_steps if not 1 <= s <= train_steps]
    if bad:
        raise ValueError(f"TrainConfig.save_steps (SAVE_STEPS) must be steps in 1..{train_steps} (the run's length), "
                         f"got {bad[0]}")


def uptrain_steps(fraction: float, original_steps: int) -> int:
    """The length of a run with UPTRAIN_FRACTION = fraction of ORIGINAL_STEPS (at least one step)."""
    return max(1, int(round(fraction * original_steps)))


def resolve_length(cfg: "TrainConfig", source_manifest: Manifest | None) -> tuple[int, int | None]:
    """(train_steps, original_steps): explicit TRAIN_STEPS wins; else round(alpha * original_steps), with
    ORIGINAL_STEPS or else the pre-training step INITIAL_CHECKPOINT's manifest records."""
    original = cfg.original_steps or (source_manifest.pretrain_step if source_manifest is not None else None)
    if cfg.train_steps is not None:
        return int(cfg.train_steps), original
    if original is None:
        raise ValueError("UPTRAIN_FRACTION needs the original pre-training steps: set ORIGINAL_STEPS, or use an "
                         "INITIAL_CHECKPOINT whose manifest.json records its source step")
    return uptrain_steps(cfg.uptrain_fraction, original), original


def describe_run(cfg: "TrainConfig", train_steps: int, original_steps: int | None, mesh_shape: Mapping[str, int],
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


def global_from_host(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds in full."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def carried_opt_state(cfg: "TrainConfig", opt_abstract: Any, param_abstract: Any, opt_shardings: Any,
                      primary: bool) -> Any | None:
    """The optimiser state to start a run from INITIAL_CHECKPOINT with, or None for a fresh state.

    A checkpoint converted with `convert --carry-optimizer-state` carries Adafactor's statistics and step; they are
    restored (re-factored for this optimiser, placed with `opt_shardings`) unless cfg.restore_optimizer_state is
    False. Parameter-only checkpoints give None and the run starts with `optimizer.init` (the paper's recipe).
    opt_abstract / param_abstract: the run's optimiser state and parameters as ShapeDtypeStructs.
    """
    from gqa_uptrain import checkpoint as ckpt_lib
    if not cfg.restore_optimizer_state:
        return None
    carried = ckpt_lib.restore_carried_opt_state(cfg.initial_checkpoint, opt_abstract, param_abstract, opt_shardings,
                                                 cfg.optimizer.min_dim_size_to_factor)
    if carried is None:
        return None
    state, step = carried
    if primary:
        print(f"optimizer: Adafactor state carried by {cfg.initial_checkpoint} restored (step {step})",
              file=sys.stderr, flush=True)
    return state


def check_model_dir(model_dir: pathlib.Path, model_config: ModelConfig) -> None:
    """MODEL_DIR, when it already describes a model, must describe this one (up to runtime-only fields)."""
    from gqa_uptrain import checkpoint as ckpt_lib
    if (model_dir / ckpt_lib.CONFIG_FILE).exists():
        existing = ckpt_lib.read_config(model_dir)
        # Dropout, activation dtype and layer scanning change the run, not the parameters.
        same = dict(dropout_rate=0.0, dtype="float32", scan_layers=False)
        if existing.replace(**same) != model_config.replace(**same):
            raise ValueError(f"{model_dir / ckpt_lib.CONFIG_FILE} describes a different model than this run's "
                             "model config; use a new MODEL_DIR")


def _check_same_data_layout(cfg: "TrainConfig", step: int, data_item: Mapping[str, Any],
                            model_dir: pathlib.Path) -> None:
    shards = cfg.num_data_shards or jax.process_count()
    if data_item.get("num_data_shards") != shards or data_item.get("batch_size") != cfg.batch_size:
        raise ValueError(f"checkpoint step {step} in {model_dir} was written with batch_size="
                         f"{data_item.get('batch_size')}, num_data_shards={data_item.get('num_data_shards')}; "
                         f"this run has {cfg.batch_size}, {shards}: resuming would change the data order")


def initialise(model_config: ModelConfig, cfg: "TrainConfig", mesh: jax.sharding.Mesh, rules: Any,
               param_abstract: Any, param_shardings: Any, ckpts: RunCheckpoints, data: DataPipeline,
               primary: bool) -> RunState:
    """The run's starting state (resume, converted checkpoint or random init; module docstring).

    param_abstract: unboxed ShapeDtypeStructs of the parameters; param_shardings: their NamedShardings on `mesh`.
    Only process 0 (`primary`) prints, truncates metrics.jsonl and writes MODEL_DIR's description.
    """
    from gqa_uptrain import checkpoint as ckpt_lib
    from gqa_uptrain.metrics import truncate_metrics
    model_dir = ckpts.model_dir
    # The optimiser state's tree does not depend on the schedule offset read from `data`, so cfg.optimizer gives
    # its shapes for the restore.
    probe_abstract, probe_sh = opt_state_shardings(make_optimizer(cfg.optimizer), param_shardings, param_abstract,
                                                   mesh, cfg.optimizer.min_dim_size_to_factor)
    latest, restored = ckpts.restore_newest_good(with_shardings(param_abstract, param_shardings),
                                                 with_shardings(probe_abstract, probe_sh), primary)
    if latest is not None:
        data_item = restored["data"]
        if primary:  # the steps after the checkpoint are run again: drop their records
            truncate_metrics(model_dir, latest)
        train_steps, original_steps = int(data_item["train_steps"]), data_item.get("original_steps")
        if cfg.train_steps is not None and cfg.train_steps != train_steps:
            train_steps = int(cfg.train_steps)  # allow extending a finished run with a larger TRAIN_STEPS
        _check_same_data_layout(cfg, latest, data_item, model_dir)
        schedule_offset = int(data_item.get("schedule_offset", 0))
    else:
        source_manifest = Manifest.read(cfg.initial_checkpoint) if cfg.initial_checkpoint else None
        train_steps, original_steps = resolve_length(cfg, source_manifest)
        if cfg.continue_schedule and not original_steps:
            raise ValueError("continue_schedule needs ORIGINAL_STEPS or an INITIAL_CHECKPOINT recording its step")
        schedule_offset = int(original_steps) if cfg.continue_schedule else cfg.optimizer.step_offset

    check_save_steps(cfg.save_steps, train_steps)
    opt_cfg = dataclasses.replace(cfg.optimizer, step_offset=schedule_offset)
    optimizer = make_optimizer(opt_cfg)
    opt_abstract, opt_sh = opt_state_shardings(optimizer, param_shardings, param_abstract, mesh,
                                               opt_cfg.min_dim_size_to_factor)
    common = dict(train_steps=train_steps, original_steps=original_steps, schedule_offset=schedule_offset,
                  optimizer=optimizer, schedule=learning_rate_schedule(opt_cfg), opt_shardings=opt_sh)
    if latest is not None:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return _resumed(cfg, latest, restored, ckpts, data, primary, common)

    # Host copy of the initial parameters, read before the mesh context (orbax restores them unsharded).
    loaded = carried = None
    if cfg.initial_checkpoint:
        loaded = ckpt_lib.load_params(cfg.initial_checkpoint)
        ckpt_lib.check_params_match_config(loaded.params, model_config, source=str(cfg.initial_checkpoint))
        carried = carried_opt_state(cfg, opt_abstract, param_abstract, opt_sh, primary)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        if loaded is not None:
            params = jax.tree.map(lambda x, s, a: global_from_host(np.asarray(x, a.dtype), s),
                                  loaded.params, param_shardings, param_abstract)
        else:
            from gqa_uptrain.model import init_params
            params = jax.jit(lambda rng: init_params(model_config, rng),
                             out_shardings=param_shardings)(jax.random.PRNGKey(cfg.seed))
        opt_state = carried if carried is not None else jax.jit(optimizer.init, out_shardings=opt_sh)(params)
        batches = data.open(0)
    if primary:
        model_dir.mkdir(parents=True, exist_ok=True)
        ckpt_lib.write_config_files(model_dir, model_config)
        (model_dir / TRAIN_CONFIG_FILE).write_text(json.dumps(
            {**cfg.to_dict(), "resolved_train_steps": train_steps, "resolved_original_steps": original_steps,
             "schedule_offset": schedule_offset}, indent=2, sort_keys=True, default=str) + "\n")
    return RunState(params, opt_state, 0, batches, **common)


def _resumed(cfg: "TrainConfig", latest: int, restored: Mapping[str, Any], ckpts: RunCheckpoints,
             data: DataPipeline, primary: bool, common: dict[str, Any]) -> RunState:
    """The state of checkpoint `latest` with the data iterator at its position (restored, or rebuilt and skipped)."""
    step = int(restored["data"]["step"])
    reason = data.skip_reason(restored["data"])
    if reason is None:
        batches = data.open(0)
        ckpts.restore_iterators(latest, batches.iterators)
        data_resume, how = "restored", "data iterators restored from the checkpoint"
    else:
        batches = data.open(step)
        data_resume, how = "skipped", f"rebuilt the data pipeline and skipped {step} batches, as {reason}"
    if primary:
        print(f"resuming from step {step} in {ckpts.model_dir}: {how}", file=sys.stderr, flush=True)
    return RunState(restored["params"], restored["opt_state"], step, batches, resumed_from=step,
                    data_resume=data_resume, last_saved=latest, **common)

"""gqa-uptrain train: pre-train, uptrain or fine-tune from layered gin files (model file + run file)."""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext

HELP = "Uptrain / pre-train / fine-tune with span corruption or a seq2seq task (gin run configs)"
DESCRIPTION = """Train with the T5 recipe (Adafactor, rsqrt or constant schedule, z-loss) into MODEL_DIR.

Pass a model file, then a run file (configs/runs/{pretrain,uptrain,finetune}.gin), then overrides:
  gqa-uptrain train --gin_file=models/t5_1_1/tiny.gin --gin.NUM_KV_HEADS=2 --gin_file=runs/uptrain.gin \\
      --gin.INITIAL_CHECKPOINT=/tmp/tiny_gqa2 --gin.MODEL_DIR=/tmp/uptrain --gin.TRAIN_STEPS=200 \\
      --gin.BATCH_SIZE=16 --gin.INPUTS_LENGTH=64 --gin.TARGETS_LENGTH=16

Re-running the same command resumes from the latest complete checkpoint in MODEL_DIR/checkpoints.
Metrics: MODEL_DIR/metrics.jsonl and TensorBoard events in MODEL_DIR/tensorboard (tensorboard --logdir MODEL_DIR).
Multi-host: start one process per host with --coordinator_address, --num_processes and --process_id (on TPU/GPU
clusters with auto-detection, --distributed alone)."""
EPILOG = """Run-file macros (override with --gin.NAME=VALUE): MODEL_DIR, TRAIN_STEPS, INITIAL_CHECKPOINT,
UPTRAIN_FRACTION, ORIGINAL_STEPS, MIXTURE_OR_TASK_NAME, INPUTS_LENGTH, TARGETS_LENGTH, PACK, BATCH_SIZE,
NUM_MICROBATCHES, REMAT_POLICY, SEED, MESH, LEARNING_RATE, WARMUP_STEPS, Z_LOSS, LOSS_NORMALIZING_FACTOR, SAVE_EVERY,
SAVE_STEPS, KEEP_CHECKPOINTS, KEEP_BEST, CHECKPOINT_DATASET, EVAL_EVERY, EVAL_EXAMPLES, LOG_EVERY; any TrainConfig.* /
OptimizerConfig.* field directly.
See docs/train.md."""

_MACRO_FOR = {"model_dir": "MODEL_DIR", "train_steps": "TRAIN_STEPS", "initial_checkpoint": "INITIAL_CHECKPOINT",
              "uptrain_fraction": "UPTRAIN_FRACTION", "original_steps": "ORIGINAL_STEPS"}


def register_gin() -> dict[str, object]:
    """Register TrainConfig / OptimizerConfig with gin once (the library classes stay gin-free)."""
    from gqa_uptrain.gin_utils import configurable_dataclass
    from gqa_uptrain.optim import OptimizerConfig
    from gqa_uptrain.train import TrainConfig
    return {"TrainConfig": configurable_dataclass(TrainConfig),
            "OptimizerConfig": configurable_dataclass(OptimizerConfig)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gqa_uptrain.cli.common import add_gin_arguments
    add_gin_arguments(parser)
    g = parser.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (implied by --coordinator_address)")
    g.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordinator service, e.g. 10.0.0.1:1234")
    g.add_argument("--num_processes", type=int, default=None, help="total number of processes")
    g.add_argument("--process_id", type=int, default=None, help="this process's index, 0 .. num_processes-1")
    g.add_argument("--cpu_devices", type=int, default=None, metavar="N",
                   help="CPU only: expose N CPU devices in this process (for testing meshes without accelerators)")
    from gqa_uptrain.cli.common import add_progress_argument
    add_progress_argument(parser)
    from gqa_uptrain.launch import add_launcher_argument
    add_launcher_argument(parser, "MODEL_DIR/train.sbatch; resources from train/SlurmResources.* in gin")


def initialize_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None,
                           cpu_devices: int | None = None, auto: bool = False) -> None:
    """Set up jax before first use: CPU device count, CPU collectives (gloo) and jax.distributed."""
    import jax
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    # auto: the cluster environment (SLURM, TPU pods, ...) tells jax.distributed everything.
    if coordinator_address or num_processes or auto:
        if os.environ.get("JAX_PLATFORMS", "cpu").startswith("cpu"):
            # Cross-process collectives on CPU need an explicit implementation.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)


def train_config_from_gin(progress: bool = True):
    """The bound TrainConfig (after parse_gin), as the plain dataclass."""
    import dataclasses

    import gin

    from gqa_uptrain.errors import UserError
    from gqa_uptrain.train import TrainConfig
    bound = register_gin()["TrainConfig"]()
    values = {f.name: getattr(bound, f.name) for f in dataclasses.fields(TrainConfig)}
    # A macro bound to %gin.REQUIRED arrives as the sentinel itself; name the macro the run files use.
    missing = [k for k, v in values.items() if v is gin.REQUIRED]
    if missing:
        names = ", ".join(_MACRO_FOR.get(k, f"TrainConfig.{k}") for k in missing)
        raise UserError(f"required gin setting(s) not given: {names} (pass --gin.NAME=VALUE)")
    cfg = TrainConfig(**values)
    return cfg if progress else dataclasses.replace(cfg, progress=False)


def run(args: argparse.Namespace) -> int:
    from gqa_uptrain.hostmem import retain_freed_memory
    retain_freed_memory()  # before XLA starts its threads: no per-step page faults on the step's temp buffer
    from gqa_uptrain import launch, preemption
    auto = args.distributed or (args.launcher == "local" and not args.coordinator_address
                                and launch.slurm_task_count() > 1)
    if args.coordinator_address or auto or args.cpu_devices:
        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id, args.cpu_devices,
                               auto=auto)
    register_gin()
    launch.register_gin()  # a run may share gin files with its SLURM resources (train/SlurmResources.*)
    from gqa_uptrain.errors import UserError
    from gqa_uptrain.gin_utils import load_gin, resolve_model_config
    if not args.gin_file:
        raise UserError("train needs a run file (and a model file when starting from scratch), e.g. "
                         "--gin_file=models/t5_1_1/tiny.gin --gin_file=runs/pretrain.gin")
    load_gin(args)
    # TrainConfig's own checks raise ValueError through gin (which appends context lines); the CLI prints their
    # first line, and any other error keeps its traceback.
    tcfg = train_config_from_gin(progress=not args.no_progress)
    mcfg = resolve_model_config(tcfg.model_dir, tcfg.initial_checkpoint)

    if args.launcher == "slurm":
        launch.submit_train(args, tcfg.model_dir)
        return 0

    import jax

    from gqa_uptrain.train import train
    from gqa_uptrain.cli.outputs import created_paths_removed_on_failure
    cleanup = created_paths_removed_on_failure(tcfg.model_dir) if jax.process_index() == 0 else nullcontext()
    preemption.install()
    try:
        with cleanup:
            result = train(mcfg, tcfg)
    except preemption.Preempted as e:
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        return preemption.PREEMPTED_EXIT_CODE
    if jax.process_index() == 0:
        last = result.metrics[-1] if result.metrics else {}
        ev = result.eval_metrics[-1] if result.eval_metrics else {}
        print(f"done: step {result.step} in {tcfg.model_dir}"
              + (f"; train loss {last['loss']:.4f}" if last else "")
              + (f"; eval loss {ev['loss']:.4f} accuracy {ev['accuracy']:.4f}" if ev else "")
              + (f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else ""))
    return 0

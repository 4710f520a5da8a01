"""gqa-uptrain sweep: run a grid of convert -> uptrain -> eval runs and aggregate them."""
from __future__ import annotations

import argparse

HELP = "Run a grid over KV groups / conversion method / α / seed, resumably, and aggregate tables and plots"
DESCRIPTION = HELP + """.

The grid is a gin file binding SweepConfig.* (see configs/sweeps/). Every run gets its own directory under
--root; completed stages are skipped when the sweep is re-run and interrupted training resumes. Results go to
ROOT/results.csv, ROOT/results.md and ROOT/*.png.

Examples:
  gqa-uptrain sweep --gin_file=sweeps/groups.gin --gin.SOURCE_CHECKPOINT=runs/mha --root runs/sweep --parallel 2
  gqa-uptrain sweep --root runs/sweep --aggregate_only
  gqa-uptrain sweep --gin_file=sweeps/repro_methods.gin --gin.SOURCE_CHECKPOINT=runs/mha --root runs/methods \
      --reuse runs/sweep      # runs identical to ones runs/sweep finished are linked, not recomputed

SweepConfig.share_alpha_runs = True (configs/sweeps/repro_alpha.gin): runs that differ only in α share one
conversion and one training to the largest α, with a checkpoint kept at every α's step (ROOT/shared/); each α point's
run directory holds its checkpoint and is evaluated as a separate run would be: same rows, bitwise the same models
(docs/sweep.md). Local launcher only.

On a SLURM cluster (--launcher slurm) every stage becomes an sbatch job chained with --dependency=afterok; job
scripts, ids and logs stay in the run directories. Resources: SlurmResources.* in a gin file, per stage scope
(configs/slurm/gpu_example.gin). Re-running never resubmits done, queued or running stages.
  gqa-uptrain sweep --gin_file=sweeps/groups.gin --gin_file=slurm/gpu_example.gin --gin.SOURCE_CHECKPOINT=runs/mha \
      --root runs/sweep --launcher slurm
  gqa-uptrain sweep --root runs/sweep --status       # each stage's state and SLURM job; failures name their log
  gqa-uptrain sweep --root runs/sweep --wait         # until no job is queued or running, then aggregate"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gqa_uptrain.cli.common import add_gin_arguments
    add_gin_arguments(parser)
    parser.add_argument("--root", required=True, help="sweep directory (one sub-directory per run)")
    parser.add_argument("--parallel", type=int, default=1, help="runs executed at the same time (default 1)")
    parser.add_argument("--dry_run", action="store_true",
                        help="list the stages that would run (and the runs --reuse would link); writes nothing, "
                             "not even ROOT/sweep.json")
    parser.add_argument("--aggregate_only", action="store_true",
                        help="only rebuild results.csv / results.md / plots from finished runs")
    parser.add_argument("--metric", default=None,
                        help="column of results.csv to tabulate/plot (default eval.metrics.loss: the teacher-forced "
                             "loss in nats per target token; else the first eval.* column)")
    parser.add_argument("--reuse", action="append", default=[], metavar="OTHER_ROOT",
                        help="another sweep root (repeatable): runs it finished with the same source, G, method, "
                             "α, seed and train settings are linked, not recomputed; matching evals are copied")
    from gqa_uptrain.launch import add_launcher_argument
    add_launcher_argument(parser, "RUN_DIR/<stage>.sbatch per stage, chained with afterok")
    parser.add_argument("--status", action="store_true",
                        help="show each stage's state and SLURM job (squeue/sacct), submit nothing")
    parser.add_argument("--wait", action="store_true",
                        help="after submitting (or alone), wait until no SLURM job of the sweep is queued or "
                             "running, then aggregate; exit 1 if a stage failed")
    parser.add_argument("--poll_s", type=float, default=30.0, help="--wait: seconds between squeue polls")


def run(args: argparse.Namespace) -> int:
    import pathlib

    from gqa_uptrain import sweep

    if args.aggregate_only:
        if not (pathlib.Path(args.root) / "sweep.json").exists():
            raise FileNotFoundError(f"{args.root}/sweep.json not found: not a sweep directory")
        rows = sweep.aggregate(args.root, args.metric)
        print(f"aggregated {len(rows)} finished runs into {args.root}/results.csv, results.md")
        return 0
    if args.status or (args.wait and not args.gin_file):
        return _status_or_wait(args)
    if not args.gin_file:
        raise ValueError("--gin_file with SweepConfig bindings is required (see configs/sweeps/)")
    from gqa_uptrain.cli.common import load_gin
    from gqa_uptrain.gin_utils import build_dataclass, configurable_dataclass
    from gqa_uptrain import launch
    configurable_dataclass(sweep.SweepConfig)  # must exist before the file is parsed
    launch.register_gin()  # SlurmResources.* may be bound in the same files
    load_gin(args)
    cfg = build_dataclass(sweep.SweepConfig)
    sweep.run_sweep(cfg, args.root, parallel=args.parallel, dry_run=args.dry_run, launcher=args.launcher,
                    reuse=args.reuse)
    if args.launcher == "slurm" and args.wait and not args.dry_run:
        return _status_or_wait(args)
    if not args.dry_run and args.launcher == "local":
        print(f"results: {args.root}/results.md")
    return 0


def _status_or_wait(args: argparse.Namespace) -> int:
    from gqa_uptrain import launch, sweep
    if args.wait:
        statuses = sweep.slurm_wait(args.root, poll_s=args.poll_s)
    else:
        statuses = sweep.slurm_status(args.root)
    print(launch.format_status(statuses))
    if args.wait:
        print(f"results: {args.root}/results.md")
        return 1 if any(s.state in ("failed", "blocked") for s in statuses) else 0
    return 0

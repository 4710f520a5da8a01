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
  gqa-uptrain sweep --root runs/sweep --aggregate_only"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gqa_uptrain.cli.common import add_gin_arguments
    add_gin_arguments(parser)
    parser.add_argument("--root", required=True, help="sweep directory (one sub-directory per run)")
    parser.add_argument("--parallel", type=int, default=1, help="runs executed at the same time (default 1)")
    parser.add_argument("--dry_run", action="store_true", help="list the stages that would run, run nothing")
    parser.add_argument("--aggregate_only", action="store_true",
                        help="only rebuild results.csv / results.md / plots from finished runs")
    parser.add_argument("--metric", default=None, help="column to tabulate/plot (default eval.loss)")


def run(args: argparse.Namespace) -> int:
    import pathlib

    from gqa_uptrain import sweep

    if args.aggregate_only:
        if not (pathlib.Path(args.root) / "sweep.json").exists():
            raise FileNotFoundError(f"{args.root}/sweep.json not found: not a sweep directory")
        rows = sweep.aggregate(args.root, args.metric)
        print(f"aggregated {len(rows)} finished runs into {args.root}/results.csv, results.md")
        return 0
    if not args.gin_file:
        raise ValueError("--gin_file with SweepConfig bindings is required (see configs/sweeps/)")
    from gqa_uptrain.cli.common import load_gin
    from gqa_uptrain.gin_utils import build_dataclass, configurable_dataclass
    configurable_dataclass(sweep.SweepConfig)  # must exist before the file is parsed
    load_gin(args)
    cfg = build_dataclass(sweep.SweepConfig)
    sweep.run_sweep(cfg, args.root, parallel=args.parallel, dry_run=args.dry_run)
    if not args.dry_run:
        print(f"results: {args.root}/results.md")
    return 0

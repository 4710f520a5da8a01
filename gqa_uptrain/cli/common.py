"""Argument helpers shared by subcommands. The gin flags live with gin (`gqa_uptrain.gin_utils`), which the
benchmarks use too; they are re-exported here for the commands."""
from __future__ import annotations

from gqa_uptrain.gin_utils import add_gin_arguments, load_gin, model_config

__all__ = ["add_gin_arguments", "add_progress_argument", "load_gin", "model_config"]


def add_progress_argument(parser, *aliases: str, dest: str = "no_progress") -> None:
    """The one progress switch of every long-running command: --no-progress (either spelling), plus old aliases."""
    parser.add_argument("--no_progress", *aliases, dest=dest, action="store_true",
                        help="no progress bars (results and metrics are still written)")

"""Argument helpers shared by subcommands."""
from __future__ import annotations

import argparse

from gqa_uptrain.config import ModelConfig


def add_gin_arguments(parser: argparse.ArgumentParser, default_file: str | None = None) -> None:
    parser.add_argument("--gin_file", action="append", default=None, metavar="FILE",
                        help="gin config file (repeatable), searched in ./ and configs/"
                             + (f"; default {default_file}" if default_file else ""))
    parser.add_argument("--gin_search_paths", action="append", default=[], metavar="DIR",
                        help="extra directories to search for gin files and includes")
    parser.set_defaults(_default_gin_file=default_file)


def add_progress_argument(parser, *aliases: str, dest: str = "no_progress") -> None:
    """The one progress switch of every long-running command: --no-progress (either spelling), plus old aliases."""
    parser.add_argument("--no_progress", *aliases, dest=dest, action="store_true",
                        help="no progress bars (results and metrics are still written)")


def load_gin(args: argparse.Namespace) -> None:
    from gqa_uptrain import gin_utils
    files = args.gin_file or ([args._default_gin_file] if args._default_gin_file else [])
    gin_utils.parse_gin(files, getattr(args, "gin_bindings", []), args.gin_search_paths,
                        getattr(args, "_command_macros", ()))


def model_config(args: argparse.Namespace) -> ModelConfig:
    from gqa_uptrain import gin_utils
    load_gin(args)
    return gin_utils.model_config_from_gin()

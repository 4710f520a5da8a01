"""gqa-uptrain sweep (placeholder until issue #7 lands)."""
from __future__ import annotations

import argparse

from gqa_uptrain.cli.common import not_implemented

HELP = "Run a grid of conversions/uptraining runs and aggregate (not implemented yet)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


run = not_implemented("sweep", 7)

"""gqa-uptrain train (placeholder until issue #5 lands)."""
from __future__ import annotations

import argparse

from gqa_uptrain.cli.common import not_implemented

HELP = "Uptrain / pre-train / fine-tune from gin run configs (not implemented yet)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


run = not_implemented("train", 5)

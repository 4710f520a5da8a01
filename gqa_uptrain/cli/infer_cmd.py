"""gqa-uptrain infer (placeholder until issue #6 lands)."""
from __future__ import annotations

import argparse

from gqa_uptrain.cli.common import not_implemented

HELP = "Generate outputs with the KV cache (not implemented yet)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


run = not_implemented("infer", 6)

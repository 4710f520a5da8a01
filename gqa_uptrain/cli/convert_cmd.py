"""gqa-uptrain convert (placeholder until issue #4 lands)."""
from __future__ import annotations

import argparse

from gqa_uptrain.cli.common import not_implemented

HELP = "Convert an MHA checkpoint (HF / T5X / orbax) to GQA/MQA (not implemented yet)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


run = not_implemented("convert", 4)

"""gqa-uptrain export (placeholder until issue #4 lands)."""
from __future__ import annotations

import argparse

from gqa_uptrain.cli.common import not_implemented

HELP = "Export a checkpoint to Hugging Face safetensors (not implemented yet)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


run = not_implemented("export", 4)

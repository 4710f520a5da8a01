"""gqa-uptrain demo: the end-to-end walk on the bundled corpus (grows as the pipeline lands)."""
from __future__ import annotations

import argparse

HELP = "End-to-end demo on the bundled corpus: tiny MHA model -> forward pass"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gqa_uptrain.cli.common import add_gin_arguments
    add_gin_arguments(parser, default_file="models/t5_1_1/tiny.gin")
    parser.add_argument("--output_dir", default="demo_output", help="where the demo writes its files")


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError("demo lands with the bundled data")

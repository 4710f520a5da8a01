"""gqa-uptrain bench NAME: dispatches to gqa_uptrain.benchmarks.<NAME>."""
from __future__ import annotations

import argparse
import importlib

HELP = "Benchmarks: decode time per sample vs KV groups, convert memory, train throughput"
BENCHMARKS = ("decode", "convert", "train")


def _module(name: str):
    try:
        return importlib.import_module(f"gqa_uptrain.benchmarks.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"gqa_uptrain.benchmarks.{name}":
            return None
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name in BENCHMARKS:
        mod = _module(name)
        if mod is None:
            p = sub.add_parser(name, help="(not implemented yet)")
            p.set_defaults(_bench_run=None)
            continue
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_bench_run=mod.run)


def run(args: argparse.Namespace) -> int:
    if args._bench_run is None:
        raise NotImplementedError(f"benchmark '{args.benchmark}' is not implemented yet")
    return int(args._bench_run(args) or 0)

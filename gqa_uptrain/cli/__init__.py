"""`gqa-uptrain` command line. One module per subcommand (`<name>_cmd.py`), each with HELP, add_arguments(parser)
and run(args) -> exit code. Heavy imports happen inside run() so `--help` stays fast."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

# Before anything imports TensorFlow (seqio's input pipelines): its C++ logging would bury our output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from gqa_uptrain.gin_utils import split_gin_overrides  # noqa: E402

# Order is the order shown in --help: the flow a user walks.
COMMANDS = ("demo", "inspect", "convert", "export", "train", "infer", "eval", "bench", "sweep")

EPILOG = """Flags may be spelled with - or _ (--num-kv-heads = --num_kv_heads).
gin: every command that builds a model takes --gin_file=FILE (repeatable; searched in ./ and the repo's
configs/) and T5X-style overrides --gin.NAME=VALUE, e.g.
  gqa-uptrain inspect --gin_file=models/t5_1_1/xxl.gin --gin.NUM_KV_HEADS=8
Strings may be given unquoted (--gin.MODEL_DIR=/tmp/run)."""


def _module(name: str):
    return importlib.import_module(f"gqa_uptrain.cli.{name}_cmd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gqa-uptrain", description="Convert MHA T5.1.1 checkpoints to grouped-query attention, uptrain, "
        "evaluate and benchmark them.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        mod = _module(name)
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           epilog=getattr(mod, "EPILOG", None), formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    out: set[str] = set()
    for action in parser._actions:
        out.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _option_strings(sub)
    return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return {name: sub for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()}


def normalize_flag_spelling(argv: list[str], known: "set[str] | argparse.ArgumentParser") -> list[str]:
    """Accept --foo-bar and --foo_bar alike (the issues' and T5X's spellings differ).

    Given the parser, each flag is matched against the options of the (sub)command it follows, so a spelling one
    subcommand owns does not block the other spelling on another (`convert --no_progress`)."""
    if isinstance(known, argparse.ArgumentParser):
        parser, out = known, []
        for arg in argv:
            subs = _subparsers(parser)
            if arg in subs:
                parser = subs[arg]
                out.append(arg)
            else:
                out.extend(normalize_flag_spelling([arg], {s for a in parser._actions for s in a.option_strings}))
        return out
    out = []
    for arg in argv:
        if arg.startswith("--") and not arg.startswith("--gin."):
            name, eq, value = arg.partition("=")
            if name not in known:
                for alt in (name.replace("_", "-"), "--" + name[2:].replace("-", "_")):
                    if alt in known:
                        name = alt
                        break
            arg = name + eq + value
        out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from gqa_uptrain.tpu_env import default_to_cpu_without_tpu
    default_to_cpu_without_tpu()  # before any JAX import: no libtpu error trace on CPU-only hosts
    argv_given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, bindings = split_gin_overrides(argv)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(normalize_flag_spelling(argv, parser))
    args.gin_bindings = bindings
    debug = os.environ.get("GQA_UPTRAIN_DEBUG") == "1"
    if not debug:
        from gqa_uptrain.cli.errors import quiet_library_logging
        quiet_library_logging()
        if argv_given is None:
            from gqa_uptrain.cli.errors import drop_closed_loop_thread_errors
            drop_closed_loop_thread_errors()
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - errors.one_line decides which errors are the user's to fix
        from gqa_uptrain.cli.errors import one_line
        described = one_line(e)
        if debug or described is None:
            raise
        # One clear line; GQA_UPTRAIN_DEBUG=1 shows the traceback.
        msg, code = described
        print(f"gqa-uptrain {args.command}: error: {msg}", file=sys.stderr)
        if argv_given is None:
            # Work orbax left in flight fails again as the interpreter exits ("Exception ignored in: <coroutine
            # ...>"): the error is reported, keep the exit quiet. Only as the program: in-process callers keep
            # their hook.
            sys.unraisablehook = lambda _: None
        return code


if __name__ == "__main__":
    sys.exit(main())

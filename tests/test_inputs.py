"""Inputs a newcomer gets wrong, and one clear line for every error a user can fix (issue #15)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from gqa_uptrain.cli import build_parser, main, normalize_flag_spelling

TINY = "--gin_file=models/t5_1_1/tiny.gin"


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# --- gin: misspelt names and mistyped values are errors, not silently something else ---------------------------

def test_unknown_macro_is_an_error_with_did_you_mean(capsys):
    rc, _, err = _run(capsys, "inspect", TINY, "--gin.NUM_KV_HEAD=8")
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert "unknown gin macro NUM_KV_HEAD" in line and "did you mean NUM_KV_HEADS" in line and "NUM_HEADS" in line


def test_unknown_parameter_and_configurable(capsys):
    rc, _, err = _run(capsys, "inspect", TINY, "--gin.ModelConfig.num_head=4", "--gin.ModelConfg.d_model=64")
    assert rc == 2
    line = err.strip().splitlines()[-1]
    # Both problems in one line.
    assert "ModelConfig has no parameter num_head (did you mean num_heads?" in line
    assert "unknown gin configurable ModelConfg" in line and "did you mean ModelConfig?" in line


def test_train_macros_are_named_and_typed(capsys, tmp_path):
    model_dir = tmp_path / "run"
    rc, _, err = _run(capsys, "train", TINY, "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR={model_dir}",
                      "--gin.TRAIN_STEP=3", "--gin.PACK=Ture", "--gin.BATCH_SIZE=abc", "--no-progress")
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    assert "unknown gin macro TRAIN_STEP (did you mean TRAIN_STEPS" in err
    assert "PACK expects a bool, got 'Ture'" in err
    assert "BATCH_SIZE expects an int, got 'abc'" in err
    assert "invalid literal" not in err
    assert not model_dir.exists()


def test_literal_and_good_values_pass():
    from gqa_uptrain import gin_utils
    with pytest.raises(gin_utils.GinBindingError, match="ACTIVATION_DTYPE expects one of 'float32'"):
        gin_utils.parse_gin(["models/t5_1_1/tiny.gin"], ["ACTIVATION_DTYPE = float64"])
    # Unquoted strings, ints for floats, and macros read through other macros stay accepted.
    gin_utils.parse_gin(["models/t5_1_1/tiny.gin"], ["NUM_KV_HEADS = 2", "ACTIVATION_DTYPE = bfloat16",
                                                     "DROPOUT_RATE = 0", "ModelConfig.d_model = 64"])
    cfg = gin_utils.model_config_from_gin()
    assert (cfg.decoder_self_kv_heads, cfg.dtype, cfg.d_model) == (2, "bfloat16", 64)
    with pytest.raises(gin_utils.GinBindingError, match="NUM_KV_HEADS expects an int or None, got 'two'"):
        gin_utils.parse_gin(["models/t5_1_1/tiny.gin"], ["NUM_KV_HEADS = two"])


# --- flags: one progress switch, both spellings, on every command -----------------------------------------------

LONG_RUNNING = ("demo", "convert", "export", "train", "infer", "eval")


def _subparsers(parser):
    return {n: p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for n, p in a.choices.items()}


def _options(parser):
    return {s for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("command", LONG_RUNNING)
def test_no_progress_both_spellings(command):
    parser = build_parser()
    sub = _subparsers(parser)[command]
    for spelling in ("--no-progress", "--no_progress"):
        (flag,) = normalize_flag_spelling([command, spelling], parser)[1:]
        assert flag in _options(sub), (command, spelling)


def test_every_option_of_every_subcommand_takes_both_spellings():
    parser = build_parser()
    checked = 0

    def walk(path, p):
        nonlocal checked
        for opt in _options(p):
            if not opt.startswith("--") or opt == "--help":
                continue
            for alt in ("--" + opt[2:].replace("_", "-"), "--" + opt[2:].replace("-", "_")):
                got = normalize_flag_spelling([*path, alt], parser)[len(path)]
                assert got in _options(p), (path, alt, got)
                checked += 1
        for name, child in _subparsers(p).items():
            walk([*path, name], child)

    walk([], parser)
    assert checked > 100


def test_quiet_alias_still_works():
    parser = build_parser()
    args = parser.parse_args(normalize_flag_spelling(["infer", "--checkpoint", "c", "--input", "-", "--quiet"],
                                                     parser))
    assert args.quiet
    args = parser.parse_args(normalize_flag_spelling(["eval", "--checkpoint", "c", "--no-progress"], parser))
    assert args.quiet

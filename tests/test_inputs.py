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


# --- train: says what it will do; a failed start leaves nothing behind ------------------------------------------

SMALL = ["--gin.BATCH_SIZE=2", "--gin.INPUTS_LENGTH=16", "--gin.TARGETS_LENGTH=8", "--gin.EVAL_EVERY=0",
         "--gin.LOG_EVERY=1", "--gin.TrainConfig.tensorboard=False", "--no-progress"]


def test_failed_train_leaves_no_run_dir(capsys, tmp_path):
    model_dir = tmp_path / "run"
    rc, _, err = _run(capsys, "train", TINY, "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR={model_dir}",
                      "--gin.TRAIN_STEPS=1", "--gin.MIXTURE_OR_TASK_NAME=no_such_task", *SMALL)
    assert rc == 1 and "no_such_task" in err.strip().splitlines()[-1]
    assert not model_dir.exists()
    # A MODEL_DIR that existed keeps its files; only what the failed run created goes.
    model_dir.mkdir()
    (model_dir / "notes.txt").write_text("mine")
    rc, _, _ = _run(capsys, "train", TINY, "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR={model_dir}",
                    "--gin.TRAIN_STEPS=1", "--gin.MIXTURE_OR_TASK_NAME=no_such_task", *SMALL)
    assert rc == 1
    assert sorted(p.name for p in model_dir.iterdir()) == ["notes.txt"]


def test_train_describes_the_run_before_the_first_step(capsys, tmp_path):
    model_dir = tmp_path / "run"
    rc, out, err = _run(capsys, "train", TINY, "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR={model_dir}",
                        "--gin.TRAIN_STEPS=1", *SMALL)
    assert rc == 0, err
    (line,) = [x for x in err.splitlines() if x.startswith("train: ")]
    assert line.startswith("train: 1 steps (TRAIN_STEPS); fresh from random init; task gqa_span_corruption; "
                           "batch 2 x lengths 16/8; mesh data=1")
    assert str(model_dir) in line


def test_describe_run_names_alpha_derivation(tmp_path):
    from gqa_uptrain.train import TrainConfig, describe_run
    cfg = TrainConfig(model_dir=str(tmp_path), uptrain_fraction=0.05, initial_checkpoint="/ckpt/gqa8",
                      batch_size=8)
    line = describe_run(cfg, 50, 1000, {"data": 1, "fsdp": 1, "model": 1}, None, tmp_path)
    assert "50 steps (α=0.05 x 1000 original steps, from the source checkpoint's recorded step)" in line
    assert "fresh from /ckpt/gqa8" in line
    assert "resuming from step 7" in describe_run(cfg, 50, 1000, {"data": 1}, 7, tmp_path)


# --- eval / infer inputs: one line naming file, line and value; outputs never replaced silently ------------------

@pytest.mark.parametrize("row, expect", [
    ("3", "expected a JSON object"),
    ('{"inputs": "a", "targets": null}', "'targets' must be a string or a non-empty list of strings, got None"),
    ('{"inputs": "a", "targets": 5}', "got 5"),
    ('{"inputs": "a", "targets": [1, 2]}', "got [1, 2]"),
    ('{"inputs": "a", "targets": []}', "got []"),
])
def test_eval_rows_are_checked(tmp_path, row, expect):
    from gqa_uptrain.evaluate import read_seq2seq_file
    f = tmp_path / "dev.jsonl"
    f.write_text('{"inputs": "x", "targets": "y"}\n' + row + "\n")
    with pytest.raises(ValueError, match="dev.jsonl:2: ") as e:
        read_seq2seq_file(f)
    assert expect in str(e.value)


def test_eval_corrupt_gzip_and_non_utf8(tmp_path):
    import gzip
    from gqa_uptrain.evaluate import read_seq2seq_file
    bad = tmp_path / "dev.jsonl.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"dev.jsonl.gz: corrupt or truncated gzip file"):
        read_seq2seq_file(bad)
    trunc = tmp_path / "t.tsv.gz"
    trunc.write_bytes(gzip.compress(b"a\tb\n" * 1000)[:-30])
    with pytest.raises(ValueError, match=r"t.tsv.gz: corrupt or truncated gzip file"):
        read_seq2seq_file(trunc)
    latin = tmp_path / "l.tsv"
    latin.write_bytes(b"ok\tfine\ncaf\xe9\tx\n")
    with pytest.raises(ValueError, match=r"l.tsv:2: not UTF-8 text"):
        read_seq2seq_file(latin)


def test_infer_and_eval_check_input_and_output_first(capsys, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    existing = tmp_path / "out.jsonl"
    existing.write_text("precious\n")
    # The checkpoint does not exist: each refusal below must come before it is even looked at.
    ck = tmp_path / "no_ckpt"
    cases = [
        (["infer", "--checkpoint", ck, "--input", tmp_path, "--output", tmp_path / "o"], "--input"),
        (["infer", "--checkpoint", ck, "--input", src, "--output", tmp_path], "is a directory"),
        (["infer", "--checkpoint", ck, "--input", src, "--output", existing], "exists; pass --overwrite"),
        (["eval", "--checkpoint", ck, "--data", tmp_path, "--output", tmp_path / "r.json"], "--data"),
        (["eval", "--checkpoint", ck, "--data", src, "--output", existing], "exists; pass --overwrite"),
    ]
    for argv, expect in cases:
        rc, _, err = _run(capsys, *argv)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and expect in lines[0], (argv, err)
    assert existing.read_text() == "precious\n"


def test_infer_rejects_non_utf8_and_bare_rows(capsys, tmp_path):
    from gqa_uptrain.cli.infer_cmd import _read_inputs
    f = tmp_path / "in.txt"
    f.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="in.txt:1: not UTF-8 text"):
        _read_inputs(str(f))
    j = tmp_path / "in.jsonl"
    j.write_text("7\n")
    with pytest.raises(ValueError, match=r"in.jsonl:1: expected a JSON object with an 'inputs' field, got 7"):
        _read_inputs(str(j))


# --- outputs honour the umask ------------------------------------------------------------------------------------

def _modes(root):
    return {p.relative_to(root).as_posix() or ".": (p.stat().st_mode & 0o777, p.is_dir())
            for p in [root, *root.rglob("*")]}


def test_outputs_honour_the_umask(tmp_path):
    import numpy as np

    from gqa_uptrain import checkpoint
    from gqa_uptrain.config import ModelConfig
    cfg = ModelConfig(vocab_size=8, d_model=4, num_heads=2, head_dim=2, d_ff=4, num_encoder_layers=1,
                      num_decoder_layers=1)
    params = {k: np.zeros(s, np.float32) for k, s in checkpoint.expected_shapes(cfg).items()}
    old = os.umask(0o022)
    try:
        checkpoint.atomic_write_text(tmp_path / "results.json", "{}\n")
        checkpoint.save_params(tmp_path / "ckpt", params, cfg)
    finally:
        os.umask(old)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644
    modes = _modes(tmp_path / "ckpt")
    assert len(modes) > 4
    wrong = {k: oct(m) for k, (m, is_dir) in modes.items() if m != (0o755 if is_dir else 0o644)}
    assert not wrong, wrong


# --- TensorFlow's start-up lines stay silent ---------------------------------------------------------------------

def test_no_tensorflow_startup_lines(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.getcwd()}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    r = subprocess.run([sys.executable, "-m", "gqa_uptrain", "train", TINY, "--gin_file=runs/pretrain.gin",
                        f"--gin.MODEL_DIR={tmp_path / 'run'}", "--gin.TRAIN_STEPS=1",
                        "--gin.MIXTURE_OR_TASK_NAME=no_such_task", *SMALL],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1
    # Only our one line: no oneDNN / cuda / cpu_feature_guard / absl notices before it.
    assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]], r.stderr
    assert "no_such_task" in r.stderr


# --- damaged checkpoints, full and read-only disks: one line naming the file ------------------------------------

def _tiny_params():
    import numpy as np

    from gqa_uptrain import checkpoint
    from gqa_uptrain.config import ModelConfig
    cfg = ModelConfig(vocab_size=4224, d_model=16, num_heads=2, head_dim=8, d_ff=16, num_encoder_layers=1,
                      num_decoder_layers=1)
    return cfg, {k: np.zeros(s, np.float32) for k, s in checkpoint.expected_shapes(cfg).items()}


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from gqa_uptrain import checkpoint
    cfg, params = _tiny_params()
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save_params(d, params, cfg)
    return d


def _damaged(src, dst, how):
    import json
    import shutil
    shutil.copytree(src, dst)
    data = sorted(p for p in (dst / "params").rglob("*") if p.is_file() and p.parent.name == "d")
    if how == "deleted":
        for p in data:
            p.unlink()
    elif how == "truncated":
        for p in data:
            p.write_bytes(p.read_bytes()[:10])
    elif how == "shape":
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, "d_ff": 32}))
    elif how == "manifest":
        (dst / "manifest.json").write_text('{"step": ')
    elif how == "config":
        (dst / "config.json").write_text('{"d_model": ')
    elif how == "config_value":
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, "d_model": "16"}))
    elif how == "config_list":
        (dst / "config.json").write_text("[16]")
    return dst


@pytest.mark.parametrize("how, expect", [
    ("deleted", "damaged or incomplete checkpoint data"),
    ("truncated", "damaged or incomplete checkpoint data"),
    ("shape", "is stored with shape (16, 16) but config.json implies (16, 32)"),
    ("manifest", "manifest.json is not valid JSON"),
    ("config", "config.json is not valid JSON"),
    ("config_value", "config.json: ModelConfig.d_model must be a positive integer, got '16'"),
    ("config_list", "config.json: expected a JSON object of ModelConfig fields, got list"),
])
def test_damaged_checkpoint_is_one_line(capfd, tmp_path, tiny_ckpt, how, expect):
    ck = _damaged(tiny_ckpt, tmp_path / "ck", how)
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    for argv in (["infer", "--checkpoint", ck, "--input", src, "--max_decode_length", "2", "--no-progress"],
                 ["export", "--checkpoint", ck, "--output", tmp_path / "hf", "--no-progress"]):
        rc = main([str(a) for a in argv])
        err = capfd.readouterr().err
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1, (argv[0], err[:3000])
        assert expect in lines[0] and str(ck) in lines[0], lines[0]
    assert not (tmp_path / "hf").exists()


def test_os_errors_name_the_file():
    import errno

    from gqa_uptrain.cli.errors import one_line
    assert one_line(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out.json")) == (
        "/mnt/ro/out.json: read-only file system", 1)
    msg, _ = one_line(PermissionError(errno.EACCES, "Permission denied", "/data/run"))
    assert msg == "/data/run: permission denied"
    msg, _ = one_line(ValueError('RESOURCE_EXHAUSTED: Error writing "x/c/0" in OCDBT database at local file '
                                 '"/big/.out.tmp-ab12/params/state/": Failed writing: No space left on device'))
    assert msg.startswith("/big/out: no space left on device")
    assert one_line(RuntimeError("a bug")) is None  # unknown errors keep their traceback


def _tmpfs(path, *options):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()}); needs root")
    return path


def test_full_and_read_only_disks(tmp_path, tiny_ckpt):
    full = _tmpfs(tmp_path / "full", "size=64k")
    ro = _tmpfs(tmp_path / "ro", "ro,size=64k")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.getcwd()}
    try:
        for out, expect in ((full / "out", f"{full}/out: no space left on device"),
                            (ro / "out", f"{ro}/out: read-only file system")):
            # As a program: orbax's background threads print until the interpreter exits, and all of it counts.
            r = subprocess.run([sys.executable, "-m", "gqa_uptrain", "convert", "--source", str(tiny_ckpt),
                                "--num-kv-heads", "1", "--output", str(out), "--no_progress"],
                               capture_output=True, text=True, env=env, timeout=300)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 1 and len(lines) == 1, r.stderr[:3000]
            assert expect in lines[0], lines[0]
        assert not any(full.iterdir())  # nothing half-written left behind
    finally:
        subprocess.run(["umount", str(full)])
        subprocess.run(["umount", str(ro)])


# --- source checkpoints and convert arguments ---------------------------------------------------------------------

@pytest.mark.parametrize("weight_map, expect", [
    (["model-00001-of-00001.safetensors"], "got list"),
    ({"shared.weight": 3}, "got 'shared.weight': 3"),
    ({"shared.weight": None}, "got 'shared.weight': None"),
])
def test_hf_index_weight_map_must_map_strings(capsys, tmp_path, weight_map, expect):
    import json
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 16, "num_heads": 2, "d_kv": 8,
                                                 "d_ff": 16, "num_layers": 1, "vocab_size": 4224}))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    rc, _, err = _run(capsys, "convert", "--source", src, "--num-kv-heads", "1", "--output", tmp_path / "o",
                      "--no-progress")
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, err
    assert "model.safetensors.index.json: 'weight_map' must map tensor names to shard file names" in lines[0]
    assert expect in lines[0]


def test_t5x_kernel_stored_as_a_string(capsys, tmp_path):
    from flax import serialization
    from flax import traverse_util
    cfg, params = _tiny_params()
    from gqa_uptrain.trees import flat_params
    flat = dict(flat_params(traverse_util.unflatten_dict(params, sep="/")))
    flat["decoder/layers_0/mlp/wo/kernel"] = "not a tensor"
    state = {"target": traverse_util.unflatten_dict(flat, sep="/"), "state": {"step": 10}}
    d = tmp_path / "checkpoint_10"
    d.mkdir()
    (d / "checkpoint").write_bytes(serialization.msgpack_serialize(state))
    rc, _, err = _run(capsys, "convert", "--source", d, "--source-format", "t5x", "--num-kv-heads", "1",
                      "--output", tmp_path / "o", "--no-progress")
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, err
    assert "T5X parameter 'decoder/layers_0/mlp/wo/kernel' is a str ('not a tensor')" in lines[0]


@pytest.mark.parametrize("flag", ["--calibration-examples", "--calibration_length", "--compare-examples"])
def test_convert_counts_must_be_positive(capsys, tmp_path, tiny_ckpt, flag):
    rc, _, err = _run(capsys, "convert", "--source", tiny_ckpt, "--num-kv-heads", "1", "--method", "svd",
                      "--output", tmp_path / "o", flag, "0", "--no-progress")
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, err
    assert lines[0].endswith("must be >= 1, got 0") and flag.replace("_", "-") in lines[0]
    assert not (tmp_path / "o").exists()


# --- the demo report shows what it measures, with links that work from demo_output/ ------------------------------

def test_demo_report_links_its_plot_and_drops_toy_timings(tmp_path):
    import json
    import re
    from types import SimpleNamespace

    from gqa_uptrain import checkpoint
    from gqa_uptrain.cli.demo_cmd import write_report
    from gqa_uptrain.config import ModelConfig
    models = {"MHA": 8, "GQA-2": 2, "MQA": 1}
    for i, (name, g) in enumerate(models.items()):
        (tmp_path / name / "converted").mkdir(parents=True)
        checkpoint.write_config_files(tmp_path / name / "converted", ModelConfig(
            vocab_size=4224, d_model=128, num_heads=8, head_dim=16, d_ff=256, num_encoder_layers=2,
            num_decoder_layers=2).with_decoder_kv_heads(g))
        for f, loss in (("eval_alpha0.json", 5.0 + i), ("eval_uptrained.json", 4.0 + i / 10)):
            (tmp_path / name / f).write_text(json.dumps({"metrics": {"loss": loss}}))
    (tmp_path / "samples.jsonl").write_text(json.dumps({"input": "a", "output": "b"}) + "\n")
    text = write_report(tmp_path, models, SimpleNamespace(alpha=0.1, pretrain_steps=300, eval_examples=128), 12.0)
    assert (tmp_path / "report.md").read_text() == text
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert "report.png" in links
    for link in links:  # every link resolves from the report's own directory
        assert (tmp_path / link).exists(), link
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert "time/sample" not in text and "ms" not in text.split("|")[-1]
    # KV bytes/token per model: 2 (K,V) x 2 layers x G x 16 x 4 bytes.
    assert "| MQA | 1 | 256 |" in text and "| GQA-2 | 2 | 512 |" in text and "| MHA | 8 | 2,048 |" in text
    assert "gqa-uptrain bench decode" in text and "docs/bench/" in text
    assert "Tiny T5.1.1 (d_model 128, 8 heads, 2+2 layers, vocab 4224:" in text  # read from the config, not typed

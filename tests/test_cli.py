import re

import pytest

from gqa_uptrain import gin_utils
from gqa_uptrain.cli import main

# Published T5.1.1 totals (MHA, untied logits, vocab 32128) and the dimensions they come from.
PUBLISHED = {"small": 77e6, "base": 248e6, "large": 783e6, "xl": 2.85e9, "xxl": 11.1e9}
DIMS = {"small": (8, 512, 6, 1024), "base": (12, 768, 12, 2048), "large": (24, 1024, 16, 2816),
        "xl": (24, 2048, 32, 5120), "xxl": (24, 4096, 64, 10240)}


def _closed_form(layers, d, heads, ff, vocab=32128, head_dim=64, buckets=32):
    attn = 4 * d * heads * head_dim
    mlp = 3 * d * ff
    enc = layers * (attn + mlp + 2 * d) + d + heads * buckets
    dec = layers * (2 * attn + mlp + 3 * d) + d + heads * buckets + d * vocab
    return vocab * d + enc + dec


def _total(out: str) -> int:
    m = re.search(r"^\s+total\s+([\d,]+)", out, re.M)
    assert m, out
    return int(m.group(1).replace(",", ""))


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_parameter_counts_match_t5_1_1(size, capsys):
    assert main(["inspect", f"--gin_file=models/t5_1_1/{size}.gin", "--summary"]) == 0
    total = _total(capsys.readouterr().out)
    assert total == _closed_form(*DIMS[size])
    assert abs(total / PUBLISHED[size] - 1) < 0.005, total


def test_inspect_gqa_reports_smaller_kv_cache(capsys):
    assert main(["inspect", "--gin_file=models/t5_1_1/xxl.gin", "--gin.NUM_KV_HEADS=8"]) == 0
    out = capsys.readouterr().out
    assert "decoder/layers_0/self_attention/key/kernel" in out
    # 2 (K,V) * 24 layers * 8 heads * 64 head_dim * 2 bytes (bf16)
    assert f"{2 * 24 * 8 * 64 * 2:,} bytes per generated token" in out
    assert "ratio 8x" in out
    # K/V kernels of width 8*64 instead of 64*64.
    assert re.search(r"decoder/layers_0/self_attention/key/kernel\s+4096x512\s", out)
    assert re.search(r"encoder/layers_0/attention/key/kernel\s+4096x4096\s", out)


def test_inspect_mesh_reports_per_device_bytes(capsys):
    assert main(["inspect", "--gin_file=models/t5_1_1/small.gin", "--mesh", "data=2,fsdp=2,model=2", "--summary"]) == 0
    out = capsys.readouterr().out
    assert "parameters per device" in out


def test_bad_kv_heads_is_one_clear_error(capsys):
    assert main(["inspect", "--gin_file=models/t5_1_1/tiny.gin", "--gin.NUM_KV_HEADS=3"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "decoder_self_kv_heads=3 does not divide num_heads=8" in err[0]


def test_missing_gin_file_is_clear(capsys):
    assert main(["inspect", "--gin_file=models/nope.gin"]) == 1
    assert "gin file 'models/nope.gin' not found" in capsys.readouterr().err


def test_gin_overrides_and_unquoted_strings():
    gin_utils.parse_gin(["models/t5_1_1/tiny.gin"], ["NUM_KV_HEADS = 2", "ModelConfig.dtype = bfloat16"])
    cfg = gin_utils.model_config_from_gin()
    assert (cfg.decoder_self_kv_heads, cfg.decoder_cross_kv_heads, cfg.encoder_kv_heads) == (2, 2, 8)
    assert cfg.dtype == "bfloat16" and type(cfg).__name__ == "ModelConfig"


def test_resolved_gin_roundtrip(tmp_path):
    gin_utils.parse_gin(["models/t5_1_1/small.gin"], ["NUM_KV_HEADS = 1"])
    cfg = gin_utils.model_config_from_gin()
    f = tmp_path / "model.gin"
    f.write_text(gin_utils.model_config_to_gin(cfg))
    gin_utils.parse_gin([str(f)], [])
    assert gin_utils.model_config_from_gin() == cfg


@pytest.mark.parametrize("cmd", ["convert", "train", "infer", "eval", "bench", "sweep", "export", "inspect", "demo"])
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: gqa-uptrain" in capsys.readouterr().out


def test_flags_accept_dash_or_underscore():
    from gqa_uptrain.cli import build_parser, normalize_flag_spelling, _option_strings
    known = _option_strings(build_parser())
    assert normalize_flag_spelling(["convert", "--num_kv_heads=2", "--source-format", "hf", "--gin.A_B=1"], known) == [
        "convert", "--num-kv-heads=2", "--source-format", "hf", "--gin.A_B=1"]
    assert normalize_flag_spelling(["inspect", "--gin-file=x"], known) == ["inspect", "--gin_file=x"]


def test_gin_files_resolve_with_or_without_configs_prefix(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not the repo root
    assert main(["inspect", "--gin_file=configs/models/t5_1_1/small.gin", "--summary"]) == 0
    a = _total(capsys.readouterr().out)
    assert main(["inspect", "--gin_file=models/t5_1_1/small.gin", "--summary"]) == 0
    assert _total(capsys.readouterr().out) == a


# --- one line for the user's mistakes, a traceback for bugs -------------------------------------------------------

def test_bad_flag_is_one_line_but_a_bug_keeps_its_traceback(capsys, monkeypatch):
    from gqa_uptrain import memory
    rc = main(["inspect", "--summary", "--mesh", "data=x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("gqa-uptrain inspect: error: ") and "data=x" in err[0]

    def broken(*args, **kwargs):
        raise TypeError("parameter_table() got an unexpected keyword argument 'mesh'")
    monkeypatch.setattr(memory, "parameter_table", broken)
    with pytest.raises(TypeError, match="unexpected keyword"):  # propagates: the traceback is printed
        main(["inspect", "--summary"])

    def lookup_bug(*args, **kwargs):
        return {}["no_such_key"]
    monkeypatch.setattr(memory, "parameter_table", lookup_bug)
    with pytest.raises(KeyError):
        main(["inspect", "--summary"])

    def numpy_bug(*args, **kwargs):
        import numpy as np
        return np.ones(2) + np.ones(3)  # a ValueError raised inside numpy, not by a validation point of ours
    monkeypatch.setattr(memory, "parameter_table", numpy_bug)
    with pytest.raises(ValueError, match="broadcast"):
        main(["inspect", "--summary"])


def test_train_config_errors_are_one_line_and_bugs_are_not(capsys, monkeypatch, tmp_path):
    argv = ["train", "--gin_file=models/t5_1_1/tiny.gin", "--gin_file=runs/pretrain.gin",
            f"--gin.MODEL_DIR={tmp_path / 'run'}", "--gin.TRAIN_STEPS=1", "--gin.BATCH_SIZE=0"]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "TrainConfig.batch_size must be >= 1, got 0" in err[0], err
    from gqa_uptrain import gin_utils as gu

    def broken(*args, **kwargs):
        raise TypeError("resolve_model_config() takes 2 positional arguments but 3 were given")
    monkeypatch.setattr(gu, "resolve_model_config", broken)
    with pytest.raises(TypeError, match="positional arguments"):
        main(argv[:-1] + ["--gin.BATCH_SIZE=2"])
    assert not (tmp_path / "run").exists()

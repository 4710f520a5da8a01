import json
import pathlib
import sys

import pytest

from gqa_uptrain import sweep
from gqa_uptrain.sweep import Run, Stage, SweepConfig, aggregate, expand_grid, summarise


def test_grid_runs_mha_once_and_alpha0_with_one_seed():
    cfg = SweepConfig(source_checkpoint="x", num_kv_heads=(1, 2, 4), methods=("mean", "first", "random"),
                      alphas=(0.0, 0.1), seeds=(0, 1, 2))
    runs = expand_grid(cfg, num_heads=4)
    ids = {r.run_id for r in runs}
    assert len(ids) == len(runs)
    # MHA (G=H): only the 'mean' identity conversion, 1 seed at α=0 + 3 seeds at α=0.1
    assert sorted(r.run_id for r in runs if r.kv_heads == 4) == [
        "kv4-mean-a0-s0", "kv4-mean-a0.1-s0", "kv4-mean-a0.1-s1", "kv4-mean-a0.1-s2"]
    # random at α=0 still gets every seed (its initialisation is random)
    assert sum(1 for r in runs if r.kv_heads == 1 and r.method == "random" and r.alpha == 0) == 3
    assert sum(1 for r in runs if r.kv_heads == 1 and r.method == "first" and r.alpha == 0) == 1
    # per non-MHA G: α=0.1 -> 3 methods x 3 seeds; α=0 -> mean 1 + first 1 + random 3
    assert len(runs) == 4 + 2 * (3 * 3 + 5)


def test_grid_rejects_non_divisor():
    with pytest.raises(ValueError, match="num_kv_heads 3 does not divide"):
        expand_grid(SweepConfig(source_checkpoint="x", num_kv_heads=(3,)), num_heads=8)


def test_stage_is_skipped_once_done_and_failures_name_the_log(tmp_path):
    counter = tmp_path / "count"
    argv = [sys.executable, "-c", f"import pathlib; p = pathlib.Path({str(counter)!r}); "
            "p.write_text(str(int(p.read_text()) + 1 if p.exists() else 1))"]
    s = Stage("count", argv, tmp_path / "count.done", tmp_path / "count.log")
    s.run({})
    s.run({})
    assert counter.read_text() == "1"
    bad = Stage("bad", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "bad.done",
                tmp_path / "bad.log")
    with pytest.raises(RuntimeError, match=r"stage bad failed \(exit 3\).*boom"):
        bad.run({})
    assert not (tmp_path / "bad.done").exists()


def _fake_sweep(root: pathlib.Path, losses: dict[str, float], tps: dict[int, float]) -> None:
    cfg = SweepConfig(source_checkpoint="src", num_kv_heads=(1, 4), methods=("mean", "first"), alphas=(0.0, 0.1),
                      seeds=(0, 1))
    root.mkdir()
    (root / "sweep.json").write_text(json.dumps({"config": __import__("dataclasses").asdict(cfg), "num_heads": 4,
                                                 "original_steps": 100}))
    for run_id, loss in losses.items():
        d = root / "runs" / run_id
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({"metrics": {"loss": loss, "token_accuracy": 50.0}}))
    for g, t in tps.items():
        (root / "bench" / f"kv{g}").mkdir(parents=True)
        (root / "bench" / f"kv{g}" / "decode_x.json").write_text(
            json.dumps({"ours": [{"kv_heads": g, "time_per_sample_s": t}]}))


def test_aggregate_tables_mean_and_spread(tmp_path):
    losses = {"kv1-mean-a0.1-s0": 2.0, "kv1-mean-a0.1-s1": 3.0, "kv1-first-a0.1-s0": 4.0, "kv1-first-a0.1-s1": 4.0,
              "kv4-mean-a0.1-s0": 1.0, "kv4-mean-a0.1-s1": 1.5, "kv1-mean-a0-s0": 5.0, "kv4-mean-a0-s0": 1.2}
    root = tmp_path / "sw"
    _fake_sweep(root, losses, {1: 0.1, 4: 0.3})
    rows = aggregate(root)
    assert len(rows) == len(losses)
    s = {(x["kv_heads"], x["method"], x["alpha"]): x for x in summarise(rows, "eval.metrics.loss")}
    assert s[(1, "mean", 0.1)]["mean"] == pytest.approx(2.5)
    assert s[(1, "mean", 0.1)]["std"] == pytest.approx(0.7071, abs=1e-4)
    assert s[(1, "first", 0.1)]["std"] == 0.0 and s[(4, "mean", 0.1)]["n"] == 2
    md = (root / "results.md").read_text()
    assert "| MQA | mean | 0.1 | 2 | 2.5000 | 0.7071 |" in md
    assert "| MHA | 0.3000 |" in md
    header = (root / "results.csv").read_text().splitlines()[0].split(",")
    assert {"run_id", "kv_heads", "eval.metrics.loss", "bench.time_per_sample_s"} <= set(header)
    for png in ("quality_vs_time.png", "time_vs_groups.png", "methods.png", "quality_vs_alpha.png"):
        assert (root / png).stat().st_size > 1000


def test_sweep_dry_run_lists_cli_stages(tmp_path, capsys):
    from gqa_uptrain.checkpoint import write_config_files
    from gqa_uptrain.config import ModelConfig
    src = tmp_path / "src"
    src.mkdir()
    write_config_files(src, ModelConfig(num_heads=4, d_model=32, head_dim=8, d_ff=32, vocab_size=64,
                                        num_encoder_layers=1, num_decoder_layers=1))
    (src / "manifest.json").write_text(json.dumps({"step": 200}))
    cfg = SweepConfig(source_checkpoint=str(src), num_kv_heads=(1, 4), alphas=(0.0, 0.05))
    lines = []
    sweep.run_sweep(cfg, tmp_path / "sw", dry_run=True, log=lines.append)
    text = "\n".join(lines)
    assert "convert --source" in text and "--gin.ORIGINAL_STEPS=200" in text and "--gin.UPTRAIN_FRACTION=0.05" in text
    assert text.count("[kv1-mean-a0.05-s0]") == 3  # convert, train, eval
    assert text.count("[kv1-mean-a0-s0]") == 2  # no training at α=0
    # A different grid in the same root is refused.
    with pytest.raises(ValueError, match="holds a different sweep"):
        sweep.run_sweep(SweepConfig(source_checkpoint=str(src), num_kv_heads=(2,)), tmp_path / "sw", dry_run=True,
                        log=lines.append)

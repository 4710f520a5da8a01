import json
import pathlib
import sys

import pytest

from gqa_uptrain import sweep
from gqa_uptrain.sweep import Stage, SweepConfig, aggregate, expand_grid, summarise


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


def _tiny_source(tmp_path: pathlib.Path, step: int = 200) -> pathlib.Path:
    from gqa_uptrain.checkpoint import write_config_files
    from gqa_uptrain.config import ModelConfig
    src = tmp_path / "src"
    src.mkdir()
    write_config_files(src, ModelConfig(num_heads=4, d_model=32, head_dim=8, d_ff=32, vocab_size=64,
                                        num_encoder_layers=1, num_decoder_layers=1))
    (src / "manifest.json").write_text(json.dumps({"step": step}))
    return src


def test_sweep_dry_run_lists_cli_stages_and_writes_nothing(tmp_path):
    src = _tiny_source(tmp_path)
    cfg = SweepConfig(source_checkpoint=str(src), num_kv_heads=(1, 4), alphas=(0.0, 0.05),
                      extra_eval_splits=("docs",))
    lines = []
    sweep.run_sweep(cfg, tmp_path / "sw", dry_run=True, log=lines.append)
    text = "\n".join(lines)
    assert "convert --source" in text and "--gin.ORIGINAL_STEPS=200" in text and "--gin.UPTRAIN_FRACTION=0.05" in text
    assert text.count("[kv1-mean-a0.05-s0]") == 4  # convert, train, eval, eval_docs
    assert text.count("[kv1-mean-a0-s0]") == 3  # no training at α=0
    assert "--split docs --output" in text
    # The dry run leaves no trace, so a real run with other bindings can still use the root.
    assert not (tmp_path / "sw").exists()
    other = SweepConfig(source_checkpoint=str(src), num_kv_heads=(2,), alphas=(0.0,))
    sweep.run_sweep(other, tmp_path / "sw", dry_run=True, log=lines.append)
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps(
        {"config": __import__("dataclasses").asdict(other), "num_heads": 4, "original_steps": 200}))
    # A different grid in a root that holds a real sweep is refused, dry run or not; the same one is accepted.
    with pytest.raises(ValueError, match="holds a different sweep"):
        sweep.run_sweep(cfg, tmp_path / "sw", dry_run=True, log=lines.append)
    sweep.run_sweep(other, tmp_path / "sw", dry_run=True, log=lines.append)


def test_sweep_help_names_the_default_metric(capsys):
    from gqa_uptrain.cli import main
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "default eval.metrics.loss" in out and "--reuse" in out


def _finished_run(root: pathlib.Path, run_id: str, loss: float, trained: bool, extra: tuple[str, ...] = ()) -> None:
    d = root / "runs" / run_id
    (d / "converted").mkdir(parents=True)
    (d / "converted" / "config.json").write_text("{}")
    if trained:
        (d / "train").mkdir()
        (d / "train.done").write_text("t\n")
    (d / "eval.json").write_text(json.dumps({"metrics": {"loss": loss}}))
    for split in extra:
        (d / f"eval_{split}.json").write_text(json.dumps({"metrics": {"loss": loss + 1}}))


def test_reuse_links_identical_runs_and_recomputes_the_rest(tmp_path, monkeypatch):
    import dataclasses
    src = _tiny_source(tmp_path)
    groups = SweepConfig(source_checkpoint=str(src), num_kv_heads=(1, 4), alphas=(0.0, 0.05), seeds=(0, 1))
    g_root = tmp_path / "groups"
    g_root.mkdir()
    (g_root / "sweep.json").write_text(json.dumps({"config": dataclasses.asdict(groups), "num_heads": 4,
                                                   "original_steps": 200}))
    _finished_run(g_root, "kv1-mean-a0-s0", 5.0, trained=False)
    _finished_run(g_root, "kv1-mean-a0.05-s0", 3.0, trained=True)
    _finished_run(g_root, "kv4-mean-a0.05-s0", 2.0, trained=True)
    (g_root / "bench" / "kv1").mkdir(parents=True)
    (g_root / "bench" / "kv1" / "decode_x.json").write_text("{}")
    (g_root / "bench" / "kv1" / "done").write_text("t\n")
    # kv1-mean-a0.05-s1 is unfinished in groups (converted, not trained): it must be computed, not linked.
    (g_root / "runs" / "kv1-mean-a0.05-s1" / "converted").mkdir(parents=True)
    (g_root / "runs" / "kv1-mean-a0.05-s1" / "converted" / "config.json").write_text("{}")

    # The methods sweep: same source, seeds and train settings, plus svd and a second held-out split.
    methods = dataclasses.replace(groups, num_kv_heads=(1,), methods=("mean", "svd"), extra_eval_splits=("docs",))
    lines = []
    sweep.run_sweep(methods, tmp_path / "methods", dry_run=True, log=lines.append, reuse=[g_root])
    text = "\n".join(lines)
    assert text.count("reuse:") == 3
    assert {"[bench-kv1] reuse:", "[kv1-mean-a0.05-s0] reuse:", "[kv1-mean-a0-s0] reuse:"} <= {
        ln.split(" /")[0] for ln in lines}
    run0 = [ln.split(": ", 1)[0] + " " + ln.split(": ", 1)[1].split()[1] + (" docs" if "--split docs" in ln else "")
            for ln in lines if ln.startswith("[kv1-mean-a0.05-s0]") and "] reuse:" not in ln]
    assert run0 == ["[kv1-mean-a0.05-s0] done convert", "[kv1-mean-a0.05-s0] done train",
                    "[kv1-mean-a0.05-s0] done eval", "[kv1-mean-a0.05-s0] todo eval docs"]
    assert "[kv1-mean-a0.05-s1] todo: gqa_uptrain train" in text
    assert "[kv1-svd-a0.05-s0] todo: gqa_uptrain convert" in text

    ran = []
    monkeypatch.setattr(Stage, "run", lambda self, env: ran.append(str(self.done.relative_to(tmp_path))))
    monkeypatch.setattr(sweep, "aggregate", lambda root, metric=None: [])
    sweep.run_sweep(methods, tmp_path / "methods", log=lines.append, reuse=[g_root])
    m = tmp_path / "methods" / "runs"
    assert (m / "kv1-mean-a0.05-s0" / "train").resolve() == (g_root / "runs" / "kv1-mean-a0.05-s0" / "train").resolve()
    assert json.loads((m / "kv1-mean-a0.05-s0" / "eval.json").read_text())["metrics"]["loss"] == 3.0
    assert not (m / "kv1-mean-a0.05-s1" / "train").exists()
    assert (tmp_path / "methods" / "bench" / "kv1" / "decode_x.json").exists()
    assert not any("bench" in r for r in ran)
    reused = {r for r in ran if "kv1-mean-a0.05-s0" in r or "kv1-mean-a0-s0" in r}
    # Only the new held-out eval runs for reused models; the groups root is untouched.
    assert reused == {"methods/runs/kv1-mean-a0.05-s0/eval_docs.json", "methods/runs/kv1-mean-a0-s0/eval_docs.json"}
    assert "methods/runs/kv1-mean-a0.05-s1/train.done" in ran and "methods/runs/kv1-svd-a0.05-s0/train.done" in ran
    assert not (g_root / "runs" / "kv1-mean-a0.05-s0" / "eval_docs.json").exists()

    # Other train bindings (or another source) change the model key: nothing is reused.
    changed = dataclasses.replace(methods, train_bindings=("--gin.BATCH_SIZE=8",))
    plan = sweep.plan_reuse(changed, tmp_path / "other", expand_grid(changed, 4), 200, [g_root])
    assert set(plan) == {"kv1-mean-a0-s0", "bench-kv1"}  # α = 0: no training, so train settings do not matter


def test_bench_false_plans_no_decode_benchmarks(tmp_path):
    src = _tiny_source(tmp_path)
    lines = []
    sweep.run_sweep(SweepConfig(source_checkpoint=str(src), num_kv_heads=(1, 4), alphas=(0.0,), bench=False),
                    tmp_path / "sw", dry_run=True, log=lines.append)
    assert not any(ln.startswith("[bench-") for ln in lines) and "0 decode benchmarks" in lines[0]
    assert sum("gqa_uptrain convert" in ln for ln in lines) == 2


def test_a_root_grid_can_grow_but_not_shrink(tmp_path, monkeypatch):
    """More G / methods / α / seeds extend a finished root (only the new runs run; sweep.json records the larger
    grid); dropping a grid value, or changing anything that defines the runs, is refused with one line."""
    import dataclasses
    src = _tiny_source(tmp_path)
    small = SweepConfig(source_checkpoint=str(src), num_kv_heads=(1, 4), alphas=(0.0, 0.05), bench=False)
    root = tmp_path / "sw"
    root.mkdir()
    (root / "sweep.json").write_text(json.dumps({"config": dataclasses.asdict(small), "num_heads": 4,
                                                 "original_steps": 200}))
    for run_id, trained in (("kv1-mean-a0-s0", False), ("kv4-mean-a0-s0", False), ("kv1-mean-a0.05-s0", True),
                            ("kv4-mean-a0.05-s0", True)):
        _finished_run(root, run_id, 3.0, trained)
    big = dataclasses.replace(small, num_kv_heads=(1, 2, 4), seeds=(0, 1))
    lines = []
    sweep.run_sweep(big, root, dry_run=True, log=lines.append)
    todo = {ln.split("]")[0][1:] for ln in lines if "todo:" in ln}
    assert todo == {"kv2-mean-a0-s0", "kv2-mean-a0.05-s0", "kv1-mean-a0.05-s1", "kv2-mean-a0.05-s1",
                    "kv4-mean-a0.05-s1"}  # α = 0 has one seed; G = H is the control, run once
    assert json.loads((root / "sweep.json").read_text())["config"]["seeds"] == [0]  # a dry run writes nothing

    ran = []
    monkeypatch.setattr(Stage, "run", lambda self, env: ran.append(self.done.relative_to(root).parts[1]))
    monkeypatch.setattr(sweep, "aggregate", lambda root, metric=None: [])
    sweep.run_sweep(big, root, log=lines.append)
    assert set(ran) == todo
    assert any("grid extended (num_kv_heads + 2; seeds + 1)" in ln for ln in lines), lines
    assert json.loads((root / "sweep.json").read_text())["config"]["num_kv_heads"] == [1, 2, 4]
    sweep.run_sweep(big, root, dry_run=True, log=lines.append)  # the same grid again: accepted

    with pytest.raises(ValueError, match=r"holds a larger grid: this sweep drops num_kv_heads 2; seeds 1"):
        sweep.run_sweep(small, root, dry_run=True, log=lines.append)
    with pytest.raises(ValueError, match="holds a different sweep"):
        sweep.run_sweep(dataclasses.replace(big, train_bindings=("--gin.BATCH_SIZE=8",)), root, dry_run=True,
                        log=lines.append)
    shared = tmp_path / "shared"
    shared.mkdir()
    cfg = dataclasses.replace(small, share_alpha_runs=True)
    (shared / "sweep.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "num_heads": 4,
                                                   "original_steps": 200}))
    with pytest.raises(ValueError, match=r"new alphas \[0.1\] would need checkpoints"):
        sweep.run_sweep(dataclasses.replace(cfg, alphas=(0.0, 0.05, 0.1)), shared, dry_run=True, log=lines.append)
    sweep.run_sweep(dataclasses.replace(cfg, seeds=(0, 1)), shared, dry_run=True, log=lines.append)


def test_jobs_run_seed_major(tmp_path):
    """Every grid point's first seed before any second seed: a sweep stopped early has whole grids for its first
    seeds. Separate runs and shared trainings alike."""
    import dataclasses
    src = _tiny_source(tmp_path)
    cfg = SweepConfig(source_checkpoint=str(src), num_kv_heads=(1, 2), alphas=(0.0, 0.05), seeds=(0, 1),
                      bench=False)
    names = [name for name, _ in sweep.sweep_jobs(cfg, tmp_path / "sw", expand_grid(cfg, 4), 200)]
    assert names == ["kv1-mean-a0-s0", "kv1-mean-a0.05-s0", "kv2-mean-a0-s0", "kv2-mean-a0.05-s0",
                     "kv1-mean-a0.05-s1", "kv2-mean-a0.05-s1"]
    shared = dataclasses.replace(cfg, alphas=(0.0, 0.02, 0.05), share_alpha_runs=True)
    names = [name for name, _ in sweep.sweep_jobs(shared, tmp_path / "sh", expand_grid(shared, 4), 200)]
    assert names == ["kv1-mean-a0-s0", "kv2-mean-a0-s0", "shared-kv1-mean-s0", "shared-kv2-mean-s0",
                     "shared-kv1-mean-s1", "shared-kv2-mean-s1"]

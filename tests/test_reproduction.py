"""scripts/reproduce_paper.sh's helpers and report (issue #16): length pick, 'never', setup read from the runs,
gap plots; and a toy end-to-end run of the script (slow)."""
import dataclasses
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

import reproduction_report as report  # noqa: E402
import reproduction_stages as stages  # noqa: E402

from gqa_uptrain.sweep import SweepConfig  # noqa: E402


def _curve(steps, scale=1000.0):
    return [(s, 4.0 + 2.0 * math.exp(-s / scale)) for s in steps]


def test_pick_length_first_flat_step_and_not_flattened():
    curve = _curve(range(250, 8001, 250))
    choice = stages.pick_length(curve, list(range(500, 8001, 500)), flat=0.02, window=1000)
    # Slope of 2 exp(-s/1000) is -2 exp(-s/1000) per step = -2000 exp(-s/1000) per 1000 steps; the least-squares
    # slope over [s, s+1000] is below 0.02 nats/1000 steps first at s = 4500 (4000 still gives ~0.02 * 1.6).
    assert choice["step"] == 4500 and choice["flattened"]
    assert -choice["slopes"]["4000"] > 0.02 > -choice["slopes"]["4500"]
    # Windows running past the curve have no slope; a curve that never flattens gives its last saved step.
    assert choice["slopes"]["7500"] is None and choice["slopes"]["8000"] is None
    steep = stages.pick_length(_curve(range(250, 3001, 250)), [1000, 2000, 3000], flat=0.02)
    assert steep == {**steep, "step": 3000, "flattened": False}
    with pytest.raises(ValueError, match="no saved checkpoints"):
        stages.pick_length(curve, [])


def test_eval_curve_last_record_wins_and_materialize_refuses_other_step(tmp_path):
    run = tmp_path / "pre"
    (run / "checkpoints" / "10" / "params").mkdir(parents=True)
    (run / "checkpoints" / "20" / "params").mkdir(parents=True)
    (run / "checkpoints" / "20" / "params" / "x").write_text("p")
    (run / "config.json").write_text("{}")
    recs = [{"split": "eval", "step": 10, "loss": 5.0}, {"split": "train", "step": 10, "loss": 9.0},
            {"split": "eval", "step": 10, "loss": 4.5}, {"split": "eval", "step": 20, "loss": 4.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert stages.eval_curve(run) == [(10, 4.5), (20, 4.0)]
    assert stages.saved_steps(run) == [10, 20]
    out = tmp_path / "orig"
    stages.materialize_original(run, 20, out)
    assert (out / "checkpoints" / "20" / "params" / "x").read_text() == "p"
    assert not (out / "checkpoints" / "10").exists() and (run / "checkpoints" / "10").exists()
    stages.materialize_original(run, 20, out)  # same request: nothing to do
    with pytest.raises(ValueError, match="made from .* step 20"):
        stages.materialize_original(run, 10, out)
    with pytest.raises(FileNotFoundError, match="not a saved checkpoint"):
        stages.materialize_original(run, 30, tmp_path / "other")


def test_first_alpha_within_and_never():
    def e(m, sd=0.0):
        return {"mean": m, "std": sd, "n": 2}
    s = {(8, "mean", 0.0): e(4.0), (8, "mean", 0.01): e(4.05), (8, "mean", 0.05): e(4.06, 0.002),
         (1, "svd", 0.0): e(4.02), (1, "svd", 0.01): e(4.055), (1, "svd", 0.05): e(4.065, 0.003),
         (1, "mean", 0.0): e(6.0), (1, "mean", 0.01): e(4.3), (1, "mean", 0.05): e(4.09)}
    assert report.first_alpha_within(s, 1, "svd", 8) == 0.01  # gap +0.02 at α=0, +0.005 at 0.01
    assert report.first_alpha_within(s, 1, "mean", 8) is None  # +0.03 at best: never
    g = report.gap(s, (1, "svd", 0.05), 8)
    assert g["mean"] == pytest.approx(0.005) and g["spread"] == pytest.approx(0.005)


def _sweep_root(root, name, cfg, losses, docs_delta=0.3, h=8, steps=1000):
    d = root / name
    (d / "runs").mkdir(parents=True)
    (d / "sweep.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "num_heads": h,
                                              "original_steps": steps}))
    for run_id, loss in losses.items():
        rd = d / "runs" / run_id
        rd.mkdir()
        (rd / "eval.json").write_text(json.dumps({"num_examples": 64, "metrics": {"loss": loss}}))
        (rd / "eval_python_docs.json").write_text(json.dumps({"num_examples": 64,
                                                              "metrics": {"loss": loss + docs_delta}}))
        if "-a0-" not in run_id:
            (rd / "train").mkdir()
            (rd / "train" / "train_config.json").write_text(json.dumps(
                {"batch_size": 16, "inputs_length": 128, "targets_length": 32, "resolved_original_steps": steps}))


def _synthetic_root(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "machine.json").write_text(json.dumps([{"cpu": "Synthetic CPU 9000", "cores": 2, "ram_gib": 24.0}]))
    pre = tmp_path / "pre"
    curve = _curve(range(250, 4001, 250))
    (pre / "checkpoints").mkdir(parents=True)
    for s in range(500, 4001, 500):
        (pre / "checkpoints" / str(s) / "params").mkdir(parents=True)
    (pre / "metrics.jsonl").write_text("".join(json.dumps({"split": "eval", "step": s, "loss": v}) + "\n"
                                               for s, v in curve))
    orig = root / "mha_original"
    orig.mkdir()
    (orig / "config.json").write_text(json.dumps({"d_model": 128, "num_heads": 8, "head_dim": 16, "d_ff": 256,
                                                  "num_encoder_layers": 2, "num_decoder_layers": 2,
                                                  "vocab_size": 4224}))
    (orig / "train_config.json").write_text(json.dumps({"seed": 7, "batch_size": 16, "inputs_length": 128,
                                                       "targets_length": 32, "resolved_train_steps": 4000}))
    (orig / "original.json").write_text(json.dumps({"source": str(pre), "step": 3000}))
    (root / "length.json").write_text(json.dumps({"flat": 0.07, "window": 1000}))
    seeds = (3, 5)
    groups = SweepConfig(source_checkpoint=str(orig), num_kv_heads=(1, 2, 8), alphas=(0.0, 0.05), seeds=seeds,
                         extra_eval_splits=("python_docs",))
    base = {1: 4.30, 2: 4.20, 8: 4.10}
    losses = {f"kv{g}-mean-a0-s3": {1: 6.0, 2: 5.5, 8: 4.0}[g] for g in base}
    losses.update({f"kv{g}-mean-a0.05-s{s}": base[g] + 0.01 * i for g in base for i, s in enumerate(seeds)})
    _sweep_root(root, "groups", groups, losses)
    alpha = dataclasses.replace(groups, num_kv_heads=(1, 8), methods=("mean", "svd"), alphas=(0.0, 0.01, 0.05))
    al = {"kv8-mean-a0-s3": 4.0, "kv1-mean-a0-s3": 6.0, "kv1-svd-a0-s3": 4.02}
    for i, s in enumerate(seeds):
        al.update({f"kv8-mean-a0.01-s{s}": 4.05 + 0.001 * i, f"kv8-mean-a0.05-s{s}": 4.10 + 0.001 * i,
                   f"kv1-mean-a0.01-s{s}": 4.5 + 0.001 * i, f"kv1-mean-a0.05-s{s}": 4.30 + 0.001 * i,
                   f"kv1-svd-a0.01-s{s}": 4.055 + 0.001 * i, f"kv1-svd-a0.05-s{s}": 4.105 + 0.001 * i})
    _sweep_root(root, "alpha", alpha, al)
    ft = root / "finetune"
    ft.mkdir()
    (ft / "finetune.json").write_text(json.dumps({"models": ["kv8-mean", "kv1-mean"], "seeds": list(seeds),
                                                  "alpha": 0.05, "steps": 300, "batch": 16, "eval_examples": 50}))
    for m, r in (("kv8-mean", 40.0), ("kv1-mean", 30.0)):
        for i, s in enumerate(seeds):
            d = ft / "runs" / f"{m}-s{s}"
            d.mkdir(parents=True)
            (d / "eval.json").write_text(json.dumps({"metrics": {"rouge1": r + i, "rouge2": r / 2, "rougeL": r + i,
                                                                 "bleu": r / 3}}))
            (d / "eval_seconds.json").write_text(json.dumps({"seconds": 5.0, "examples": 50}))
    return root


def test_report_reads_setup_from_runs_and_plots_gaps(tmp_path):
    root = _synthetic_root(tmp_path)
    out = tmp_path / "docs" / "reproduction.md"
    report.main([str(root), "--out", str(out)])
    md = out.read_text()
    assert "Synthetic CPU 9000, 2 logical cores, 24.0 GiB RAM" in md
    assert "**Seeds:** 3, 5 (read from the runs)" in md
    assert "seed 7" in md and "step 3000 of a run of 4000 steps" in md
    assert "Seeds 0, 1, 2" not in md and "eval.metrics.loss" not in md
    # Length: with flat 0.07 nats/1000 steps, 2 exp(-s/1000) flattens at 3000 (slope -0.063; -0.103 at 2500).
    assert "**The loss flattens by this rule at step 3000**" in md
    assert "The sweeps use step 3000 (the rule's choice)." in md
    assert "still falling" not in md  # flattened and used as chosen: no override warning
    # α sweep: svd reaches the control within 0.01 at α = 0.01, mean never (+0.2 at best).
    assert "| MQA | svd |" in md and "| 0.01 |" in md.split("| MQA | svd |")[1].splitlines()[0]
    assert "| never |" in md.split("| MQA | mean |")[1].splitlines()[0]
    assert "MQA, svd vs mean:** svd at α = 0.01, mean never" in md
    # The gap table holds gaps with their summed spread, not raw losses.
    assert "+0.2000 ± 0.0141" in md  # MQA mean α=0.05 in groups: 4.30/4.31 vs control 4.10/4.11
    # Second held-out set: the same ordering (a constant shift), so no reversal.
    assert "reverse beyond the spread." in md and " 0 reverse" in md
    # Fine-tuning: MHA control better on both loss and ROUGE-L: same ordering.
    assert "| ROUGE-L | 1 | 0 | 0 |" in md and "runs of the `alpha` sweep" in md
    # Optimiser restart: only the fresh arm present; the others say how to run them.
    part1 = md.split("## Part 1")[1].split("\n## ")[0]
    assert part1.count("The `restart` stage has not run") == 3  # warm-up arm, carried arm, continued reference
    assert "| fresh | 0.05 |" in part1
    # Every part is there: the methods stage did not run, so its part says so with the command.
    assert ('The `methods` stage has not run (no ROOT/methods/sweep.json); run it with `ORIGINAL='
            + str(tmp_path / "pre") + ' ORIGINAL_STEPS=3000 SEEDS="3 5" STAGES="methods report" scripts/reproduce_paper.sh ' + str(root) + '`'
            in md)
    assets = out.parent / "reproduction"
    for png in ("pretrain_curve.png", "alpha_gap_kv1.png", "groups_gap_val.png", "groups_gap_docs.png",
                "finetune_rougeL.png"):
        assert (assets / png).stat().st_size > 1000, png
        assert f"reproduction/{png}" in md


def test_sweep_plots_name_their_axes():
    from gqa_uptrain.sweep import metric_label
    assert metric_label("eval.metrics.loss") == "validation loss (nats/target token)"
    assert metric_label("eval_python_docs.metrics.loss") == "python_docs held-out loss (nats/target token)"


TOY_GIN = """
SweepConfig.num_kv_heads = (1, 8)
SweepConfig.methods = ('mean',)
SweepConfig.alphas = (0.1,)
SweepConfig.eval_args = ('--num_examples', '4', '--max_input_length', '32', '--max_target_length', '8',
                         '--batch_size', '4', '--quiet')
SweepConfig.bench = False
SweepConfig.train_bindings = ('--gin.BATCH_SIZE=2', '--gin.INPUTS_LENGTH=32', '--gin.TARGETS_LENGTH=8',
                              '--gin.EVAL_EVERY=1000000', '--gin.SAVE_EVERY=1000000', '--no_progress')
"""


@pytest.mark.e2e
def test_reproduce_paper_toy_end_to_end(tmp_path):
    """Every stage of scripts/reproduce_paper.sh at toy size: pre-training with periodic eval and checkpoints,
    the length pick, groups -> methods -> alpha with reuse, fine-tuning, the restart slot, the report. About 20
    CLI subprocesses, so its time is mostly their start-up and compilation and grows with machine load."""
    gin = tmp_path / "toy.gin"
    gin.write_text(TOY_GIN)
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "SEEDS": "0", "PRETRAIN_STEPS": "20",
           "SAVE_EVERY": "10", "EVAL_EVERY": "5", "FT_STEPS": "2", "FT_BATCH": "2", "FT_EVAL_EXAMPLES": "4",
           "FT_ALPHA": "0.1", "FT_MODELS": "kv8-mean,kv1-mean", "SWEEP_GIN": str(gin), "FLAT_NATS": "1000",
           "LENGTH_WINDOW": "10", "REPORT_OUT": str(tmp_path / "docs" / "reproduction.md"),
           "TRAIN_ARGS": "--gin.EVAL_EXAMPLES=4 --gin.BATCH_SIZE=2 --gin.INPUTS_LENGTH=32 --gin.TARGETS_LENGTH=8",
           "PYTHON": sys.executable}
    root = tmp_path / "root"
    r = subprocess.run(["bash", str(REPO / "scripts" / "reproduce_paper.sh"), str(root)], env=env,
                       capture_output=True, text=True, timeout=3000)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # FLAT_NATS huge: the first saved step whose 10-step window (evals at 10, 15, 20) is covered is "flat".
    assert json.loads((root / "mha_original" / "original.json").read_text())["step"] == 10
    assert (root / "pretrain" / "checkpoints" / "20").is_dir() and (root / "pretrain" / "checkpoints" / "10").is_dir()
    # methods and alpha reuse what groups finished (same model inputs), linked not recomputed.
    assert (root / "methods" / "runs" / "kv1-mean-a0.1-s0" / "reused_from").exists()
    assert (root / "alpha" / "runs" / "kv1-mean-a0.1-s0" / "train").is_symlink()
    assert json.loads((root / "alpha" / "runs" / "kv8-mean-a0.1-s0" / "eval_python_docs.json").read_text())[
        "split"] == "python_docs"
    ft = json.loads((root / "finetune" / "runs" / "kv1-mean-s0" / "eval.json").read_text())["metrics"]
    assert {"rouge1", "rouge2", "rougeL", "bleu"} <= set(ft)
    seconds = json.loads((root / "stage_seconds.json").read_text())
    assert {"pretrain", "groups", "methods", "alpha", "finetune"} <= set(seconds)
    md = (tmp_path / "docs" / "reproduction.md").read_text()
    assert "**Seeds:** 0 (read from the runs)" in md and "## Part 3: after fine-tuning" in md
    assert "## Part 2: how much uptraining does each method need?" in md
    # The report stage evaluated the original at N = 10 with the sweeps' eval command (α = 0.1 -> step 11 is not
    # saved, so there is no continued reference for it and the report says so).
    assert json.loads((root / "continued" / "10" / "eval_python_docs.json").read_text())["split"] == "python_docs"
    assert json.loads((root / "continued" / "continued.json").read_text())["unsaved"] == {"11": [0.1]}
    assert "saved no checkpoint at step 11 (α=0.1)" in md
    # Re-running resumes: finished stages are skipped (the pre-training and fine-tuning are not touched).
    before = [(root / p).stat().st_mtime for p in ("pretrain/metrics.jsonl", "finetune/runs/kv1-mean-s0/eval.json")]
    r = subprocess.run(["bash", str(REPO / "scripts" / "reproduce_paper.sh"), str(root)],
                       env={**env, "STAGES": "pretrain original finetune"}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(root / p).stat().st_mtime for p in ("pretrain/metrics.jsonl",
                                                 "finetune/runs/kv1-mean-s0/eval.json")] == before


def test_report_checks_conclusions_against_another_pretraining_seed(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    root, other = _synthetic_root(tmp_path / "a"), _synthetic_root(tmp_path / "b")
    for s in (3, 5):  # in the other root GQA-2 is worse than MQA after uptraining: one reversal
        f = other / "groups" / "runs" / f"kv2-mean-a0.05-s{s}" / "eval.json"
        f.write_text(json.dumps({"num_examples": 64, "metrics": {"loss": 4.5 + 0.01 * (s == 5)}}))
    out = tmp_path / "docs" / "reproduction.md"
    report.main([str(root), "--out", str(out), "--other_root", str(other)])
    md = out.read_text()
    sec = md.split("## Another pre-training seed (7")[1].split("##")[0]
    assert "14 have the same order with the other original" in sec
    assert "1 reverse beyond the spread: groups: MQA mean vs GQA-2 mean at α=0.05." in sec
    groups = sec.split("`groups` sweep, validation split: gap to the MHA control")[1].split("`", 1)[0]
    rows = [tuple(c.strip() for c in ln.strip("|").split("|")) for ln in groups.splitlines()
            if ln[:3] in ("| G", "| M")]
    assert [r[:3] for r in rows] == [("GQA-2", "mean", "0"), ("MQA", "mean", "0"), ("GQA-2", "mean", "0.05"),
                                     ("MQA", "mean", "0.05")]
    assert rows[2][3:] == ("+0.1000 ± 0.0141", "+0.4000 ± 0.0141", "yes")  # worse there, but the same sign


def _subset_root(tmp_path):
    """groups + both restart arms + the continued original + fine-tuning of groups' models; no methods, no alpha.
    The original's curve is a straight line (-0.05 nats / 1000 steps: never flat) and ORIGINAL_STEPS overrode the
    rule's choice (its last step, 4000) with 3000."""
    root = _synthetic_root(tmp_path)
    for d in ("alpha", "finetune"):
        shutil.rmtree(root / d)
    pre = tmp_path / "pre"
    (pre / "metrics.jsonl").write_text("".join(json.dumps({"split": "eval", "step": s, "loss": 5.0 - 5e-5 * s}) + "\n"
                                               for s in range(250, 4001, 250)))
    (root / "length.json").write_text(json.dumps({"step": 4000, "flattened": False, "flat": 0.02, "window": 1000}))
    spec = json.loads((root / "groups" / "sweep.json").read_text())
    (root / "groups" / "sweep.json").write_text(json.dumps({**spec, "original_steps": 3000}))
    cfg = SweepConfig(source_checkpoint=str(root / "mha_original"), num_kv_heads=(1, 2, 8), alphas=(0.0, 0.05),
                      seeds=(3, 5), extra_eval_splits=("python_docs",))
    # warm-up (control and MQA only): the control moves by less than its spread, MQA as with fresh state.
    _sweep_root(root, "restart_warmup", dataclasses.replace(cfg, num_kv_heads=(8, 1)),
                {"kv8-mean-a0-s3": 4.0, "kv1-mean-a0-s3": 6.0, "kv8-mean-a0.05-s3": 4.000,
                 "kv8-mean-a0.05-s5": 4.010, "kv1-mean-a0.05-s3": 4.20, "kv1-mean-a0.05-s5": 4.21}, steps=3000)
    # carried: control within spread and both converted models clearly closer than with fresh state (+0.1 / +0.2).
    _sweep_root(root, "restart_carry", cfg, {"kv8-mean-a0-s3": 4.0, "kv2-mean-a0-s3": 5.5, "kv1-mean-a0-s3": 6.0,
                                             "kv8-mean-a0.05-s3": 3.995, "kv8-mean-a0.05-s5": 4.005,
                                             "kv2-mean-a0.05-s3": 4.02, "kv2-mean-a0.05-s5": 4.03,
                                             "kv1-mean-a0.05-s3": 4.04, "kv1-mean-a0.05-s5": 4.05}, steps=3000)
    # The original at N = 3000 and continued to 3150 (α = 0.05), as `reproduction_stages.py continued` writes them.
    for step, loss in ((3000, 4.0), (3150, 3.99)):
        d = root / "continued" / str(step)
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({"metrics": {"loss": loss}}))
        (d / "eval_python_docs.json").write_text(json.dumps({"metrics": {"loss": loss + 0.3}}))
    (root / "continued" / "continued.json").write_text(json.dumps({"steps": {"3000": [0.0], "3150": [0.05]},
                                                                   "unsaved": {}}))
    ft = root / "finetune"
    (ft / "runs").mkdir(parents=True)
    (ft / "finetune.json").write_text(json.dumps({"models": ["kv8-mean", "kv2-mean", "kv1-mean"], "seeds": [3, 5],
                                                  "alpha": 0.05, "steps": 300, "batch": 16, "eval_examples": 50,
                                                  "uptrain_sweep": "groups"}))
    for m, r in (("kv8-mean", 40.0), ("kv2-mean", 30.0)):  # kv1-mean not finished yet
        for i, s in enumerate((3, 5)):
            d = ft / "runs" / f"{m}-s{s}"
            d.mkdir()
            (d / "eval.json").write_text(json.dumps({"metrics": {"rouge1": r + i, "rouge2": r / 2 + i,
                                                                 "rougeL": r + i, "bleu": 35.0 - r / 5 + i}}))
            (d / "eval_seconds.json").write_text(json.dumps({"seconds": 5.0, "examples": 50}))
    return root


def test_report_from_a_subset_of_stages(tmp_path):
    root = _subset_root(tmp_path)
    before = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*"))
    out = tmp_path / "out" / "reproduction.md"
    report.main([str(root), "--out", str(out), "--rerun_env", "SWEEP_GIN=/x/small.gin",
                 "--rerun_env", "SWEEP_ARGS=--reuse /r/groups"])
    md = out.read_text()
    assert sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*")) == before  # ROOT is only read
    cmd = f'ORIGINAL={tmp_path / "pre"} SWEEP_GIN=/x/small.gin SWEEP_ARGS=\'--reuse /r/groups\' ' \
          f'ORIGINAL_STEPS=3000 SEEDS="3 5" STAGES="{{}} report" scripts/reproduce_paper.sh {root}'
    # Missing parts: one line each, with the command that runs them.
    part2 = md.split("## Part 2")[1].split("\n## ")[0]
    assert part2.strip().splitlines()[-1].startswith("*Not in this report: loss against α per conversion method.")
    assert "`" + cmd.format("alpha") + "`" in part2
    assert "`" + cmd.format("methods") + "`" in md
    assert "**Stages in this report:** groups, restart_warmup, restart_carry; not run: methods, alpha" in md
    # Length: never flat, overridden, slopes computed (a straight line: -0.05 everywhere).
    assert "**The loss never flattens by this rule within the run**" in md
    assert "**The sweeps use step 3000, set by ORIGINAL_STEPS instead of the rule's 4000.**" in md
    assert ("slope -0.0500 nats / 1000 steps over the 1000 steps before it, -0.0500 over the 1000 after it; at the "
            "end of the curve (steps 3000–4000) -0.0500") in md
    assert "| 3000 **(used)** |" in md and "| 4000 (rule) |" in md
    # The curve (4.85 at 3000) against the sweeps' eval command at N (ROOT/continued: 4.0).
    assert "At step 3000 the sweeps' eval command (ROOT/continued) gives 4.0000, -0.8500 from this curve" in md
    # Part 1, validation split: references (a) 4.0 and (b) 3.99 at step 3150.
    val = md.split("### validation split")[1].split("###")[0]
    assert "Reference (a) = 4.0000 (the original checkpoint); the identity-converted control at α = 0 scores " \
           "4.0000 (+0.0000). Reference (b) = 3.9900 at step 3150." in val
    # fresh: control 4.10/4.11 -> +0.105 vs (a), real; warm-up 4.000/4.010: +0.005 ± 0.0071, within the spread.
    assert "| fresh | 0.05 | 4.1050 ± 0.0071 (n=2) | +0.1050 ± 0.0071 | real | +0.1150 ± 0.0071 | real |" in val
    assert "| warmup | 0.05 | 4.0050 ± 0.0071 (n=2) | +0.0050 ± 0.0071 | within the seed spread | " \
           "+0.0150 ± 0.0071 | real | – | – | +0.2000 ± 0.0141 | ≈ |" in val
    assert "| carry | 0.05 | 4.0000 ± 0.0071 (n=2) | +0.0000 ± 0.0071 | within the seed spread | " \
           "+0.0100 ± 0.0071 | real | +0.0250 ± 0.0141 | closer | +0.0450 ± 0.0141 | closer |" in val
    verdict = md.split("**Verdict on the goal (validation split):**")[1].split("\n## ")[0]
    assert "- fresh, control vs (a) the original at N: α=0.05 +0.1050 (real) → does not stay within" in verdict
    assert "- **warmup: goal not met** (control within the seed spread of the original at N: yes; converted " \
           "models closer than with fresh state: no)." in verdict
    assert "- warmup: no GQA-2 runs to compare with fresh state" in verdict
    assert "- warmup, converted models vs fresh state: MQA α=0.05 ≈ → not closer everywhere." in verdict
    assert "- **carry: goal met**" in verdict
    assert "carry, control vs (b) the original continued: α=0.05 +0.0100 (real)" in verdict
    # Fine-tuning from the groups sweep's models; an unfinished model is named, the ordering is checked per metric.
    part3 = md.split("## Part 3")[1].split("\n## ")[0]
    assert "runs of the `groups` sweep" in part3 and "Not finished for every seed: kv1-mean" in part3
    assert "| MHA control | 2 | 40.50 ± 0.71 | 20.50 ± 0.71 | 40.50 ± 0.71 | 27.50 ± 0.71 |" in part3
    # MHA (4.105) beats GQA-2 (4.205) on loss and ROUGE; on BLEU (27.5 vs 29.5) it is the other way round.
    assert "| ROUGE-L | 1 | 0 | 0 |" in part3 and "| BLEU | 0 | 1 (MHA control vs GQA-2 mean) | 0 |" in part3
    for png in ("pretrain_curve.png", "restart_control.png", "restart_gaps.png", "finetune_rougeL.png"):
        assert (out.parent / "reproduction" / png).stat().st_size > 1000, png
        assert f"reproduction/{png}" in md
    csv_lines = (out.parent / "reproduction" / "restart_carry_results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 9  # header + the 9 runs


def test_continued_plan_is_the_sweeps_eval_command_at_saved_steps(tmp_path):
    from gqa_uptrain import sweep
    root = tmp_path / "root"
    pre = tmp_path / "pre"
    for st in (3000, 3150, 3500):
        (pre / "checkpoints" / str(st) / "params").mkdir(parents=True)
    (root / "mha_original").mkdir(parents=True)
    (root / "mha_original" / "original.json").write_text(json.dumps({"source": str(pre), "step": 3000}))
    with pytest.raises(FileNotFoundError, match="run the groups stage first"):
        stages.continued_plan(root)
    cfg = SweepConfig(source_checkpoint=str(root / "mha_original"), num_kv_heads=(1, 8), alphas=(0.0, 0.05, 0.1),
                      seeds=(0,), extra_eval_splits=("python_docs",), eval_args=("--num_examples", "7", "--quiet"))
    _sweep_root(root, "groups", cfg, {}, steps=3000)
    warm = dataclasses.replace(cfg, alphas=(0.0, 0.05, 0.5 / 3))  # 500 steps: saved
    _sweep_root(root, "restart_warmup", warm, {}, steps=3000)
    plan = stages.continued_plan(root)
    assert plan["steps"] == {"3000": [0.0], "3150": [0.05], "3500": [0.5 / 3]}
    assert plan["unsaved"] == {"3300": [0.1]} and plan["splits"] == ["validation", "python_docs"]
    # The same argv as the sweep's own eval stages, with the original run and --step instead of the uptrained model.
    ours = [st.argv for st in stages.continued_stages(root, plan) if "3150" in st.argv]
    theirs = [st.argv for st in sweep.run_stages(cfg, root / "groups", sweep.Run(1, "mean", 0.05, 0), 3000)
              if st.name.startswith("eval")]
    assert len(ours) == len(theirs) == 2

    def norm(argv, ckpt, out):
        a = list(argv)
        a[a.index("--checkpoint") + 1] = "CKPT"
        a[a.index("--output") + 1] = pathlib.Path(a[a.index("--output") + 1]).name
        if "--step" in a:
            del a[a.index("--step"):a.index("--step") + 2]
        return sorted(a)
    assert [norm(a, 0, 0) for a in ours] == [norm(a, 0, 0) for a in theirs]
    assert ours[0][ours[0].index("--checkpoint") + 1] == str(pre) and "--step" in ours[0]
    assert ours[1][ours[1].index("--output") + 1] == str(root / "continued" / "3150" / "eval_python_docs.json")
    # A ROOT evaluated with other settings is refused before anything runs.
    (root / "continued").mkdir()
    (root / "continued" / "continued.json").write_text(json.dumps({**plan, "eval_args": ["--num_examples", "9"]}))
    with pytest.raises(ValueError, match="was evaluated with other settings"):
        stages.continued(root)


def _uptrained_run(root: pathlib.Path, sweep_name: str, run_id: str) -> None:
    d = root / sweep_name / "runs" / run_id
    d.mkdir(parents=True)
    (d / "train.done").write_text("")


def test_finetune_sources_per_model_and_a_stage_that_grows(tmp_path, monkeypatch):
    """Each model is fine-tuned from the sweep that finished it (alpha first, then groups); a resumed stage keeps
    its models' sources and may gain models and seeds, but not change its settings."""
    from gqa_uptrain.sweep import Stage
    root = tmp_path / "root"
    (root / "groups").mkdir(parents=True)
    (root / "groups" / "sweep.json").write_text("{}")
    assert stages.resolve_sources(root, ["kv8-mean"], [0], 0.05, "auto") == {"kv8-mean": "groups"}
    assert stages.resolve_sources(root, ["kv8-mean"], [0], 0.05, "alpha") == {"kv8-mean": "alpha"}
    (root / "alpha").mkdir()
    (root / "alpha" / "sweep.json").write_text("{}")
    assert stages.resolve_sources(root, ["kv8-mean"], [0], 0.05, "auto") == {"kv8-mean": "alpha"}  # not run yet
    _uptrained_run(root, "groups", "kv8-mean-a0.05-s0")
    _uptrained_run(root, "alpha", "kv2-svd-a0.05-s0")
    assert stages.resolve_sources(root, ["kv8-mean", "kv2-svd"], [0], 0.05, "auto") == {
        "kv8-mean": "groups", "kv2-svd": "alpha"}
    assert stages.resolve_sources(root, ["kv8-mean"], [0], 0.05, "auto", {"kv8-mean": "alpha"}) == {
        "kv8-mean": "alpha"}  # an earlier call's choice stands
    with pytest.raises(FileNotFoundError, match=r"no finished uptraining run groups/runs/kv2-svd-a0.05-s0: run"):
        stages.finetune(root, ["kv8-mean", "kv2-svd"], [0], 0.05, 2, 2, 4, uptrain_sweep="groups")
    assert not (root / "finetune").exists()  # nothing written before the check

    ran = []

    def fake_run(self, env):
        if self.done.exists():
            return
        self.done.parent.mkdir(parents=True, exist_ok=True)
        self.done.write_text("{}")
        ran.append(self.done.parent.name + "/" + self.done.name)
    monkeypatch.setattr(Stage, "run", fake_run)
    stages.finetune(root, ["kv8-mean"], [0], 0.05, 2, 2, 4)
    assert ran == ["kv8-mean-s0/train.done", "kv8-mean-s0/eval.json"]
    spec = json.loads((root / "finetune" / "finetune.json").read_text())
    assert spec["sources"] == {"kv8-mean": "groups"}
    # The alpha stage later finishes kv8-mean too: the stage keeps fine-tuning it from groups, and gains kv2-svd.
    _uptrained_run(root, "alpha", "kv8-mean-a0.05-s0")
    stages.finetune(root, ["kv8-mean", "kv2-svd"], [0], 0.05, 2, 2, 4)
    assert ran[2:] == ["kv2-svd-s0/train.done", "kv2-svd-s0/eval.json"]
    spec = json.loads((root / "finetune" / "finetune.json").read_text())
    assert spec["sources"] == {"kv8-mean": "groups", "kv2-svd": "alpha"}
    with pytest.raises(ValueError, match=r"other settings \(steps 2 -> 3\; see .*can only gain models and seeds"):
        stages.finetune(root, ["kv8-mean", "kv2-svd"], [0], 0.05, 3, 2, 4)
    with pytest.raises(ValueError, match=r"drops kv2-svd"):
        stages.finetune(root, ["kv8-mean"], [0], 0.05, 2, 2, 4)
    with pytest.raises(ValueError, match=r"moves kv8-mean \(groups -> alpha\)"):
        stages.finetune(root, ["kv8-mean", "kv2-svd"], [0], 0.05, 2, 2, 4, uptrain_sweep="alpha")
    # A finetune.json of an older version (one uptrain_sweep for all models) reads the same way.
    assert stages.finetune_sources({"models": ["kv8-mean"], "uptrain_sweep": "groups"}) == {"kv8-mean": "groups"}


def test_report_while_the_first_sweep_is_still_running(tmp_path):
    """Only mha_original and a groups sweep with nothing finished: every part says what is missing, no crash."""
    root = tmp_path / "root"
    (root / "mha_original").mkdir(parents=True)
    (root / "mha_original" / "original.json").write_text(json.dumps({"source": str(tmp_path / "nowhere"),
                                                                     "step": 500}))
    cfg = SweepConfig(source_checkpoint=str(root / "mha_original"), num_kv_heads=(1, 2, 8), alphas=(0.0, 0.05),
                      seeds=(0, 1))
    _sweep_root(root, "groups", cfg, {}, steps=500)
    out = tmp_path / "out" / "reproduction.md"
    report.main([str(root), "--out", str(out)])
    md = out.read_text()
    assert "The `groups` stage has started (ROOT/groups/sweep.json) but none of its runs has finished" in md
    assert "- fresh: no finished uptrained control yet." in md
    assert "whose validation curve (metrics.jsonl with periodic eval) is not readable here" in md
    assert "## Which of the paper's findings" not in md  # nothing to judge: no empty heading
    assert md.count("*Not in this report:") == 6  # methods, warm-up, carried, continued, alpha, fine-tuning
    # Later: the decode benchmarks and the converted GQA-2 / MQA models are done, the MHA control is not.
    shutil.rmtree(root / "groups")
    _sweep_root(root, "groups", cfg, {"kv1-mean-a0-s0": 6.0, "kv2-mean-a0-s0": 5.5}, steps=500)
    for g, t in ((1, 0.8e-3), (2, 1.0e-3), (8, 1.5e-3)):
        (root / "groups" / "bench" / f"kv{g}").mkdir(parents=True)
        (root / "groups" / "bench" / f"kv{g}" / "decode_x.json").write_text(json.dumps(
            {"ours": [{"kv_heads": g, "incremental_step_s": t, "time_per_sample_s": 10 * t}]}))
    report.main([str(root), "--out", str(out)])
    md = out.read_text()
    assert "GQA-2 gets 71% of MQA's saving → holds" in md  # (1.5 - 1.0) / (1.5 - 0.8)
    assert "groups_gap_val.png" not in md and not (out.parent / "reproduction" / "groups_gap_val.png").exists()
    assert "| GQA-2 | 5.5000 ± 0.0000 (n=1) | 10.0 | 1.00 | 0.25× |" in md  # only α = 0 has finished

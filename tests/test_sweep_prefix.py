"""Prefix mode of the α sweep (SweepConfig.share_alpha_runs): train once per (G, method, seed) to the largest α and
evaluate each α point from a checkpoint of that run.

The premise (issue #16 part 2's cost): in the uptraining configuration the learning rate depends on the step only
(continue_schedule: 1/sqrt(original_step + step)) and the data order and dropout on the seed only, so n steps of a
run are n steps of any longer run with the same seed and initial checkpoint, and saving a step changes nothing."""
import dataclasses
import json
import pathlib

import numpy as np
import pytest

from gqa_uptrain import sweep
from gqa_uptrain.sweep import SweepConfig

# The smallest model the bundled span-corruption data fits (vocabulary 4000 pieces + 100 sentinels).
TINY = dict(vocab_size=4224, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=1, num_decoder_layers=1)
ORIGINAL_STEPS = 100


def _source(directory: pathlib.Path, dropout: float = 0.0) -> pathlib.Path:
    """A random tiny MHA model saved as if pre-trained for ORIGINAL_STEPS steps (what convert and train read)."""
    import jax

    from gqa_uptrain.checkpoint import save_params
    from gqa_uptrain.config import ModelConfig
    from gqa_uptrain.model import init_params
    cfg = ModelConfig(**TINY, dropout_rate=dropout)
    return save_params(directory, init_params(cfg, jax.random.PRNGKey(3)), cfg, {"step": ORIGINAL_STEPS})


def _flat(params) -> dict[str, np.ndarray]:
    from flax import traverse_util
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def test_uptraining_prefix_equals_shorter_run_bitwise(tmp_path):
    """n steps of the uptraining recipe == the step-n checkpoint of a longer run (same seed and initial checkpoint),
    and the longer run's end does not move when it saves intermediate steps. Bitwise: same computation, same order
    (CPU XLA is deterministic)."""
    from gqa_uptrain.checkpoint import load_params
    from gqa_uptrain.config import ModelConfig
    from gqa_uptrain.train import TrainConfig, train
    src = _source(tmp_path / "src", dropout=0.1)  # dropout on: its key stream must line up too
    model = ModelConfig(**TINY, dropout_rate=0.1)

    def run(name: str, alpha: float, **kw) -> pathlib.Path:
        cfg = TrainConfig(model_dir=str(tmp_path / name), inputs_length=32, targets_length=8, batch_size=4,
                          uptrain_fraction=alpha, initial_checkpoint=str(src), continue_schedule=True,
                          eval_every=0, log_every=2, progress=False, tensorboard=False, **kw)
        train(model, cfg)
        return tmp_path / name

    short = run("short", 0.03)  # 3 steps; its last step logs and saves
    # 6 steps saving every step but keeping only the newest: SAVE_STEPS must survive rotation.
    long = run("long", 0.06, save_steps=(2, 3), save_every=1, keep_checkpoints=1)
    plain = run("plain", 0.06)
    assert sorted(int(p.name) for p in (long / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3, 6]
    a, b = _flat(load_params(short).params), _flat(load_params(long, step=3).params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    c, d = _flat(load_params(long).params), _flat(load_params(plain).params)
    for k in c:
        np.testing.assert_array_equal(c[k], d[k], err_msg=k)
    # And the test can fail: three more steps do move the parameters.
    assert any(not np.array_equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("steps, message", [
    ((0,), "must be steps in 1..10"), ((11,), "must be steps in 1..10 (the run's length), got 11"),
    ((2.5,), "must be a tuple of step numbers"), (5, "must be a tuple of step numbers")])
def test_save_steps_are_validated(tmp_path, steps, message):
    from gqa_uptrain.train import TrainConfig
    with pytest.raises(ValueError, match=r"TrainConfig\.save_steps \(SAVE_STEPS\) " + message.replace("(", r"\(")
                       .replace(")", r"\)").replace(".", r"\.")):
        TrainConfig(model_dir=str(tmp_path), train_steps=10, save_steps=steps)
    # Sorted and deduplicated; with UPTRAIN_FRACTION the length is known only when the run starts.
    assert TrainConfig(model_dir=str(tmp_path), train_steps=10, save_steps=(4, 2, 4)).save_steps == (2, 4)
    assert TrainConfig(model_dir=str(tmp_path), uptrain_fraction=0.1, save_steps=(500,)).save_steps == (500,)


def test_save_steps_beyond_the_resolved_length_fail_before_training(tmp_path):
    from gqa_uptrain.config import ModelConfig
    from gqa_uptrain.train import TrainConfig, train
    src = _source(tmp_path / "src")
    cfg = TrainConfig(model_dir=str(tmp_path / "run"), inputs_length=32, targets_length=8, batch_size=4,
                      uptrain_fraction=0.05, initial_checkpoint=str(src), continue_schedule=True, eval_every=0,
                      progress=False, tensorboard=False, save_steps=(9,))
    with pytest.raises(ValueError, match=r"SAVE_STEPS\) must be steps in 1\.\.5 \(the run's length\), got 9"):
        train(ModelConfig(**TINY), cfg)
    assert not list((tmp_path / "run").glob("checkpoints/*"))


def _tiny_sweep(src: pathlib.Path, share: bool, alphas=(0.02, 0.04)) -> SweepConfig:
    return SweepConfig(
        source_checkpoint=str(src), num_kv_heads=(1,), methods=("mean",), alphas=alphas, seeds=(0,),
        share_alpha_runs=share, bench=False, extra_eval_splits=("python_docs",),
        train_bindings=("--gin.BATCH_SIZE=4", "--gin.INPUTS_LENGTH=32", "--gin.TARGETS_LENGTH=8",
                        "--gin.EVAL_EVERY=0", "--gin.SAVE_EVERY=1000000", "--gin.TrainConfig.tensorboard=False",
                        "--no_progress"),
        eval_args=("--num_examples", "8", "--max_input_length", "32", "--max_target_length", "8", "--quiet"))


def _rows(root: pathlib.Path) -> dict[str, dict]:
    return {r["run_id"]: r for r in sweep.collect_rows(root)}


@pytest.fixture
def stages_in_process(monkeypatch):
    """Run the sweep's CLI stages in this process (same commands, without a Python start-up and imports each:
    a tenth of the wall time). One at a time: gin's configuration is global."""
    import contextlib

    from gqa_uptrain import preemption
    from gqa_uptrain.cli import main
    monkeypatch.setattr(preemption, "install", lambda *a: None)  # signal handlers need the main thread

    def run(self, env):
        if self.done.exists():
            return
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            rc = main(self.argv[3:])
        assert rc == 0, self.log.read_text()[-2000:]
        if not self.done.exists():
            self.done.write_text("t\n")
    monkeypatch.setattr(sweep.Stage, "run", run)


def test_shared_alpha_sweep_gives_the_rows_of_separate_runs(tmp_path, stages_in_process):
    """The key property: a prefix sweep's rows equal those of one training per α (same keys, same run ids, same
    numbers), and the other root's runs can be reused from it."""
    src = _source(tmp_path / "src")
    sweep.run_sweep(_tiny_sweep(src, share=False), tmp_path / "separate", log=lambda m: None)
    lines: list[str] = []
    sweep.run_sweep(_tiny_sweep(src, share=True), tmp_path / "shared", log=lines.append)
    assert "1 runs" not in lines[0] and "(1 shared trainings)" in lines[0]
    sep, sha = _rows(tmp_path / "separate"), _rows(tmp_path / "shared")
    assert set(sep) == set(sha) == {"kv1-mean-a0.02-s0", "kv1-mean-a0.04-s0"}
    for run_id in sep:
        assert sep[run_id].keys() == sha[run_id].keys()
        assert {"eval.metrics.loss", "eval_python_docs.metrics.loss", "eval.step"} <= set(sep[run_id])
        for k, v in sep[run_id].items():
            assert sha[run_id][k] == (pytest.approx(v, rel=1e-6, abs=1e-7) if isinstance(v, float) else v), k
    assert sha["kv1-mean-a0.02-s0"]["eval.step"] == 2 and sha["kv1-mean-a0.04-s0"]["eval.step"] == 4
    # α points differ from each other (the test can fail), and the results files exist as before.
    assert sha["kv1-mean-a0.02-s0"]["eval.metrics.loss"] != sha["kv1-mean-a0.04-s0"]["eval.metrics.loss"]
    assert (tmp_path / "shared" / "results.csv").read_text().splitlines()[0] == \
        (tmp_path / "separate" / "results.csv").read_text().splitlines()[0]

    # One training, to the largest α, kept at every α's step; each point is a run directory of its step only.
    trunk = tmp_path / "shared" / "shared" / "kv1-mean-s0"
    assert (trunk / "train-4.done").exists() and not (tmp_path / "separate" / "shared").exists()
    for run_id, step in (("kv1-mean-a0.02-s0", 2), ("kv1-mean-a0.04-s0", 4)):
        d = tmp_path / "shared" / "runs" / run_id
        assert [p.name for p in (d / "train" / "checkpoints").iterdir()] == [str(step)]
        assert json.loads((d / "trained_in.json").read_text()) == {
            "model_dir": str(trunk / "train"), "step": step, "train_steps": 4}
        tc = json.loads((d / "train" / "train_config.json").read_text())
        assert tc["resolved_train_steps"] == step and tc["uptrain_fraction"] == float(run_id.split("-a")[1][:4])
        assert (d / "converted").resolve() == (trunk / "converted").resolve()
        assert not (d / "train.log").exists()  # never trained here

    # Reuse both ways: a shared root's points link into a separate sweep and vice versa, nothing recomputed.
    for other, mine in (("shared", "from_shared"), ("separate", "from_separate")):
        cfg = _tiny_sweep(src, share=mine == "from_separate")
        sweep.run_sweep(cfg, tmp_path / mine, reuse=[tmp_path / other], log=lines.append)
        assert _rows(tmp_path / mine) == _rows(tmp_path / other)
        assert not list((tmp_path / mine).glob("**/*.log"))


def test_shared_training_stops_at_the_largest_alpha_not_reused(tmp_path):
    """--reuse of finished α points shortens the shared training to the largest step still needed."""
    src = tmp_path / "src"
    src.mkdir()
    from gqa_uptrain.checkpoint import write_config_files
    from gqa_uptrain.config import ModelConfig
    write_config_files(src, ModelConfig(**TINY))
    (src / "manifest.json").write_text(json.dumps({"step": ORIGINAL_STEPS}))
    other = tmp_path / "other"
    (other / "runs").mkdir(parents=True)
    (other / "sweep.json").write_text(json.dumps({"config": dataclasses.asdict(_tiny_sweep(src, False)),
                                                  "num_heads": 4, "original_steps": ORIGINAL_STEPS}))
    for run_id in ("kv1-mean-a0.02-s0", "kv1-mean-a0.04-s0"):
        d = other / "runs" / run_id
        (d / "converted").mkdir(parents=True)
        (d / "converted" / "config.json").write_text("{}")
        (d / "train").mkdir()
        (d / "train.done").write_text("t\n")
    lines: list[str] = []
    cfg = _tiny_sweep(src, share=True, alphas=(0.0, 0.01, 0.02, 0.04))
    sweep.run_sweep(cfg, tmp_path / "sw", dry_run=True, reuse=[other], log=lines.append)
    text = "\n".join(lines)
    assert "--gin.TRAIN_STEPS=1 --gin.SAVE_STEPS=(1,)" in text
    assert "[kv1-mean-a0.04-s0] reuse:" in text and "[kv1-mean-a0.01-s0] todo: keep step 1 of" in text
    assert "[kv1-mean-a0-s0] todo: gqa_uptrain convert" in text  # α = 0 stays its own conversion and eval
    assert not (tmp_path / "sw").exists()  # a dry run writes nothing
    # Without reuse: one training to step 4 keeping 1, 2 and 4, then keep + 2 evals per point.
    lines.clear()
    sweep.run_sweep(cfg, tmp_path / "sw", dry_run=True, log=lines.append)
    text = "\n".join(lines)
    assert text.count("gqa_uptrain train") == 1 and "--gin.TRAIN_STEPS=4 --gin.SAVE_STEPS=(1, 2, 4,)" in text
    assert text.count("todo: keep step") == 3 and text.count("--task gqa_span_corruption") == 8
    assert not (tmp_path / "sw").exists()


def test_share_alpha_runs_refuses_what_it_cannot_do_exactly(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    from gqa_uptrain.checkpoint import write_config_files
    from gqa_uptrain.config import ModelConfig
    write_config_files(src, ModelConfig(**TINY))
    (src / "manifest.json").write_text(json.dumps({"step": ORIGINAL_STEPS}))
    cfg = _tiny_sweep(src, share=True)
    with pytest.raises(ValueError, match="share_alpha_runs needs --launcher local"):
        sweep.run_sweep(cfg, tmp_path / "sw", dry_run=True, launcher="slurm", log=lambda m: None)
    bad = dataclasses.replace(cfg, train_bindings=(*cfg.train_bindings, "--gin.TRAIN_STEPS=10"))
    with pytest.raises(ValueError, match="train binding '--gin.TRAIN_STEPS=10' sets the run's length"):
        sweep.run_sweep(bad, tmp_path / "sw", dry_run=True, log=lambda m: None)
    assert not (tmp_path / "sw").exists()
    # A shared root has no SLURM jobs to show or wait for.
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), "num_heads": 4,
                                                           "original_steps": ORIGINAL_STEPS}))
    with pytest.raises(ValueError, match="share_alpha_runs sweep, which runs with the local launcher only"):
        sweep.slurm_status(tmp_path / "sw")

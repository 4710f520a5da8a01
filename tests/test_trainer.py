"""The Trainer's host syncs: metrics stay on device between log steps, a NaN between log steps is caught at the
next log step / save / eval and never checkpointed, stop signals at the agreed cadence, and resuming with log
periods longer than one step."""
import json
import signal

import jax.numpy as jnp
import numpy as np
import pytest

from gqa_uptrain import preemption
from gqa_uptrain import train as train_lib
from gqa_uptrain import trainer as trainer_lib
from gqa_uptrain.config import ModelConfig
from gqa_uptrain.metrics import read_metrics
from gqa_uptrain.optim import OptimizerConfig
from gqa_uptrain.train import TrainConfig

MODEL = ModelConfig(vocab_size=4224, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=1,
                    num_decoder_layers=1)


def _tc(model_dir, **kw):
    base = dict(model_dir=str(model_dir), inputs_length=32, targets_length=8, batch_size=4, train_steps=7,
                save_every=100, eval_every=0, eval_examples=4, log_every=3, progress=False, tensorboard=False,
                keep_checkpoints=None, async_checkpointing=False,
                optimizer=OptimizerConfig(schedule="rsqrt", warmup_steps=2))
    base.update(kw)
    return TrainConfig(**base)


def _checkpoint_steps(run):
    d = run / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture
def sync_steps(monkeypatch):
    """The step at which each device -> host fetch of the loop happens."""
    steps = []
    real = trainer_lib.Trainer._to_host

    def spy(self, tree):
        steps.append(self.step)
        return real(self, tree)
    monkeypatch.setattr(trainer_lib.Trainer, "_to_host", spy)
    return steps


def test_metrics_fetched_only_at_log_saves_and_evals_and_averaged_over_the_period(tmp_path, sync_steps):
    res = train_lib.train(MODEL, _tc(tmp_path / "every3", save_every=5, eval_every=4))
    # log steps 3, 6, 7 (the last); saves 5, 7; evals 4, 7. Nothing in between: the host never waits per step.
    assert sync_steps == [3, 4, 5, 6, 7, 7, 7]
    assert [r["step"] for r in res.metrics] == [3, 6, 7]
    sync_steps.clear()
    ref = train_lib.train(MODEL, _tc(tmp_path / "every1", log_every=1, save_every=5, eval_every=4))
    assert sync_steps[:3] == [1, 2, 3]
    per_step = {r["step"]: r for r in ref.metrics}
    for rec, steps in zip(res.metrics, ([1, 2, 3], [4, 5, 6], [7])):
        rows = [per_step[s] for s in steps]
        tokens = sum(r["target_tokens"] for r in rows)
        for k in trainer_lib.TOKEN_MEAN_KEYS:  # per target token over the period
            assert rec[k] == pytest.approx(sum(r[k] * r["target_tokens"] for r in rows) / tokens, rel=1e-5), k
        for k in trainer_lib.STEP_MEAN_KEYS:  # per step over the period
            assert rec[k] == pytest.approx(np.mean([r[k] for r in rows]), rel=1e-5), k
    assert res.metrics[1]["learning_rate"] != pytest.approx(per_step[6]["learning_rate"])  # rsqrt: a real mean
    # Same training either way: the cadence changes what is fetched, not what is computed.
    np.testing.assert_array_equal(res.eval_metrics[-1]["loss"], ref.eval_metrics[-1]["loss"])


@pytest.fixture
def nan_loss_at(after_train_step):
    """The training step reports a NaN loss at step `n` (1-based) and leaves the parameters finite, so only the
    on-device divergence record can tell."""
    state = {"n": 10 ** 9}
    after_train_step(lambda new_step, params, opt_state, metrics: (params, opt_state, {
        **metrics, "loss": jnp.where(new_step == state["n"], jnp.nan, metrics["loss"])}))
    return state


def test_nan_between_log_steps_is_caught_at_the_next_log_step(tmp_path, nan_loss_at):
    nan_loss_at["n"] = 2
    run = tmp_path / "log"
    with pytest.raises(train_lib.NonFiniteLossError,
                       match=r"non-finite loss=nan .* at step 2 \(detected at step 3\); training stopped without "
                             r"saving. Last good checkpoint: none"):
        train_lib.train(MODEL, _tc(run))
    assert read_metrics(run) == [] and _checkpoint_steps(run) == []


def test_nan_between_log_steps_is_never_checkpointed(tmp_path, nan_loss_at):
    # The save at step 4 comes before the log step 6: it sees the record of step 3's NaN and refuses.
    nan_loss_at["n"] = 3
    run = tmp_path / "save"
    with pytest.raises(train_lib.NonFiniteLossError, match=r"at step 3 \(detected at step 4\).*Last good "
                                                           r"checkpoint: step 2 in"):
        train_lib.train(MODEL, _tc(run, log_every=6, save_every=2))
    assert _checkpoint_steps(run) == [2]
    # An eval is a host sync too: a NaN at step 1 stops the run at the eval of step 2, before any eval is written.
    nan_loss_at["n"] = 1
    run = tmp_path / "eval"
    with pytest.raises(train_lib.NonFiniteLossError, match=r"at step 1 \(detected at step 2\)"):
        train_lib.train(MODEL, _tc(run, log_every=6, eval_every=2))
    assert read_metrics(run, "eval") == [] and _checkpoint_steps(run) == []


@pytest.fixture
def signalled():
    preemption.reset()
    preemption._handler(signal.SIGUSR1, None)  # as if the scheduler had signalled before the first step
    yield
    preemption.reset()


@pytest.mark.parametrize("every_step, stop_at", [(True, 1), (False, 3)])
def test_stop_signal_cadence(tmp_path, monkeypatch, signalled, every_step, stop_at):
    """One process looks after every step; several agree at log steps only (the collective is a host sync), so
    the same signal stops the run at the first log step."""
    monkeypatch.setattr(trainer_lib, "stop_check_every_step", lambda: every_step)
    checked = []
    real = preemption.stop_requested
    monkeypatch.setattr(preemption, "stop_requested", lambda: checked.append(1) or real())
    run = tmp_path / "run"
    with pytest.raises(preemption.Preempted, match=f"SIGUSR1 at step {stop_at} ") as e:
        train_lib.train(MODEL, _tc(run))
    assert e.value.step == stop_at and len(checked) == 1 and _checkpoint_steps(run) == [stop_at]
    preemption.reset()
    resumed = train_lib.train(MODEL, _tc(run))
    assert resumed.resumed_from == stop_at and resumed.step == 7


def test_resume_with_multi_step_log_periods_matches_an_uninterrupted_run(tmp_path):
    """Stopped at step 4 (mid-period), resumed: the records after the resume equal the uninterrupted run's except
    the first period, which only covers the steps since the checkpoint; parameters are bitwise equal."""
    import jax
    ref = train_lib.train(MODEL, _tc(tmp_path / "ref", train_steps=8, save_every=4))
    run = tmp_path / "run"
    first = train_lib.train(MODEL, _tc(run, train_steps=4, save_every=4))
    assert [r["step"] for r in first.metrics] == [3, 4]
    second = train_lib.train(MODEL, _tc(run, train_steps=8, save_every=4))
    assert second.resumed_from == 4 and [r["step"] for r in second.metrics] == [6, 8]
    ref_by_step = {r["step"]: r for r in ref.metrics}
    assert second.metrics[1]["loss"] == ref_by_step[8]["loss"]  # period 7..8 in both runs
    assert [r["step"] for r in read_metrics(run)] == [3, 4, 6, 8]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ref.params,
                 second.params)
    assert json.loads((run / "checkpoints" / "8" / "data" / "metadata").read_text())["step"] == 8

"""SIGTERM/SIGUSR1 mid-run: the trainer writes a checkpoint at the current step and raises Preempted; the next run
resumes from it. (Through SLURM with a requeue, compared with an uninterrupted run: tests/test_slurm.py.)"""
import os
import signal

import pytest

from gqa_uptrain import preemption

STEPS = 4


def _train(model_dir, callback=None):
    from gqa_uptrain.config import ModelConfig
    from gqa_uptrain.optim import OptimizerConfig
    from gqa_uptrain.train import TrainConfig, train
    model = ModelConfig(vocab_size=4224, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=1,
                        num_decoder_layers=1)
    cfg = TrainConfig(model_dir=str(model_dir), inputs_length=32, targets_length=8, batch_size=4,
                      train_steps=STEPS, save_every=100, eval_every=0, log_every=1, progress=False,
                      tensorboard=False, optimizer=OptimizerConfig(schedule="constant", base_learning_rate=0.01))
    return train(model, cfg, callback=callback)


@pytest.fixture
def handlers():
    old = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    preemption.reset()
    preemption.install()
    yield
    preemption.reset()
    for s, h in old.items():
        signal.signal(s, h)


def test_sigusr1_checkpoints_stops_and_the_next_run_resumes(tmp_path, handlers):
    # SIGUSR1 is what `--signal=USR1@N` sends before the time limit; SIGTERM (scancel) runs in tests/test_slurm.py.
    def send_at_2(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    with pytest.raises(preemption.Preempted, match="stopped by SIGUSR1 at step 2") as e:
        _train(tmp_path / "a", callback=send_at_2)
    assert e.value.step == 2
    ckpts = sorted(int(p.name) for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.isdigit())
    assert ckpts == [2]  # save_every=100: the only checkpoint is the one the signal caused
    preemption.reset()  # a fresh process (the requeued job) starts without the flag
    resumed = _train(tmp_path / "a")
    # Bitwise equality of a resumed run with an uninterrupted one: tests/test_train_resume.py (kill -9) and, through
    # a SIGTERM, a requeue and a fresh process, tests/test_slurm.py.
    assert resumed.resumed_from == 2 and resumed.step == STEPS and resumed.data_resume == "restored"


def test_handlers_set_the_flag_and_nothing_else(handlers):
    assert preemption.stop_requested() is None
    os.kill(os.getpid(), signal.SIGTERM)  # would end pytest without the handler
    os.kill(os.getpid(), signal.SIGUSR1)
    assert preemption.received_signal() == signal.SIGTERM and preemption.stop_requested() == signal.SIGTERM

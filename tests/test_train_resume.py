"""kill -9 mid-run (possibly during an async save), resume (restoring the saved tf.data iterator state), and end
bitwise equal to an uninterrupted run."""
import os
import signal
import subprocess
import sys

import numpy as np

STEPS = 8


def _worker(model_dir: str, steps: int) -> None:
    from gqa_uptrain.config import ModelConfig
    from gqa_uptrain.optim import OptimizerConfig
    from gqa_uptrain.train import TrainConfig, train
    model = ModelConfig(vocab_size=4224, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=1,
                        num_decoder_layers=1, dropout_rate=0.1)  # dropout on: the rng stream must resume too
    cfg = TrainConfig(model_dir=model_dir, inputs_length=32, targets_length=8, batch_size=4, train_steps=steps,
                      save_every=2, eval_every=0, log_every=1, progress=False, tensorboard=False,
                      optimizer=OptimizerConfig(schedule="rsqrt", warmup_steps=100))
    res = train(model, cfg, callback=lambda step, m: print(f"STEP {step} {m['loss']:.6f}", flush=True))
    print(f"RESUMED_FROM {res.resumed_from} {res.data_resume}", flush=True)


def _start(model_dir, steps=STEPS):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, __file__, model_dir, str(steps)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)


def _params(model_dir):
    from gqa_uptrain.checkpoint import load_params
    from flax import traverse_util
    return traverse_util.flatten_dict(load_params(model_dir).params, sep="/")


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = _start(ref_dir)
    victim = _start(run_dir)
    killed_at = None
    for line in victim.stdout:
        if line.startswith("STEP 5 "):
            # Step 4's async save may still be in flight: kill -9 now.
            victim.send_signal(signal.SIGKILL)
            killed_at = 5
            break
    victim.wait()
    assert killed_at == 5 and victim.returncode == -signal.SIGKILL
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out
    resumed = _start(run_dir)
    rout, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, rout
    _, resumed_from, data_resume = rout.strip().splitlines()[-1].split()
    resumed_from = int(resumed_from)
    assert resumed_from in (2, 4)  # the latest *complete* checkpoint before the kill
    assert data_resume == "restored"  # checkpoint_dataset (the default): iterator state, no skipping
    first = [l for l in rout.splitlines() if l.startswith("STEP")][0]
    assert first.startswith(f"STEP {resumed_from + 1} ")
    # Same losses for the resumed steps, and bitwise-equal final parameters.
    ref_losses = {l.split()[1]: l.split()[2] for l in out.splitlines() if l.startswith("STEP")}
    for l in rout.splitlines():
        if l.startswith("STEP"):
            assert ref_losses[l.split()[1]] == l.split()[2], l
    a, b = _params(ref_dir), _params(run_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))

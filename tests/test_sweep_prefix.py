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
                          eval_every=1000, eval_examples=4, log_every=2, progress=False, tensorboard=False, **kw)
        train(model, cfg)
        return tmp_path / name

    short = run("short", 0.03)  # 3 steps; its last step logs, evaluates and saves
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

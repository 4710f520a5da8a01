"""tf.data iterator state in training checkpoints (TrainConfig.checkpoint_dataset): what is saved, that it is the
state at the saved step under async checkpointing, resuming from it without skipping, and the skip fallback."""
import itertools
import json
import shutil

import numpy as np
import pytest

from gqa_uptrain import dataset_checkpoint, run_checkpoints
from gqa_uptrain import train as train_lib
from gqa_uptrain.config import ModelConfig
from gqa_uptrain.optim import OptimizerConfig
from gqa_uptrain.train import TrainConfig

MODEL = ModelConfig(vocab_size=4224, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=1,
                    num_decoder_layers=1)


def _tc(model_dir, **kw):
    base = dict(model_dir=str(model_dir), inputs_length=32, targets_length=8, batch_size=4, train_steps=4,
                save_every=2, keep_checkpoints=None, eval_every=0, log_every=1, progress=False, tensorboard=False,
                optimizer=OptimizerConfig(schedule="constant", base_learning_rate=0.01))
    base.update(kw)
    return TrainConfig(**base)


def _same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _restored_next(run_dir, step, cfg):
    """The first batch of a fresh pipeline after restoring checkpoint `step`'s iterator state into it."""
    import orbax.checkpoint as ocp
    batches = train_lib.train_batches(cfg)
    with run_checkpoints.checkpoint_manager(run_dir, cfg.keep_checkpoints) as mngr:
        mngr.restore(step, args=ocp.args.Composite(**{
            train_lib.ITERATOR_STATE: dataset_checkpoint.DatasetIteratorRestore(batches.iterators)}))
    return next(batches)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """4 steps with iterator state (async saves at steps 2 and 4), 4 steps without, and the uninterrupted stream."""
    root = tmp_path_factory.mktemp("data_state")
    train_lib.train(MODEL, _tc(root / "with"))
    train_lib.train(MODEL, _tc(root / "without", checkpoint_dataset=False))
    reference = list(itertools.islice(train_lib.train_batches(_tc(root / "ref")), 8))
    return root, reference


def _data_item(run_dir, step):
    return json.loads((run_dir / "checkpoints" / str(step) / "data" / "metadata").read_text())


def test_saved_state_is_the_state_at_the_saved_step(runs):
    root, reference = runs
    run = root / "with"
    cfg = _tc(run)
    assert (run / "checkpoints" / "4" / "data_iterators" / "process_0_of_1.index").exists()
    assert _data_item(run, 4)[train_lib.ITERATOR_STATE]["process_count"] == 1
    # Async checkpointing and the loop drew batch 3 right after save(2): the saved state is still "2 consumed".
    for step in (2, 4):
        _same_batches([_restored_next(run, step, cfg)], [reference[step]])
    # Without checkpoint_dataset: no item, and the data item says so.
    assert not (root / "without" / "checkpoints" / "4" / "data_iterators").exists()
    assert _data_item(root / "without", 4)[train_lib.ITERATOR_STATE] is None


def test_save_captures_the_iterator_before_it_advances(tmp_path):
    """Directly: an async CheckpointManager save, then the iterator moves on before the write could finish."""
    import orbax.checkpoint as ocp
    cfg = _tc(tmp_path)
    assert cfg.async_checkpointing
    batches = train_lib.train_batches(cfg)
    expected = list(itertools.islice(train_lib.train_batches(cfg), 3))
    next(batches)
    with run_checkpoints.checkpoint_manager(tmp_path, cfg.keep_checkpoints) as mngr:
        mngr.save(1, args=ocp.args.Composite(**{
            train_lib.ITERATOR_STATE: dataset_checkpoint.DatasetIteratorSave(batches.iterators)}))
        for _ in range(3):
            next(batches)
        mngr.wait_until_finished()
    _same_batches([_restored_next(tmp_path, 1, cfg)], [expected[1]])


def _spy(monkeypatch):
    """Record what train() draws from its TrainBatches and every skip."""
    drawn, skips = [], []
    real_next, real_skip = train_lib.TrainBatches.__next__, train_lib.TrainBatches.skip

    def spy_next(self):
        b = real_next(self)
        drawn.append(b)
        return b

    def spy_skip(self, n):
        skips.append(n)
        return real_skip(self, n)

    monkeypatch.setattr(train_lib.TrainBatches, "__next__", spy_next)
    monkeypatch.setattr(train_lib.TrainBatches, "skip", spy_skip)
    return drawn, skips


def test_both_resume_paths_give_the_uninterrupted_batches(runs, tmp_path, monkeypatch):
    root, reference = runs
    drawn, skips = _spy(monkeypatch)
    # With iterator state: restored, nothing skipped.
    restored_dir = tmp_path / "restored"
    shutil.copytree(root / "with", restored_dir)
    a = train_lib.train(MODEL, _tc(restored_dir, train_steps=6))
    assert (a.resumed_from, a.data_resume, skips) == (4, "restored", [])
    _same_batches(drawn, reference[4:6])
    # A checkpoint without iterator state (CHECKPOINT_DATASET=False then) resumes by skipping, now saving the state.
    drawn.clear()
    skipped_dir = tmp_path / "skipped"
    shutil.copytree(root / "without", skipped_dir)
    b = train_lib.train(MODEL, _tc(skipped_dir, train_steps=6))
    assert (b.resumed_from, b.data_resume, skips) == (4, "skipped", [4])
    _same_batches(drawn, reference[4:6])
    # Same data, same parameters, bit for bit.
    import jax
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, b.params)
    # The state saved after a skipping resume restores into a fresh pipeline (the skip is not part of it).
    _same_batches([_restored_next(skipped_dir, 6, _tc(skipped_dir))], [reference[6]])


def test_when_saved_state_is_not_used(runs):
    root, _ = runs
    saved = _data_item(root / "with", 4)
    cfg = _tc(root / "with")
    assert train_lib.skip_reason(cfg, saved, process_count=1) is None
    # Another process count (same shards, so the same global batches): fall back to skipping, saying why.
    assert train_lib.skip_reason(cfg, saved, process_count=2) == (
        "its iterator state was saved with process_count=1, num_data_shards=1; this run has process_count=2, "
        "num_data_shards=2")
    assert "inputs_length=32; this run has inputs_length=64" in train_lib.skip_reason(
        _tc(root / "with", inputs_length=64), saved, 1)
    assert train_lib.skip_reason(_tc(root / "with", checkpoint_dataset=False), saved, 1) == \
        "CHECKPOINT_DATASET is False"
    assert "has no data iterator state" in train_lib.skip_reason(cfg, _data_item(root / "without", 4), 1)


def test_restoring_into_another_shard_layout_is_a_clear_error(runs):
    import orbax.checkpoint as ocp
    root, _ = runs
    run = root / "with"
    cfg = _tc(run)
    two_shards = train_lib.train_batches(_tc(run, num_data_shards=2))  # shard_0_of_2, shard_1_of_2
    with run_checkpoints.checkpoint_manager(run, cfg.keep_checkpoints) as mngr:
        with pytest.raises(ValueError, match=r"cannot restore iterator state .*process_0_of_1 into this run's "
                                             r"data shards \['shard_0_of_2', 'shard_1_of_2'\]"):
            mngr.restore(4, args=ocp.args.Composite(**{train_lib.ITERATOR_STATE: dataset_checkpoint.
                                                       DatasetIteratorRestore(two_shards.iterators)}))
        with pytest.raises(FileNotFoundError, match="no iterator state for process 1 of 2"):
            mngr.restore(4, args=ocp.args.Composite(**{train_lib.ITERATOR_STATE: dataset_checkpoint.
                                                       DatasetIteratorRestore({}, 1, 2)}))

"""tf.data iterator state as an item of our orbax training checkpoints (T5X's `checkpoint_dataset`).

A resumed run restores the iterators instead of rebuilding the pipeline and skipping the batches already consumed
(tf.data's `skip` computes every skipped element). The state is TensorFlow's own iterator checkpoint
(`tf.train.Checkpoint(shard_<s>_of_<n>=iterator).write`): it holds the position in the input files and the
contents of every buffer in the pipeline (seqio's shuffle buffer of preprocessed examples, prefetch buffers).

Item directory `checkpoints/<step>/data_iterators/` holds one TF checkpoint per process,
`process_<i>_of_<n>.{index,data-*}` (like T5X's `train_ds-<i>-of-<n>`), with one iterator per data shard the
process reads. It is written by every process, into the same orbax step directory as params / opt_state / data, so
a step is complete with its iterator state or not at all.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import orbax.checkpoint as ocp
from etils import epath


def state_prefix(directory: epath.PathLike, process_index: int, process_count: int) -> epath.Path:
    """The TF checkpoint prefix of one process's iterators inside the item directory."""
    return epath.Path(directory) / f"process_{process_index}_of_{process_count}"


class DatasetIteratorHandler(ocp.CheckpointHandler):
    """Writes / reads this process's tf.data iterators.

    Deliberately a synchronous `CheckpointHandler`, not an `AsyncCheckpointHandler`: orbax's composite handler runs
    a synchronous item to completion inside `CheckpointManager.save()` (only async items are committed in the
    background), so the state written is the iterators' state at the save call even with async checkpointing,
    when the training loop advances the iterators right after `save()` returns.
    """

    def save(self, directory: epath.Path, args: DatasetIteratorSave) -> None:
        from gqa_uptrain.tf_quiet import tf
        prefix = state_prefix(directory, args.process_index, args.process_count)
        tf.train.Checkpoint(**args.iterators).write(str(prefix))

    def restore(self, directory: epath.Path, args: DatasetIteratorRestore) -> Mapping[str, Any]:
        """Restores the saved state into `args.iterators` (in place) and returns them."""
        from gqa_uptrain.tf_quiet import tf
        prefix = state_prefix(directory, args.process_index, args.process_count)
        if not epath.Path(f"{prefix}.index").exists():
            raise FileNotFoundError(f"{directory} has no iterator state for process {args.process_index} of "
                                    f"{args.process_count} ({prefix.name}.index)")
        try:
            # assert_consumed: every saved iterator was restored into one of ours and none of ours was left out,
            # i.e. this run reads the shards the state was saved for.
            tf.train.Checkpoint(**args.iterators).read(str(prefix)).assert_consumed()
        except (AssertionError, tf.errors.OpError) as e:
            raise ValueError(f"cannot restore iterator state {prefix} into this run's data shards "
                             f"{sorted(args.iterators)}: {str(e).strip().splitlines()[0]}") from None
        return args.iterators


def _default_process(index: int | None, count: int | None) -> tuple[int, int]:
    import jax
    return (jax.process_index() if index is None else index, jax.process_count() if count is None else count)


@ocp.args.register_with_handler(DatasetIteratorHandler, for_save=True)
@dataclasses.dataclass
class DatasetIteratorSave(ocp.args.CheckpointArgs):
    """iterators: this process's tf.data iterators (`iter(dataset)`), by name (`shard_<s>_of_<n>`)."""

    iterators: Mapping[str, Any]
    process_index: int | None = None  # default: jax.process_index()
    process_count: int | None = None  # default: jax.process_count()

    def __post_init__(self) -> None:
        self.process_index, self.process_count = _default_process(self.process_index, self.process_count)


@ocp.args.register_with_handler(DatasetIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DatasetIteratorRestore(ocp.args.CheckpointArgs):
    """iterators: fresh iterators over the same pipelines, by the names they were saved under; restored in place."""

    iterators: Mapping[str, Any]
    process_index: int | None = None
    process_count: int | None = None

    def __post_init__(self) -> None:
        self.process_index, self.process_count = _default_process(self.process_index, self.process_count)

"""The orbax checkpoint managers of a training run directory, behind one small object.

MODEL_DIR/checkpoints/<step>/{params,opt_state,data,data_iterators}: the rotating training checkpoints (last
KEEP_CHECKPOINTS). MODEL_DIR/best/checkpoints/<step>/params: with KEEP_BEST, the parameters of the lowest eval loss.
`RunCheckpoints` owns both managers: restore the newest checkpoint that restores (falling back past damaged ones,
gqa_uptrain/recovery.py), restore the data iterators, save a step, save a best candidate, wait, close. It knows
nothing about finiteness or the loop: the Trainer decides what and when to save.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax

ITERATOR_STATE = "data_iterators"  # checkpoint item with the tf.data iterator state, and its key in the `data` item
BEST_DIR = "best"
ITEMS = ("params", "opt_state", "data", ITERATOR_STATE)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `abstract` carrying `shardings`: what orbax restores into."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def checkpoint_manager(model_dir: pathlib.Path, keep: int | None, async_checkpointing: bool = True,
                       keep_steps: tuple[int, ...] = ()):
    """The rotating training checkpoints of MODEL_DIR (keeps the last `keep`; None keeps all), plus the steps in
    `keep_steps` (TrainConfig.save_steps), which rotation never deletes."""
    import orbax.checkpoint as ocp
    from gqa_uptrain.checkpoint import TRAIN_CHECKPOINTS_DIR
    rotation: dict[str, Any] = {"max_to_keep": keep}
    if keep_steps and keep is not None:
        from orbax.checkpoint import checkpoint_managers as policies
        rotation = {"preservation_policy": policies.AnyPreservationPolicy(
            [policies.LatestN(keep), policies.CustomSteps(list(keep_steps))])}
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=async_checkpointing, **rotation)
    return ocp.CheckpointManager((pathlib.Path(model_dir) / TRAIN_CHECKPOINTS_DIR).absolute(), item_names=ITEMS,
                                 options=options)


def best_manager(model_dir: pathlib.Path, async_checkpointing: bool = True):
    """Parameters of the lowest-eval-loss step: orbax keeps the single best of the saves it is given."""
    import orbax.checkpoint as ocp
    from gqa_uptrain.checkpoint import TRAIN_CHECKPOINTS_DIR
    options = ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["loss"], best_mode="min",
                                           create=True, enable_async_checkpointing=async_checkpointing)
    return ocp.CheckpointManager((pathlib.Path(model_dir) / BEST_DIR / TRAIN_CHECKPOINTS_DIR).absolute(),
                                 item_names=("params",), options=options)


class RunCheckpoints:
    """The training checkpoints of one run (and, with `keep_best`, its best-parameters checkpoint)."""

    def __init__(self, model_dir: pathlib.Path, keep: int | None, keep_best: bool = False,
                 async_checkpointing: bool = True, keep_steps: tuple[int, ...] = ()):
        self.model_dir = pathlib.Path(model_dir).absolute()
        self._closed = False
        self.manager = checkpoint_manager(self.model_dir, keep, async_checkpointing, keep_steps)
        self.best = None
        if keep_best:
            self.best = best_manager(self.model_dir, async_checkpointing)

    @property
    def directory(self) -> pathlib.Path:
        return pathlib.Path(self.manager.directory)

    def restore_newest_good(self, param_abstract: Any, opt_abstract: Any,
                            primary: bool) -> tuple[int | None, dict[str, Any] | None]:
        """(step, {"params", "opt_state", "data"}) of the newest checkpoint that restores, or (None, None).
        `*_abstract` are ShapeDtypeStructs with shardings (`with_shardings`). Damaged steps are moved aside."""
        import orbax.checkpoint as ocp

        from gqa_uptrain import recovery

        def restore(step: int) -> Any:
            return self.manager.restore(step, args=ocp.args.Composite(
                data=ocp.args.JsonRestore(), params=ocp.args.StandardRestore(param_abstract),
                opt_state=ocp.args.StandardRestore(opt_abstract)))
        return recovery.restore_newest_good(self.manager, self.model_dir, restore, primary)

    def restore_iterators(self, step: int, iterators: dict[str, Any]) -> None:
        """Restore step's tf.data iterator state into `iterators` (in place); a clear error when it does not fit."""
        import orbax.checkpoint as ocp

        from gqa_uptrain import dataset_checkpoint
        try:
            self.manager.restore(step, args=ocp.args.Composite(**{
                ITERATOR_STATE: dataset_checkpoint.DatasetIteratorRestore(iterators)}))
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"checkpoint step {step}: {str(e).splitlines()[0]} (resume with "
                             "--gin.CHECKPOINT_DATASET=False to rebuild the pipeline and skip instead)") from None

    def save(self, step: int, params: Any, opt_state: Any, data: dict[str, Any],
             iterators: dict[str, Any] | None) -> None:
        """Save one training step (asynchronously when configured). `iterators`: the tf.data iterators, written
        before this returns (a synchronous item), or None to save no iterator state."""
        import orbax.checkpoint as ocp

        from gqa_uptrain import dataset_checkpoint
        items = {"params": ocp.args.StandardSave(params), "opt_state": ocp.args.StandardSave(opt_state),
                 "data": ocp.args.JsonSave(data)}
        if iterators is not None:
            items[ITERATOR_STATE] = dataset_checkpoint.DatasetIteratorSave(iterators)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def save_best(self, step: int, params: Any, loss: float) -> None:
        """Offer step's parameters to the best-checkpoint manager; it keeps the lowest `loss`."""
        import orbax.checkpoint as ocp
        self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                       metrics={"loss": loss}, force=True)

    def wait(self) -> None:
        """Block until every pending (asynchronous) save is committed."""
        self.manager.wait_until_finished()
        if self.best is not None:
            self.best.wait_until_finished()

    def close(self) -> None:
        """Close both managers (waits for pending saves); closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        self.manager.close()
        if self.best is not None:
            self.best.close()

"""Optimiser and learning-rate schedules for (up)training, and the shardings of the optimiser state.

T5 / T5X recipe: Adafactor with factored second moments (decay_rate 0.8, update clipping at RMS 1.0, no momentum,
updates scaled by the parameter RMS, eps 1e-30) and the inverse-square-root schedule
``lr(step) = base / sqrt(max(step, warmup_steps))`` with base 1.0 and warmup_steps 10,000.

Uptraining continues the source checkpoint's schedule: with ``step_offset = original_steps`` (T5.1.1: 1,000,000)
step 0 of the uptraining run gets ``1/sqrt(1e6) = 1e-3``, as a run that simply kept pre-training would. The
optimiser *statistics* start fresh (the paper restores parameters only), so Adafactor's own decay
``1 - (count + 1)^-0.8`` restarts at count 0, which is what makes fresh second-moment estimates unbiased.

Nothing here imports gin; `gqa_uptrain.cli.train_cmd` binds these settings from gin files.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

ScheduleName = Literal["rsqrt", "constant", "linear_warmup_rsqrt"]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Adafactor hyper-parameters (T5X defaults) and the learning-rate schedule."""

    schedule: ScheduleName = "rsqrt"
    base_learning_rate: float = 1.0
    warmup_steps: int = 10_000
    # Added to the optimiser step before the schedule is evaluated: the source checkpoint's pre-training step when
    # uptraining, so the learning rate continues where pre-training stopped.
    step_offset: int = 0
    decay_rate: float = 0.8
    clipping_threshold: float | None = 1.0
    momentum: float | None = None
    multiply_by_parameter_scale: bool = True
    min_dim_size_to_factor: int = 128
    eps: float = 1e-30
    weight_decay_rate: float | None = None

    def __post_init__(self) -> None:
        if self.schedule not in ("rsqrt", "constant", "linear_warmup_rsqrt"):
            raise ValueError(f"OptimizerConfig.schedule must be 'rsqrt', 'constant' or 'linear_warmup_rsqrt', "
                             f"got {self.schedule!r}")
        # Caught here, before any step: an absurd value (e.g. 1e39) diverges in one step and wastes the run.
        check_range("LEARNING_RATE (OptimizerConfig.base_learning_rate)", self.base_learning_rate, 0, MAX_LEARNING_RATE,
                     low_open=True)
        check_range("OptimizerConfig.decay_rate", self.decay_rate, 0, 1, low_open=True)
        check_range("OptimizerConfig.eps", self.eps, 0, 1)
        if self.clipping_threshold is not None:
            check_range("OptimizerConfig.clipping_threshold", self.clipping_threshold, 0, math.inf, low_open=True)
        if self.momentum is not None:
            check_range("OptimizerConfig.momentum", self.momentum, 0, 1)
        if self.weight_decay_rate is not None:
            check_range("OptimizerConfig.weight_decay_rate", self.weight_decay_rate, 0, 1)
        if self.warmup_steps < 0 or self.step_offset < 0:
            raise ValueError("OptimizerConfig.warmup_steps and step_offset must be >= 0")


# The largest base learning rate accepted: T5's rsqrt recipe uses 1.0 (scaled by 1/sqrt(step)); values this far
# above it only diverge.
MAX_LEARNING_RATE = 1000.0


def check_range(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    """ValueError naming the setting unless `value` is a finite number in [low, high] ((low, high] if low_open)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v > high or v < low or (low_open and v == low):
        raise ValueError(f"{name} must be finite and in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")


def learning_rate_schedule(cfg: OptimizerConfig) -> Callable[[jax.Array], jax.Array]:
    """count (int32 scalar, optimiser steps taken in this run) -> learning rate (float32 scalar).

    rsqrt:               base / sqrt(max(count + offset, warmup))          (T5: constant 1e-2 for 10k steps, then decay)
    linear_warmup_rsqrt: as rsqrt, times min(1, (count + offset) / warmup) (a linear ramp instead of the plateau)
    constant:            base                                               (fine-tuning: 1e-3)
    """
    base, warmup, offset = float(cfg.base_learning_rate), float(max(cfg.warmup_steps, 1)), float(cfg.step_offset)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + offset
        if cfg.schedule == "constant":
            return jnp.full((), base, jnp.float32)
        lr = base * jax.lax.rsqrt(jnp.maximum(step, warmup))
        if cfg.schedule == "linear_warmup_rsqrt":
            lr = lr * jnp.minimum(1.0, (step + 1.0) / warmup)
        return lr

    return schedule


def _scale_by_param_block_rms(min_scale: float = 1e-3) -> optax.GradientTransformation:
    """optax.scale_by_param_block_rms with the same values: u * max(rms(p), min_scale).

    optax's numerics.safe_root_mean_squares computes the RMS a second time over where(rms <= min, ones, p) (for a
    NaN-free gradient w.r.t. p, which an optimiser never takes); on XLA:CPU that materialises a select over every
    parameter and a second reduction per step. Where rms > min_scale both RMS passes are the same reduction of the
    same values, elsewhere both give min_scale, so the result is unchanged. Same (empty) state as optax's.
    """

    def update_fn(updates, state, params):
        if params is None:
            raise ValueError("scale_by_param_block_rms needs the parameters")
        return jax.tree.map(lambda u, p: u * jnp.maximum(jnp.sqrt(jnp.mean(jnp.square(p))), min_scale),
                            updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """optax Adafactor with the T5X settings in `cfg` and its learning-rate schedule.

    The same chain as `optax.adafactor` (same transformations, order and state tree, so checkpoints of either load
    into the other), with its parameter-scale step replaced by `_scale_by_param_block_rms` (same values, fewer
    passes over the parameters).
    """
    tx = [optax.scale_by_factored_rms(True, cfg.decay_rate, 0, cfg.min_dim_size_to_factor, cfg.eps)]
    if cfg.clipping_threshold is not None:
        tx.append(optax.clip_by_block_rms(cfg.clipping_threshold))
    tx.append(optax.scale_by_learning_rate(learning_rate_schedule(cfg), flip_sign=False))
    if cfg.multiply_by_parameter_scale:
        tx.append(_scale_by_param_block_rms())
    if cfg.momentum is not None:
        tx.append(optax.ema(cfg.momentum, debias=False, accumulator_dtype=jnp.float32))
    if cfg.weight_decay_rate is not None:
        tx.append(optax.add_decayed_weights(cfg.weight_decay_rate))
    tx.append(optax.scale(-1))
    return optax.chain(*tx)


# ----------------------------------------------------------------------------------------------- opt-state sharding


def _removed_axis(param_shape: tuple[int, ...], leaf_shape: tuple[int, ...], field: str,
                  min_dim_size_to_factor: int) -> int | None:
    """Which parameter axis a factored Adafactor statistic (`v_row` / `v_col`) reduced away, or None."""
    if len(leaf_shape) != len(param_shape) - 1:
        return None
    # optax: (d1, d0) = (second largest, largest) axes; v_row drops d0, v_col drops d1.
    sorted_dims = np.argsort(param_shape)
    if len(param_shape) >= 2 and param_shape[sorted_dims[-2]] >= min_dim_size_to_factor:
        d1, d0 = int(sorted_dims[-2]), int(sorted_dims[-1])
        axis = d0 if field == "v_row" else d1
        if tuple(np.delete(param_shape, axis)) == tuple(leaf_shape):
            return axis
    # Fallback (a different optax factoring rule): the unique axis whose removal gives the statistic's shape.
    hits = [i for i in range(len(param_shape)) if tuple(np.delete(param_shape, i)) == tuple(leaf_shape)]
    return hits[0] if len(hits) == 1 else None


def _key_name(k: Any) -> str | None:
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    return None


def opt_state_partition_specs(opt_state_shapes: Any, param_specs: Any, param_shapes: Any,
                              min_dim_size_to_factor: int = 128) -> Any:
    """PartitionSpecs for an optax state tree, derived from the parameters' specs.

    A state leaf that sits under a parameter's path (Adafactor's `v`, momentum, ...) takes that parameter's spec if
    it has the parameter's shape; the factored statistics `v_row` / `v_col` (one axis reduced away) take the spec
    with that axis removed; scalars, (1,)-placeholders and counters are replicated.
    """
    flat_specs = {tuple(_key_name(k) for k in path): spec for path, spec in
                  jax.tree_util.tree_flatten_with_path(param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]}
    flat_shapes = {tuple(_key_name(k) for k in path): tuple(x.shape) for path, x in
                   jax.tree_util.tree_flatten_with_path(param_shapes)[0]}

    def spec_for(path, leaf):
        names = [_key_name(k) for k in path]
        shape = tuple(np.shape(leaf))
        # The parameter path is the longest suffix of the state path that names a parameter.
        for start in range(len(names)):
            key = tuple(names[start:])
            if key in flat_specs:
                pspec, pshape = flat_specs[key], flat_shapes[key]
                field = names[start - 1] if start > 0 else None
                entries = tuple(pspec) + (None,) * (len(pshape) - len(pspec))
                if shape == pshape:
                    return PartitionSpec(*entries)
                if field in ("v_row", "v_col"):
                    axis = _removed_axis(pshape, shape, field, min_dim_size_to_factor)
                    if axis is not None:
                        return PartitionSpec(*(e for i, e in enumerate(entries) if i != axis))
                return PartitionSpec()
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec_for, opt_state_shapes)


def opt_state_shardings(optimizer: optax.GradientTransformation, param_shardings: Any, param_shapes: Any,
                        mesh: jax.sharding.Mesh, min_dim_size_to_factor: int = 128) -> tuple[Any, Any]:
    """(abstract opt state, NamedShardings) for `optimizer.init(params)` under the params' shardings."""
    abstract = jax.eval_shape(optimizer.init, param_shapes)
    param_specs = jax.tree.map(lambda s: s.spec, param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    specs = opt_state_partition_specs(abstract, param_specs, param_shapes, min_dim_size_to_factor)
    return abstract, jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def opt_state_bytes_per_device(optimizer: optax.GradientTransformation, param_specs: Any, param_shapes: Any,
                               mesh_shape: Mapping[str, int], min_dim_size_to_factor: int = 128) -> tuple[int, int]:
    """(bytes per device, total bytes) of the optimiser state, from `jax.eval_shape` and the derived specs."""
    from gqa_uptrain.sharding import bytes_per_device
    abstract = jax.eval_shape(optimizer.init, param_shapes)
    specs = opt_state_partition_specs(abstract, param_specs, param_shapes, min_dim_size_to_factor)
    leaves = jax.tree.leaves(abstract)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    per_device = sum(bytes_per_device(x.shape, x.dtype.itemsize, s, mesh_shape) for x, s in zip(leaves, spec_leaves))
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in leaves)
    return per_device, total

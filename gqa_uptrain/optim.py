"""Optimiser and learning-rate schedules for (up)training, and the shardings of the optimiser state.

T5 / T5X recipe: Adafactor with factored second moments (decay_rate 0.8, update clipping at RMS 1.0, no momentum,
updates scaled by the parameter RMS, eps 1e-30) and the inverse-square-root schedule
``lr(step) = base / sqrt(max(step, warmup_steps))`` with base 1.0 and warmup_steps 10,000.

Uptraining continues the source checkpoint's schedule: with ``step_offset = original_steps`` (T5.1.1: 1,000,000)
step 0 of the uptraining run gets ``1/sqrt(1e6) = 1e-3``, as a run that simply kept pre-training would. By default
the optimiser *statistics* start fresh (the paper restores parameters only), so Adafactor's own decay
``1 - (count + 1)^-0.8`` restarts at count 0, which is what makes fresh second-moment estimates unbiased. Two
remedies for the shock of that restart: a short linear learning-rate ramp (`OptimizerConfig.restart_warmup_steps`),
or statistics carried through conversion (`convert --carry-optimizer-state`; `carried_opt_state` rebuilds the optax
state from them with the source's count, so the decay continues where pre-training left it).

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
    # Linear learning-rate ramp over this run's first steps, lr * min(1, (count + 1) / restart_warmup_steps) with
    # count = optimiser steps taken in this run (0 = off). For restarts from fresh Adafactor state, whose first
    # updates are normalised by a single gradient's square.
    restart_warmup_steps: int = 0

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
        if self.warmup_steps < 0 or self.step_offset < 0 or self.restart_warmup_steps < 0:
            raise ValueError("OptimizerConfig.warmup_steps, step_offset and restart_warmup_steps must be >= 0")


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
    Any of them times min(1, (count + 1) / restart_warmup_steps) when restart_warmup_steps > 0 (a ramp over this
    run's own first steps, whatever the offset).
    """
    base, warmup, offset = float(cfg.base_learning_rate), float(max(cfg.warmup_steps, 1)), float(cfg.step_offset)
    restart = float(cfg.restart_warmup_steps)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + offset
        if cfg.schedule == "constant":
            lr = jnp.full((), base, jnp.float32)
        else:
            lr = base * jax.lax.rsqrt(jnp.maximum(step, warmup))
            if cfg.schedule == "linear_warmup_rsqrt":
                lr = lr * jnp.minimum(1.0, (step + 1.0) / warmup)
        if restart:
            lr = lr * jnp.minimum(1.0, (jnp.asarray(count, jnp.float32) + 1.0) / restart)
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


# ----------------------------------------------------------------------------------------------- Adafactor statistics
# One parameter's second-moment statistics as a dict: {"v_row", "v_col"} (factored) or {"v"} (full), in optax's
# (and T5X's, for 2-D parameters) convention: v_row is the mean of g^2 over axis d0, v_col over axis d1.


def factored_dims(shape: tuple[int, ...], min_dim_size_to_factor: int) -> tuple[int, int] | None:
    """(d1, d0) = (second largest, largest) axis of a parameter Adafactor factors, or None (optax's and T5X's rule:
    factored when the second largest axis has at least min_dim_size_to_factor entries)."""
    if len(shape) < 2:
        return None
    sorted_dims = np.argsort(shape)
    if shape[sorted_dims[-2]] < min_dim_size_to_factor:
        return None
    return int(sorted_dims[-2]), int(sorted_dims[-1])


def second_moment(stats: Mapping[str, np.ndarray], shape: tuple[int, ...], name: str = "parameter") -> np.ndarray:
    """Adafactor's estimate of E[g^2] [shape]: `v`, or the rank-1 reconstruction its update divides by,
    (v_row / mean(v_row)) x v_col. ValueError naming `name` when the statistics do not fit `shape`."""
    shape = tuple(shape)
    if "v" in stats:
        v = np.asarray(stats["v"], np.float32)
        if v.shape != shape:
            raise ValueError(f"{name}: second moment v has shape {v.shape}, expected {shape}")
        return v
    v_row, v_col = np.asarray(stats["v_row"], np.float32), np.asarray(stats["v_col"], np.float32)
    dims = factored_dims(shape, 0)
    if dims is None or v_row.shape != tuple(np.delete(shape, dims[1])) or \
            v_col.shape != tuple(np.delete(shape, dims[0])):
        raise ValueError(f"{name}: factored statistics v_row {v_row.shape} / v_col {v_col.shape} do not fit a "
                         f"parameter of shape {shape}")
    d1, d0 = dims
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    mean = np.mean(v_row, axis=reduced_d1, keepdims=True)
    ratio = np.divide(v_row, mean, out=np.zeros_like(v_row), where=mean > 0)  # all-zero (fresh) rows stay zero
    return np.expand_dims(ratio, d0) * np.expand_dims(v_col, d1)


def factor_second_moment(v: np.ndarray, min_dim_size_to_factor: int) -> dict[str, np.ndarray]:
    """E[g^2] [shape] -> the statistics Adafactor keeps for that shape (row / column means, or v itself).
    Exact inverse of `second_moment` on factored statistics."""
    v = np.asarray(v, np.float32)
    dims = factored_dims(v.shape, min_dim_size_to_factor)
    if dims is None:
        return {"v": v}
    d1, d0 = dims
    return {"v_row": v.mean(axis=d0), "v_col": v.mean(axis=d1)}


def fit_statistics(stats: Mapping[str, np.ndarray], shape: tuple[int, ...], min_dim_size_to_factor: int,
                   name: str = "parameter") -> dict[str, np.ndarray]:
    """`stats` in the form an optimizer with this min_dim_size_to_factor keeps for `shape`: unchanged when already
    in that form, else re-factored through `second_moment`."""
    dims = factored_dims(tuple(shape), min_dim_size_to_factor)
    if dims is None and "v" in stats:
        second_moment(stats, shape, name)  # checks the shape
        return {"v": np.asarray(stats["v"], np.float32)}
    if dims is not None and "v_row" in stats:
        d1, d0 = dims
        if (np.shape(stats["v_row"]) == tuple(np.delete(shape, d0))
                and np.shape(stats["v_col"]) == tuple(np.delete(shape, d1))):
            return {k: np.asarray(stats[k], np.float32) for k in ("v_row", "v_col")}
    return factor_second_moment(second_moment(stats, shape, name), min_dim_size_to_factor)


def carried_opt_state(abstract_state: Any, param_shapes: Any, moments: Mapping[str, Mapping[str, np.ndarray]],
                      count: int, min_dim_size_to_factor: int) -> Any:
    """Host (numpy) optimizer state with Adafactor's statistics and count carried over.

    abstract_state: `jax.eval_shape(optimizer.init, param_shapes)` (as `opt_state_shardings` returns it).
    moments: flat parameter name ('decoder/layers_0/mlp/wo/kernel') -> statistics (see `second_moment`), re-factored
    where this optimizer factors a parameter differently. The factored-RMS state gets `count` (Adafactor's decay
    1 - (count + 1)^-0.8 continues from it); every other part of the chain starts as `optimizer.init` starts it
    (the schedule's count at 0, since `step_offset` carries the source's step; momentum at zero).
    """
    state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract_state)
    flat_shapes = {"/".join(_key_name(k) for k in path): tuple(x.shape)
                   for path, x in jax.tree_util.tree_flatten_with_path(param_shapes)[0]}
    missing = sorted(set(flat_shapes) - set(moments))
    if missing:
        raise ValueError(f"carried optimizer state has no statistics for {len(missing)} parameter(s), first "
                         f"{missing[0]!r}")
    fitted = {n: fit_statistics(moments[n], s, min_dim_size_to_factor, n) for n, s in flat_shapes.items()}

    def fill(field):
        def leaf(path, placeholder):
            return fitted["/".join(_key_name(k) for k in path)].get(field, placeholder)
        return leaf

    found = False
    out = []
    for part in (state if isinstance(state, tuple) else (state,)):
        if isinstance(part, optax.FactoredState):
            found = True
            part = part._replace(count=np.asarray(count, np.int32),
                                 **{f: jax.tree_util.tree_map_with_path(fill(f), getattr(part, f))
                                    for f in ("v_row", "v_col", "v")})
        out.append(part)
    if not found:
        raise ValueError("this optimizer has no Adafactor factored-RMS state to carry statistics into")
    return tuple(out) if isinstance(state, tuple) else out[0]


# ----------------------------------------------------------------------------------------------- opt-state sharding


def _removed_axis(param_shape: tuple[int, ...], leaf_shape: tuple[int, ...], field: str,
                  min_dim_size_to_factor: int) -> int | None:
    """Which parameter axis a factored Adafactor statistic (`v_row` / `v_col`) reduced away, or None."""
    if len(leaf_shape) != len(param_shape) - 1:
        return None
    dims = factored_dims(param_shape, min_dim_size_to_factor)
    if dims is not None:
        d1, d0 = dims
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

"""Logical axis rules and mesh helpers.

Parameters and activations are annotated with logical axis names in `model` / `attention`; this table maps them to
mesh axes (`data`, `fsdp`, `model`). A mesh axis is dropped for a dimension it does not divide (e.g. a single
key/value head of width 64 on a 128-way model axis), so one config runs on 1 device or a pod slice.

Heads are atomic: the `joined_kv` / `joined_grouped_kv` dimensions are num_heads * head_dim wide, and with
`head_dim` given, a mesh axis splits them only by whole heads. Without that, MQA's single 64-wide key/value head
would be cut into four 16-wide slices on `model=4`, and every attention step would all-gather them; with it the
kernels (and the decode cache, `cache_partition_specs`) are replicated over `model` when G does not divide by it.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
# Logical axes that are heads * head_dim wide: split by whole heads only (see module docstring).
HEAD_JOINED_AXES = ("joined_kv", "joined_grouped_kv")
_log = logging.getLogger(__name__)

# (logical name, mesh axis or tuple of mesh axes or None)
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("joined_grouped_kv", "model"),
    ("relpos_buckets", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "model"),
    ("activation_heads", "model"),
    ("activation_kv", None),
    ("activation_vocab", "model"),
)


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'data=2,fsdp=4,model=1' -> {'data': 2, 'fsdp': 4, 'model': 1} (missing axes are 1)."""
    shape = {a: 1 for a in MESH_AXES}
    if not spec:
        return shape
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in shape or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"bad mesh entry {part!r} in {spec!r}: expected NAME=N with NAME in {MESH_AXES}")
        shape[name] = int(value)
    return shape


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` over (data, fsdp, model). A `data` of -1 takes all remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = dict(shape or {"data": -1})
    dims = [shape.get(a, 1) for a in MESH_AXES]
    if dims.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split by fixed mesh axes {shape}")
        dims[dims.index(-1)] = len(devices) // known
    if math.prod(dims) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, dims))} needs {math.prod(dims)} devices, "
                         f"{len(devices)} available")
    return Mesh(np.asarray(devices).reshape(dims), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _mesh_axes_for(logical: str | None, rules: Mapping[str, Any]) -> tuple[str, ...]:
    if logical is None:
        return ()
    if logical not in rules:
        raise KeyError(f"logical axis {logical!r} has no sharding rule; add it to the rules table")
    target = rules[logical]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_mesh_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
                         rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                         head_dim: int | None = None) -> PartitionSpec:
    """Map one array's logical axes to a PartitionSpec, replicating dims a mesh axis does not divide and never
    using a mesh axis twice. With head_dim, HEAD_JOINED_AXES dims are divided in units of whole heads."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, size in zip(logical_axes, shape):
        units = size // head_dim if head_dim and name in HEAD_JOINED_AXES and size % head_dim == 0 else size
        axes = []
        for ax in _mesh_axes_for(name, table):
            n = mesh_shape.get(ax, 1)
            if ax in used or n == 1:
                continue
            if units % (math.prod(mesh_shape.get(a, 1) for a in axes) * n) == 0:
                axes.append(ax)
            elif units != size:
                _log.info("%s of %d heads does not divide by %s=%d: replicated over %s (heads are not split "
                          "inside head_dim)", name, units, ax, n, ax)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)


def param_partition_specs(boxed_params: Any, mesh_shape: Mapping[str, int],
                          rules: Sequence[tuple[str, Any]] = DEFAULT_RULES, head_dim: int | None = None) -> Any:
    """PartitionSpecs for a tree of `nn.LogicallyPartitioned` params (or their eval_shape structs); pass the
    model's head_dim so heads stay whole (module docstring)."""
    def spec(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return logical_to_mesh_spec(x.names, x.value.shape, mesh_shape, rules, head_dim)
        return PartitionSpec()
    return jax.tree.map(spec, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def param_shardings(boxed_params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES,
                    head_dim: int | None = None) -> Any:
    specs = param_partition_specs(boxed_params, dict(mesh.shape), rules, head_dim)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def bytes_per_device(shape: Sequence[int], itemsize: int, spec: PartitionSpec, mesh_shape: Mapping[str, int]) -> int:
    """Bytes one device holds of an array with this sharding (ceil-divided, as XLA pads)."""
    n = itemsize
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        parts = math.prod(mesh_shape.get(a, 1) for a in axes)
        n *= -(-dim // parts)
    return n


def batch_mesh_axes(mesh_shape: Mapping[str, int]) -> tuple[str, ...] | None:
    """The mesh axes a [batch, ...] array is split over: data and fsdp where larger than 1 (None: replicated)."""
    return tuple(a for a in BATCH_AXES if mesh_shape.get(a, 1) > 1) or None


def cache_partition_specs(cache: Any, mesh_shape: Mapping[str, int]) -> Any:
    """PartitionSpecs for a decode cache (arrays or eval_shape structs).

    cached_key / cached_value [batch, kv_heads, length, head_dim]: batch over data/fsdp (when it divides), kv_heads
    over `model` only when the head count divides by it, head_dim never; anything else (the step counter) is
    replicated. A cache whose G heads do not divide over `model` is replicated there, as its kernels are.
    """
    from flax import traverse_util
    flat = traverse_util.flatten_dict(dict(cache))
    batch = batch_mesh_axes(mesh_shape)
    n_batch = math.prod(mesh_shape.get(a, 1) for a in batch or ())
    m = mesh_shape.get("model", 1)
    specs, logged = {}, set()
    for path, leaf in flat.items():
        if path[-1] in ("cached_key", "cached_value") and len(leaf.shape) == 4:
            b, g = leaf.shape[:2]
            heads = "model" if m > 1 and g % m == 0 else None
            kind = next((p for p in path if "attention" in str(p)), "attention")
            if m > 1 and heads is None and kind not in logged:
                logged.add(kind)
                _log.info("%s cache has %d key/value heads, not divisible by model=%d: replicated over model",
                          kind, g, m)
            specs[path] = PartitionSpec(batch if batch and b % n_batch == 0 else None, heads, None, None)
        else:
            specs[path] = PartitionSpec()
    return traverse_util.unflatten_dict(specs)

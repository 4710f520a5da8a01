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

import difflib
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
    # The leading axis of scanned layer stacks (ModelConfig.scan_layers): every device runs every layer.
    ("layers", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "model"),
    ("activation_heads", "model"),
    ("activation_kv", None),
    ("activation_vocab", "model"),
)


def parse_mesh(spec: str, num_devices: int | None = None, flag: str = "mesh") -> dict[str, int]:
    """The one reading of a mesh flag (train's MESH, inspect's --mesh, with or without --topology).

    'data=2,fsdp=4,model=1' -> {'data': 2, 'fsdp': 4, 'model': 1}: comma-separated NAME=N over MESH_AXES, missing
    axes are 1. At most one N may be -1: the devices left once the other axes are placed. '' puts all devices on
    `data`. With `num_devices` the shape must use exactly that many devices; without one (inspect --mesh alone
    plans for a mesh it does not have) '' means one device and -1 is an error, as there is nothing to fill.
    `flag` names the setting in errors, so a mistake points at the flag the user typed.
    """
    shape: dict[str, int] = {}
    for part in spec.split(",") if spec.strip() else []:
        name, eq, value = (x.strip() for x in part.partition("="))
        if not eq or not name:
            raise ValueError(f"{flag} {spec!r}: entry {part.strip()!r} is not NAME=N (e.g. data=2,fsdp=4,model=1)")
        if name not in MESH_AXES:
            close = difflib.get_close_matches(name, MESH_AXES, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"{flag} {spec!r}: unknown axis {name!r}{hint}; axes are {', '.join(MESH_AXES)}")
        if name in shape:
            raise ValueError(f"{flag} {spec!r}: axis {name} is given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"{flag} {spec!r}: {name}={value!r} is not an integer") from None
        shape[name] = size
    if not shape:
        shape = {"data": -1 if num_devices is not None else 1}
    return _resolve_mesh_shape(shape, num_devices, f"{flag} {spec!r}")


def _resolve_mesh_shape(shape: Mapping[str, int], num_devices: int | None, label: str) -> dict[str, int]:
    """Fill missing axes with 1 and a -1 with the remaining devices; check the product against num_devices."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"{label}: unknown axis {unknown[0]!r}; axes are {', '.join(MESH_AXES)}")
    out = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    for name, size in out.items():
        if size < 1 and size != -1:
            raise ValueError(f"{label}: {name}={size} must be a positive integer or -1 (the remaining devices)")
    free = [a for a, size in out.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"{label}: at most one axis may be -1, got {' and '.join(free)}")
    fixed = math.prod(size for size in out.values() if size != -1)
    if free:
        if num_devices is None:
            raise ValueError(f"{label}: {free[0]}=-1 needs a device count, and none is known here "
                             f"(give every axis a size)")
        if num_devices % fixed:
            raise ValueError(f"{label}: the fixed axes use {fixed} devices, which does not divide the "
                             f"{num_devices} available")
        out[free[0]] = num_devices // fixed
    elif num_devices is not None and fixed != num_devices:
        raise ValueError(f"{label}: needs {fixed} devices, {num_devices} available")
    return out


def make_mesh(shape: str | Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None,
              flag: str = "mesh") -> Mesh:
    """A `Mesh` over (data, fsdp, model) from a mesh flag or shape, read as `parse_mesh` reads it; None (like '')
    puts all devices on `data`."""
    devices = list(devices if devices is not None else jax.devices())
    if shape is None or isinstance(shape, str):
        resolved = parse_mesh(shape or "", len(devices), flag)
    else:
        resolved = _resolve_mesh_shape(shape, len(devices), f"{flag} {dict(shape)}")
    dims = [resolved[a] for a in MESH_AXES]
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
    replicated. A cache whose G heads do not divide over `model` is replicated there, as its kernels are. A scanned
    model's cache (ModelConfig.scan_layers) has a leading [layers] axis, never split.
    """
    from flax import traverse_util
    flat = traverse_util.flatten_dict(dict(cache))
    batch = batch_mesh_axes(mesh_shape)
    n_batch = math.prod(mesh_shape.get(a, 1) for a in batch or ())
    m = mesh_shape.get("model", 1)
    specs, logged = {}, set()
    for path, leaf in flat.items():
        if path[-1] in ("cached_key", "cached_value") and len(leaf.shape) in (4, 5):
            layers = (None,) * (len(leaf.shape) - 4)
            b, g = leaf.shape[len(layers):len(layers) + 2]
            heads = "model" if m > 1 and g % m == 0 else None
            kind = next((p for p in path if "attention" in str(p)), "attention")
            if m > 1 and heads is None and kind not in logged:
                logged.add(kind)
                _log.info("%s cache has %d key/value heads, not divisible by model=%d: replicated over model",
                          kind, g, m)
            specs[path] = PartitionSpec(*layers, batch if batch and b % n_batch == 0 else None, heads, None, None)
        else:
            specs[path] = PartitionSpec()
    return traverse_util.unflatten_dict(specs)

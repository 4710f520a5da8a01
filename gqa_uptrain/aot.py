"""Ahead-of-time compilation for TPU topologies this machine does not have (libtpu, `pip install -e .[tpu]`).

libtpu describes a TPU slice (`jax.experimental.topologies.get_topology_desc`) and compiles for it on the CPU host,
as MaxText's `train_compile.py` does. What is compiled are the jitted functions the trainer and the decoder run:
`train.jit_train_step` (forward, backward, microbatch loop, Adafactor update, with the trainer's shardings and
donation) and the decoder's `decode.encode_and_prefill` / `decode.decode_step` (the model calls of the greedy loop,
with a cache of G heads). XLA's `memory_analysis()` then gives per-device argument / temporary / output bytes and
`cost_analysis()` the FLOPs and bytes accessed of the partitioned (per-device) program.

Time is a roofline *estimate*: max(FLOPs / peak bf16 FLOP/s, bytes accessed / HBM bandwidth) with the chips'
published peaks (CHIPS). It ignores collectives, overlap and efficiency. XLA's own `optimal_seconds` is not used:
issue #12 saw it negative for a Base train step compiled this way (for a tiny decode step here it was positive),
so it cannot be relied on as a time.

Devices are counted as JAX counts them at run time: a v4 (and v5p) chip is one megacore device, so v4 topologies
are requested with chip_config_name="megacore" (libtpu otherwise lists two per chip).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gqa_uptrain import sharding as sharding_lib
from gqa_uptrain.config import ModelConfig

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (Google Cloud TPU system-architecture pages): HBM capacity, peak dense bf16
    FLOP/s and HBM bandwidth. One chip is one JAX device for all of these generations."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bytes_per_second: float
    megacore: bool = False  # libtpu lists 2 TensorCores per chip unless asked for the megacore config


CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GIB, 275e12, 1200e9, megacore=True),
    "v5e": Chip("TPU v5e", 16 * GIB, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95 * GIB, 459e12, 2765e9),
    "v6e": Chip("TPU v6e", 32 * GIB, 918e12, 1640e9),
}


class AotUnavailable(ValueError):
    """libtpu is not installed (or cannot describe TPU topologies) in this environment."""


def chip_for(topology: str) -> Chip:
    gen = topology.split(":", 1)[0].lower()
    if gen not in CHIPS or ":" not in topology:
        raise ValueError(f"topology {topology!r}: expected GEN:AxB[xC] with GEN in {', '.join(CHIPS)} "
                         "(e.g. v5e:2x2, v4:2x2x2, v5p:4x4x4)")
    return CHIPS[gen]


@contextlib.contextmanager
def _quiet_stderr():
    """libtpu writes warnings about missing TPU environment variables to fd 2 on a machine without a TPU; keep them
    out of the user's way (shown on failure, and always with GQA_UPTRAIN_DEBUG=1)."""
    if os.environ.get("GQA_UPTRAIN_DEBUG") == "1":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            tmp.seek(0)
            sys.stderr.write(tmp.read().decode(errors="replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def libtpu_available() -> str | None:
    """None if TPU topologies can be described here, else the reason."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return "libtpu is not installed (pip install -e '.[tpu]')"
    return None


def topology_devices(topology: str) -> list:
    """The devices of a TPU slice, e.g. 'v4:2x2x2' (8 megacore devices), 'v5e:2x2' (4)."""
    chip = chip_for(topology)
    reason = libtpu_available()
    if reason:
        raise AotUnavailable(reason)
    from jax.experimental import topologies
    # libtpu takes a machine-wide lock file by default: a second compiling process (pytest-xdist, a script beside
    # the CLI) would fail with "multi-process lockfile". Nothing here touches a real TPU, so sharing is safe.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"chip_config_name": "megacore"} if chip.megacore else {}
    try:
        with _quiet_stderr():
            desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
    except Exception as e:  # libtpu raises XlaRuntimeError / ValueError for unknown names
        raise ValueError(f"topology {topology!r}: libtpu cannot describe it: {str(e).splitlines()[0]}") from None
    return list(desc.devices)


def topology_mesh(topology: str, mesh_spec: str) -> jax.sharding.Mesh:
    devices = topology_devices(topology)
    try:
        return sharding_lib.make_mesh(mesh_spec, devices, flag="--mesh")
    except ValueError as e:  # the topology's device count is the one surprise here, so name it
        raise ValueError(f"topology {topology} ({len(devices)} JAX devices: one per chip for v4/v5p megacore): "
                         f"{e}") from None


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def report(compiled: Any, chip: Chip, compile_seconds: float) -> dict[str, Any]:
    """Per-device memory, cost and roofline of one compiled program."""
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    args, temp, out = mem.argument_size_in_bytes, mem.temp_size_in_bytes, mem.output_size_in_bytes
    alias = getattr(mem, "alias_size_in_bytes", 0)
    # Donated inputs (parameters, optimiser state, cache) are reused for outputs: count them once.
    total = args + temp + out - alias + getattr(mem, "generated_code_size_in_bytes", 0)
    flops = float(cost.get("flops", 0.0))
    accessed = float(cost.get("bytes accessed", 0.0))
    t_flops, t_bytes = flops / chip.peak_flops, accessed / chip.hbm_bytes_per_second
    return {
        "per_device_bytes": {"arguments": int(args), "temp": int(temp), "output": int(out), "alias": int(alias),
                             "total": int(total)},
        "hbm_bytes": chip.hbm_bytes, "fits": bool(total <= chip.hbm_bytes), "margin_bytes": int(chip.hbm_bytes - total),
        "flops_per_device": flops, "bytes_accessed_per_device": accessed,
        "roofline_seconds": max(t_flops, t_bytes), "roofline_bound": "compute" if t_flops >= t_bytes else "memory",
        "compile_seconds": compile_seconds,
    }


_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 * GIB}


def _oom_report(message: str, chip: Chip, compile_seconds: float) -> dict[str, Any]:
    """The TPU compiler refuses a program that cannot fit in HBM (CompileTimeHbmOom); it still says how much it
    needed, which is what a plan needs (e.g. how many more microbatches)."""
    line = next((ln for ln in message.splitlines() if "memory" in ln.lower()), message.splitlines()[0])
    sizes = [float(v) * _UNITS[u] for v, u in re.findall(r"(\d+(?:\.\d+)?)([KMGT]?)(?:i?B)?\b", line)
             if u or float(v) > 1e6]
    needed = int(max(sizes)) if sizes else None
    return {"per_device_bytes": {"arguments": None, "temp": None, "output": None, "alias": None,
                                 "total": needed},
            "hbm_bytes": chip.hbm_bytes, "fits": False,
            "margin_bytes": None if needed is None else int(chip.hbm_bytes - needed),
            "flops_per_device": None, "bytes_accessed_per_device": None, "roofline_seconds": None,
            "roofline_bound": None, "compile_seconds": compile_seconds, "compile_error": line.strip()}


def _compile(jitted: Any, args: tuple, mesh: jax.sharding.Mesh, chip: Chip) -> dict[str, Any]:
    """Lower and compile for the topology; `report` of the result, or `_oom_report` when it cannot fit."""
    import flax.linen as nn
    t0 = time.perf_counter()
    lowered = None
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.DEFAULT_RULES), _quiet_stderr():
            traced = jitted.trace(*args)
            lowered = traced.lower()
            t_lower = time.perf_counter() - t0
            compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e) or lowered is None:
            raise
        out = _oom_report(str(e), chip, time.perf_counter() - t0)
        out.update(lower_seconds=t_lower, hlo_ops={"lowered": hlo_op_count(lowered.as_text())})
        return out
    out = report(compiled, chip, time.perf_counter() - t0)
    apply_loop_factor(out, traced.jaxpr.jaxpr, chip, mesh.size)
    # Where a long compile's time goes (tracing + lowering in Python vs XLA), and the program's size: scanned
    # layers should shrink both HLO counts by about the number of layers.
    out.update(lower_seconds=t_lower, hlo_ops={"lowered": hlo_op_count(lowered.as_text()),
                                               "compiled": _compiled_op_count(compiled)})
    return out


def _compiled_op_count(compiled: Any) -> int | None:
    """hlo_op_count of the compiled module, or None where it cannot be printed: for the XXL train step on
    v5p:2x2x1 libtpu 0.0.52 compiled it but `as_text()` failed ("async-update instruction should have 1 operands
    but sees 3"), which must not lose the compile's memory report."""
    try:
        return hlo_op_count(compiled.as_text())
    except jax.errors.JaxRuntimeError:
        return None


def dot_flops(jaxpr: Any, loops: bool = True) -> float:
    """FLOPs of the matrix products (dot_general: 2 x output size x contracted size) of a whole program (all
    devices). With `loops`, a scan's body counts `length` times (the microbatch loop, scanned layers), as it runs;
    without, once, as XLA's cost analysis counts a loop. remat's recomputation counts where the backward pass has
    it; a cond counts its larger branch."""
    from jax.extend.core import jaxprs_in_params
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            k = math.prod(eqn.invars[0].aval.shape[i] for i in contract)
            total += 2.0 * k * math.prod(eqn.outvars[0].aval.shape)
            continue
        subs = [dot_flops(getattr(j, "jaxpr", j), loops) for j in jaxprs_in_params(eqn.params)]
        if not subs:
            continue
        if eqn.primitive.name == "cond":
            total += max(subs)
        else:
            total += sum(subs) * (eqn.params["length"] if loops and eqn.primitive.name == "scan" else 1)
    return total


def apply_loop_factor(out: dict[str, Any], jaxpr: Any, chip: Chip, devices: int) -> None:
    """XLA's cost analysis counts a while loop's body once (checked: a train step's FLOPs halve from 1 to 2
    microbatches at the same batch, and with scanned layers they are about one layer's). Scale its FLOPs, bytes
    and roofline by how much the program's matmul FLOPs grow when loops count as often as they run (the
    jaxpr's dot_flops with and without loops: the number of microbatches for an unrolled model). The bytes of
    a loop body are assumed to scale like its matmuls; the Adafactor update, outside the loops, is scaled too
    (an overestimate of O(params) bytes against O(params * tokens) FLOPs). XLA's raw figures stay in
    `xla_cost_per_device`.

    FLOPs are then at least the matmul FLOPs split evenly over the devices (`dot_flops_global / devices`): for the
    scanned XXL train step XLA's count scaled this way came to about half of the matmul FLOPs (nested loops: the
    layer scans inside the microbatch loop), while the matmul count is exact."""
    full, once = dot_flops(jaxpr), dot_flops(jaxpr, loops=False)
    out["dot_flops_global"], out["dot_flops_per_device"] = full, full / devices
    factor = full / once if once else 1.0
    if out["flops_per_device"] is None:
        return
    if factor != 1.0:
        out["xla_cost_per_device"] = {"flops": out["flops_per_device"], "bytes": out["bytes_accessed_per_device"]}
        out["cost_loop_factor"] = factor
        out["flops_per_device"] *= factor
        out["bytes_accessed_per_device"] *= factor
    out["flops_per_device"] = max(out["flops_per_device"], full / devices)
    t_flops, t_bytes = out["flops_per_device"] / chip.peak_flops, out["bytes_accessed_per_device"] / chip.hbm_bytes_per_second
    out["roofline_seconds"] = max(t_flops, t_bytes)
    out["roofline_bound"] = "compute" if t_flops >= t_bytes else "memory"


_OP_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+(?::\d+)?\s=\s", re.M)


def hlo_op_count(text: str) -> int:
    """Operations with results in a StableHLO (lowered) or HLO (compiled) module's text: `%x = op(...)` lines."""
    return len(_OP_LINE.findall(text))


def train_program(model_config: ModelConfig, train_cfg: Any, mesh: jax.sharding.Mesh) -> tuple[Any, tuple]:
    """The trainer's jitted step (train.jit_train_step) and ShapeDtypeStructs of its arguments (params, optimizer
    state, step, batch) with the trainer's shardings for `mesh`."""
    import flax.linen as nn

    from gqa_uptrain import train as train_lib
    from gqa_uptrain.model import abstract_params
    from gqa_uptrain.optim import learning_rate_schedule, make_optimizer, opt_state_shardings

    boxed = abstract_params(model_config)
    param_sh = sharding_lib.param_shardings(boxed, mesh, head_dim=model_config.head_dim)
    param_shapes = nn.meta.unbox(boxed)
    optimizer = make_optimizer(train_cfg.optimizer)
    opt_abstract, opt_sh = opt_state_shardings(optimizer, param_sh, param_shapes, mesh,
                                               train_cfg.optimizer.min_dim_size_to_factor)
    step = train_lib.jit_train_step(model_config, train_cfg, optimizer, learning_rate_schedule(train_cfg.optimizer),
                                    mesh, param_sh, opt_sh)
    batch_sh, replicated = train_lib.batch_shardings(train_cfg, mesh)
    features = ["encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"]
    if train_cfg.pack:
        features += ["encoder_segment_ids", "decoder_segment_ids", "encoder_positions", "decoder_positions"]
    batch = {k: jax.ShapeDtypeStruct((train_cfg.batch_size, train_cfg.inputs_length if k.startswith("encoder")
                                      else train_cfg.targets_length), jnp.int32, sharding=batch_sh) for k in features}
    return step, (_with_shardings(param_shapes, param_sh), _with_shardings(opt_abstract, opt_sh),
                  jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), batch)


def trace_train(model_config: ModelConfig, train_cfg: Any, mesh: jax.sharding.Mesh) -> Any:
    """The train step's jaxpr for `mesh`, traced without compiling (for dot_flops / apply_loop_factor)."""
    import flax.linen as nn
    step, args = train_program(model_config, train_cfg, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.DEFAULT_RULES):
        return step.trace(*args).jaxpr.jaxpr


def compile_train(model_config: ModelConfig, train_cfg: Any, mesh: jax.sharding.Mesh, chip: Chip) -> dict[str, Any]:
    """Compile the trainer's step (train.jit_train_step) for `mesh`; returns `report`'s dict (cost scaled by
    apply_loop_factor) plus the expected argument bytes (params + optimizer state + batch as sharded, summed per
    device)."""
    step, args = train_program(model_config, train_cfg, mesh)
    out = _compile(step, args, mesh, chip)
    out["expected_argument_bytes"] = sharded_bytes(args, dict(mesh.shape))
    return out


def sharded_bytes(tree: Any, mesh_shape: Mapping[str, int]) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with NamedShardings."""
    return sum(sharding_lib.bytes_per_device(x.shape, np.dtype(x.dtype).itemsize, x.sharding.spec, mesh_shape)
               for x in jax.tree.leaves(tree))


def decode_abstract(model_config: ModelConfig, mesh: jax.sharding.Mesh, batch_size: int, inputs_length: int,
                    max_decode_length: int) -> dict[str, Any]:
    """ShapeDtypeStructs (with shardings) of what the decode programs take: params, encoder tokens, encoded
    output, cache, and the token fed to a step."""
    import flax.linen as nn

    from gqa_uptrain import decode
    from gqa_uptrain.model import abstract_params

    mesh_shape = dict(mesh.shape)
    boxed = abstract_params(model_config)
    param_sh = sharding_lib.param_shardings(boxed, mesh, head_dim=model_config.head_dim)
    params = _with_shardings(nn.meta.unbox(boxed), param_sh)
    axes = sharding_lib.batch_mesh_axes(mesh_shape)
    n_batch = math.prod(mesh_shape[a] for a in axes or ())
    if batch_size % n_batch:
        raise ValueError(f"decode batch {batch_size} must be divisible by data*fsdp={n_batch}")
    row = NamedSharding(mesh, PartitionSpec(axes))
    enc = jax.ShapeDtypeStruct((batch_size, inputs_length), jnp.int32, sharding=row)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding_lib.DEFAULT_RULES):
        encoded, logits, cache = jax.eval_shape(decode.encode_and_prefill(model_config, max_decode_length),
                                                params, enc)
    cache_specs = sharding_lib.cache_partition_specs(cache, mesh_shape)
    cache_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs,
                            is_leaf=lambda x: isinstance(x, PartitionSpec))
    return {"params": params, "enc": enc, "encoded": jax.ShapeDtypeStruct(encoded.shape, encoded.dtype, sharding=row),
            "cache": _with_shardings(cache, cache_sh), "tokens": jax.ShapeDtypeStruct((batch_size,), jnp.int32,
                                                                                      sharding=row),
            "param_sh": param_sh, "cache_sh": cache_sh, "row": row}


def compile_decode(model_config: ModelConfig, mesh: jax.sharding.Mesh, chip: Chip, batch_size: int,
                   inputs_length: int, max_decode_length: int, programs: tuple[str, ...] = ("prefill", "step")
                   ) -> dict[str, dict[str, Any]]:
    """Compile the decoder's encoder+prefill and its one-token step (cache donated, as in the loop's carry)."""
    from gqa_uptrain import decode
    a = decode_abstract(model_config, mesh, batch_size, inputs_length, max_decode_length)
    row, param_sh, cache_sh = a["row"], a["param_sh"], a["cache_sh"]
    out: dict[str, dict[str, Any]] = {}
    if "prefill" in programs:
        fn = jax.jit(decode.encode_and_prefill(model_config, max_decode_length), in_shardings=(param_sh, row),
                     out_shardings=(row, row, cache_sh))
        out["prefill"] = _compile(fn, (a["params"], a["enc"]), mesh, chip)
    if "step" in programs:
        fn = jax.jit(decode.decode_step(model_config), in_shardings=(param_sh, cache_sh, row, row, row),
                     out_shardings=(row, cache_sh), donate_argnums=(1,))
        out["step"] = _compile(fn, (a["params"], a["cache"], a["encoded"], a["enc"], a["tokens"]), mesh, chip)
        out["step"]["cache_bytes_per_device"] = sharded_bytes(a["cache"], dict(mesh.shape))
    return out

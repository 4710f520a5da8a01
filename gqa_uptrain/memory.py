"""Memory plans for a model: the parameter table with per-device bytes under a mesh, the Adafactor state, a fast
estimate of training activations, and XLA's numbers for the programs compiled for a TPU slice (`gqa_uptrain.aot`).

`inspect` prints these. XLA's memory analysis of the compiled step is the number to plan with; the activation
formula is only the fast fallback when nothing is compiled, and tests/test_memory.py holds it against XLA.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from gqa_uptrain.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamRow:
    """One parameter: flat name, shape, logical axes, element count and (under a mesh) its mesh spec and bytes."""

    name: str
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    count: int
    spec: Any = None
    bytes_per_device: int = 0


@dataclasses.dataclass(frozen=True)
class ParamTable:
    rows: list[ParamRow]
    groups: dict[str, int]  # top-level module -> parameter count
    total: int
    per_device_bytes: int  # 0 without a mesh
    boxed: Any  # the abstract, logically partitioned parameter tree the table was read from


def parameter_table(cfg: ModelConfig, mesh_shape: Mapping[str, int] | None = None) -> ParamTable:
    """Every parameter of `cfg` (jax.eval_shape: nothing is allocated), with its sharding under `mesh_shape`."""
    import flax.linen as nn
    import numpy as np
    from flax import traverse_util

    from gqa_uptrain import sharding
    from gqa_uptrain.model import abstract_params
    boxed = abstract_params(cfg)
    flat = traverse_util.flatten_dict(boxed, sep="/", is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned))
    rows, groups, total, per_device = [], {}, 0, 0
    for name, leaf in sorted(flat.items()):
        shape, axes = tuple(leaf.value.shape), tuple(leaf.names)
        n = int(np.prod(shape))
        total += n
        top = name.split("/")[0]
        groups[top] = groups.get(top, 0) + n
        spec, b = None, 0
        if mesh_shape:
            spec = sharding.logical_to_mesh_spec(axes, shape, mesh_shape, head_dim=cfg.head_dim)
            b = sharding.bytes_per_device(shape, leaf.value.dtype.itemsize, spec, mesh_shape)
            per_device += b
        rows.append(ParamRow(name, shape, axes, n, spec, b))
    return ParamTable(rows, groups, total, per_device, boxed)


def optimizer_state_bytes(cfg: ModelConfig, boxed: Any, mesh_shape: Mapping[str, int]) -> tuple[int, int]:
    """(per device, total) bytes of the default Adafactor state (jax.eval_shape of optimizer.init, with shardings
    derived from the parameters')."""
    import flax.linen as nn

    from gqa_uptrain import sharding
    from gqa_uptrain.optim import OptimizerConfig, make_optimizer, opt_state_bytes_per_device
    specs = sharding.param_partition_specs(boxed, mesh_shape, head_dim=cfg.head_dim)
    return opt_state_bytes_per_device(make_optimizer(OptimizerConfig()), specs, nn.meta.unbox(boxed), mesh_shape)


def activation_bytes_per_device(cfg: ModelConfig, mesh_shape: Mapping[str, int], batch_size: int,
                                inputs_length: int, targets_length: int, num_microbatches: int = 1,
                                remat_policy: str = "none") -> float:
    """Rough bytes of activations kept for the backward pass on one device: the fast fallback of `inspect --mesh`
    without --compile. XLA's memory analysis of the compiled step (--topology --compile) is the number to plan
    with; tests/test_memory.py compares the two.

    Assumes: per-device microbatch b = batch_size / (data*fsdp) / num_microbatches; activations in cfg.dtype,
    logits/softmax in float32; tensors with a heads / d_ff / vocab axis split over `model`. Logits count twice
    (logits and their gradient). Ignores XLA temporaries.

    remat_policy "none": per token and layer ~8 d_model-wide tensors (residual, norms, attention in/out, MLP
    in/out), q/k/v/attention-output (heads*head_dim each), 3 d_ff-wide MLP tensors, and attention scores +
    probabilities (heads * key length); decoder layers add cross-attention.
    Otherwise each layer keeps what the policy saves (model.REMAT_POLICIES), and the layer being recomputed in the
    backward adds one layer's "none" activations: "full" keeps the layer input (d_model); "minimal" also the
    outputs of the un-batched GEMMs (q/k/v and out projections, wi_0/wi_1/wo; cross-attention k/v at the source
    length); "dots" also the batched attention GEMMs (scores, heads * key length, and attention outputs).
    """
    from gqa_uptrain.model import check_remat_policy
    check_remat_policy(remat_policy)
    dt = 4 if cfg.dtype == "float32" else 2
    m = mesh_shape.get("model", 1)
    b = batch_size / (mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)) / num_microbatches
    d, hd, ff, h = cfg.d_model, cfg.num_heads * cfg.head_dim / m, cfg.d_ff / m, cfg.num_heads / m
    li, lt = inputs_length, targets_length
    enc = li * (8 * d + 4 * hd + 3 * ff + 2 * h * li) * dt
    dec = lt * (12 * d + 8 * hd + 3 * ff + 2 * h * (lt + li)) * dt
    logits = lt * cfg.vocab_size / m * 4 * 2
    if remat_policy == "none":
        return b * (cfg.num_encoder_layers * enc + cfg.num_decoder_layers * dec + logits)
    kept_enc, kept_dec = li * d * dt, lt * d * dt  # "full": the layer inputs
    if remat_policy in ("minimal", "dots"):
        # + out and wo outputs (d_model), q/k/v, wi_0/wi_1; the decoder has two attentions, cross k/v at li.
        kept_enc += li * (2 * d + 3 * hd + 2 * ff) * dt
        kept_dec += (lt * (3 * d + 4 * hd + 2 * ff) + li * 2 * hd) * dt
    if remat_policy == "dots":
        kept_enc += li * (hd + h * li) * dt
        kept_dec += lt * (2 * hd + h * (lt + li)) * dt
    return b * (cfg.num_encoder_layers * kept_enc + cfg.num_decoder_layers * kept_dec + max(enc, dec) + logits)


# ------------------------------------------------------------------------------------- compiled for a TPU slice


def kv_replication_notes(cfg: ModelConfig, model_axis: int) -> list[str]:
    """Why K/V kernels and caches are replicated over `model` (a head is never split inside head_dim)."""
    notes = []
    for kind, g in (("decoder self-attention", cfg.decoder_self_kv_heads),
                    ("decoder cross-attention", cfg.decoder_cross_kv_heads)):
        if model_axis > 1 and g % model_axis:
            notes.append(f"{kind} has {g} key/value heads, not divisible by model={model_axis}: its K/V kernels and "
                         "cache are replicated over `model` (a head is never split inside head_dim)")
    return notes


def topology_plan(cfg: ModelConfig, topology: str, mesh_spec: str) -> tuple[dict[str, Any], Any, Any]:
    """(report skeleton, chip, mesh) for `cfg` on a TPU slice; `compile_programs` fills report["programs"]."""
    from gqa_uptrain import aot
    chip = aot.chip_for(topology)
    mesh = aot.topology_mesh(topology, mesh_spec)
    report = {"topology": topology, "mesh": dict(mesh.shape), "devices": int(mesh.devices.size),
              "chip": {"name": chip.name, "hbm_bytes": chip.hbm_bytes, "peak_flops": chip.peak_flops,
                       "hbm_bytes_per_second": chip.hbm_bytes_per_second},
              "model": {"d_model": cfg.d_model, "layers": [cfg.num_encoder_layers, cfg.num_decoder_layers],
                        "num_heads": cfg.num_heads, "kv_heads": [cfg.encoder_kv_heads, cfg.decoder_self_kv_heads,
                                                                cfg.decoder_cross_kv_heads],
                        "dtype": cfg.dtype, "param_dtype": cfg.param_dtype},
              "programs": {}}
    return report, chip, mesh


def compile_programs(report: dict[str, Any], cfg: ModelConfig, mesh: Any, chip: Any, which: str, *,
                     batch_size: int, inputs_length: int, targets_length: int, num_microbatches: int = 1,
                     remat_policy: str = "none", decode_batch_size: int | None = None,
                     max_decode_length: int | None = None) -> dict[str, Any]:
    """Compile the trainer's step (`which` train|both) and/or the decoder's encoder+prefill and one-token step
    (decode|both) for `mesh`; each program's `aot.report` (plus the run settings) goes into report["programs"]."""
    from gqa_uptrain import aot
    from gqa_uptrain.optim import OptimizerConfig
    from gqa_uptrain.train import TrainConfig
    if which in ("train", "both"):
        tc = TrainConfig(model_dir="<inspect>", train_steps=1, batch_size=batch_size, inputs_length=inputs_length,
                         targets_length=targets_length, num_microbatches=num_microbatches,
                         remat_policy=remat_policy, optimizer=OptimizerConfig())
        report["programs"]["train"] = aot.compile_train(cfg, tc, mesh, chip)
        report["programs"]["train"]["run"] = {"batch_size": batch_size, "inputs_length": inputs_length,
                                              "targets_length": targets_length,
                                              "num_microbatches": num_microbatches, "remat_policy": remat_policy}
    if which in ("decode", "both"):
        batch = decode_batch_size or batch_size
        length = max_decode_length or targets_length
        for name, rep in aot.compile_decode(cfg, mesh, chip, batch, inputs_length, length).items():
            rep["run"] = {"batch_size": batch, "inputs_length": inputs_length, "max_decode_length": length}
            report["programs"][f"decode_{name}"] = rep
    return report

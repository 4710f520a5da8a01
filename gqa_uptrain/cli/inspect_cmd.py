"""gqa-uptrain inspect: parameter tree, counts and KV-cache sizes of a gin-configured model, without allocating;
with --topology/--compile, XLA's memory and cost analysis of the train / decode programs compiled for a TPU slice."""
from __future__ import annotations

import argparse

HELP = "Print a model's parameter tree, counts and KV-cache bytes (jax.eval_shape: no allocation)"
DESCRIPTION = HELP + """.

Examples:
  gqa-uptrain inspect --gin_file=models/t5_1_1/xxl.gin --gin.NUM_KV_HEADS=8
  gqa-uptrain inspect --gin_file=models/t5_1_1/large.gin --gin.NUM_KV_HEADS=1 --mesh data=8,fsdp=4,model=4
  gqa-uptrain inspect --gin_file=models/t5_1_1/xl.gin --gin.NUM_KV_HEADS=8 --topology v4:4x4x4 \
      --mesh data=16,fsdp=4,model=1 --compile train --num_microbatches 4 --json plan.json

--compile needs libtpu (pip install -e '.[tpu]'); it runs on a CPU host (JAX_PLATFORMS=cpu is fine)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gqa_uptrain.cli.common import add_gin_arguments
    add_gin_arguments(parser, default_file="models/t5_1_1/tiny.gin")
    parser.set_defaults(_command_macros=("REMAT_POLICY",))  # read by _remat_policy, from a run file or --gin.
    parser.add_argument("--mesh", default="", metavar="data=D,fsdp=F,model=M",
                        help="also report per-device parameter bytes under this mesh and the default sharding rules")
    parser.add_argument("--summary", action="store_true", help="print totals only, not every parameter")
    t = parser.add_argument_group("training memory (with --mesh)")
    t.add_argument("--batch_size", type=int, default=2048, help="global training batch for the activation estimate")
    t.add_argument("--inputs_length", type=int, default=512, help="encoder length for the activation estimate")
    t.add_argument("--targets_length", type=int, default=114, help="decoder length for the activation estimate")
    t.add_argument("--num_microbatches", type=int, default=1, help="gradient-accumulation microbatches")
    t.add_argument("--remat_policy", default=None, metavar="POLICY",
                   help="activation rematerialisation assumed by the estimate: none, full, minimal or dots "
                        "(TrainConfig.remat_policy); default: the REMAT_POLICY gin macro if bound, else none")
    c = parser.add_argument_group("ahead-of-time compilation for a TPU slice (needs libtpu; docs/scaling.md)")
    c.add_argument("--topology", default=None, metavar="TOPO",
                   help="TPU topology, e.g. v5e:2x2, v4:2x2x2, v4:4x4x4, v5p:4x4x8, v6e:4x4 (with --compile)")
    c.add_argument("--compile", default=None, choices=("train", "decode", "both"),
                   help="compile the trainer's step and/or the decoder's encoder+prefill and one-token step for "
                        "--topology with --mesh, and report XLA's per-device memory and cost")
    c.add_argument("--decode_batch_size", type=int, default=None,
                   help="global decode batch (default: --batch_size)")
    c.add_argument("--max_decode_length", type=int, default=None,
                   help="decode cache length (default: --targets_length)")
    c.add_argument("--json", default=None, metavar="FILE", help="also write the compiled report as JSON")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def activation_bytes_per_device(cfg, mesh_shape, batch_size: int, inputs_length: int, targets_length: int,
                                num_microbatches: int = 1, remat_policy: str = "none") -> float:
    """Rough bytes of activations kept for the backward pass on one device: the fast fallback of `inspect --mesh`
    without --compile. XLA's memory analysis of the compiled step (--topology --compile) is the number to plan
    with; tests/test_aot.py compares the two.

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


def _remat_policy(args) -> str:
    """--remat_policy, else a bound REMAT_POLICY gin macro (as in the run files), else "none"."""
    if args.remat_policy is not None:
        return args.remat_policy
    import gin
    try:
        return gin.query_parameter("%REMAT_POLICY")
    except ValueError:
        return "none"


def _training_memory(args, cfg, boxed, mesh_shape, param_bytes: int, remat: str) -> None:
    import flax.linen as nn

    from gqa_uptrain import sharding
    from gqa_uptrain.optim import OptimizerConfig, make_optimizer, opt_state_bytes_per_device
    shapes = nn.meta.unbox(boxed)
    specs = sharding.param_partition_specs(boxed, mesh_shape, head_dim=cfg.head_dim)
    opt_dev, opt_total = opt_state_bytes_per_device(make_optimizer(OptimizerConfig()), specs, shapes, mesh_shape)
    act = activation_bytes_per_device(cfg, mesh_shape, args.batch_size, args.inputs_length, args.targets_length,
                                      args.num_microbatches, remat)
    grads = param_bytes  # gradients (accumulator) have the parameters' shardings
    print(f"adafactor state per device {_fmt_bytes(opt_dev)} (of {_fmt_bytes(opt_total)} total; factored second "
          f"moments, jax.eval_shape of optimizer.init with shardings derived from the parameters')")
    print(f"activations per device ~{_fmt_bytes(act)} (estimate: batch {args.batch_size}, lengths "
          f"{args.inputs_length}/{args.targets_length}, {args.num_microbatches} microbatch(es), {cfg.dtype}, "
          f"remat_policy={remat}{' (no remat)' if remat == 'none' else ''}; see activation_bytes_per_device)")
    print(f"training total per device ~{_fmt_bytes(param_bytes + grads + opt_dev + act)} "
          f"(params + gradients + optimizer state + activations)")


def _compiled_report(args, cfg, remat: str) -> dict:
    """Compile the requested programs for --topology / --mesh; print one block per program; return the JSON."""
    import sys

    from gqa_uptrain import aot
    from gqa_uptrain.optim import OptimizerConfig
    from gqa_uptrain.train import TrainConfig
    if not args.topology or not args.mesh or not args.compile:
        raise ValueError("--topology, --mesh and --compile go together (e.g. --topology v5e:2x2 "
                         "--mesh data=1,fsdp=2,model=2 --compile both)")
    chip = aot.chip_for(args.topology)
    mesh = aot.topology_mesh(args.topology, args.mesh)
    out = {"topology": args.topology, "mesh": dict(mesh.shape), "devices": int(mesh.devices.size),
           "chip": {"name": chip.name, "hbm_bytes": chip.hbm_bytes, "peak_flops": chip.peak_flops,
                    "hbm_bytes_per_second": chip.hbm_bytes_per_second},
           "model": {"d_model": cfg.d_model, "layers": [cfg.num_encoder_layers, cfg.num_decoder_layers],
                     "num_heads": cfg.num_heads, "kv_heads": [cfg.enc_kv_heads, cfg.dec_self_kv_heads,
                                                             cfg.dec_cross_kv_heads],
                     "dtype": cfg.dtype, "param_dtype": cfg.param_dtype},
           "programs": {}}
    m = out["mesh"]["model"]
    for kind, g in (("decoder self-attention", cfg.dec_self_kv_heads), ("decoder cross-attention",
                                                                         cfg.dec_cross_kv_heads)):
        if m > 1 and g % m:
            print(f"note: {kind} has {g} key/value heads, not divisible by model={m}: its K/V kernels and cache "
                  "are replicated over `model` (a head is never split inside head_dim)", file=sys.stderr)
    print(f"compiling for {args.topology} ({chip.name}, {out['devices']} devices, {_fmt_bytes(chip.hbm_bytes)} HBM "
          f"each), mesh {out['mesh']} ...", file=sys.stderr, flush=True)
    if args.compile in ("train", "both"):
        tc = TrainConfig(model_dir="<inspect>", train_steps=1, batch_size=args.batch_size,
                         inputs_length=args.inputs_length, targets_length=args.targets_length,
                         num_microbatches=args.num_microbatches, remat_policy=remat, optimizer=OptimizerConfig())
        out["programs"]["train"] = aot.compile_train(cfg, tc, mesh, chip)
        out["programs"]["train"]["run"] = {"batch_size": args.batch_size, "inputs_length": args.inputs_length,
                                           "targets_length": args.targets_length,
                                           "num_microbatches": args.num_microbatches, "remat_policy": remat}
    if args.compile in ("decode", "both"):
        batch = args.decode_batch_size or args.batch_size
        length = args.max_decode_length or args.targets_length
        dec = aot.compile_decode(cfg, mesh, chip, batch, args.inputs_length, length)
        for name, rep in dec.items():
            rep["run"] = {"batch_size": batch, "inputs_length": args.inputs_length, "max_decode_length": length}
            out["programs"][f"decode_{name}"] = rep
    for name, r in out["programs"].items():
        b = r["per_device_bytes"]
        if r.get("compile_error"):
            print(f"{name}: does NOT fit: {r['compile_error']} (compile {r['compile_seconds']:.1f} s)")
            continue
        print(f"{name}: per device arguments {_fmt_bytes(b['arguments'])}, temp {_fmt_bytes(b['temp'])}, "
              f"output {_fmt_bytes(b['output'])} (aliased {_fmt_bytes(b['alias'])}), total {_fmt_bytes(b['total'])} "
              f"of {_fmt_bytes(r['hbm_bytes'])} HBM: {'fits' if r['fits'] else 'does NOT fit'}, margin "
              f"{_fmt_bytes(r['margin_bytes'])}")
        print(f"  {r['flops_per_device']:.3e} FLOPs and {_fmt_bytes(r['bytes_accessed_per_device'])} accessed per "
              f"device; roofline estimate {r['roofline_seconds'] * 1e3:.3f} ms ({r['roofline_bound']}-bound; peak "
              f"{chip.peak_flops / 1e12:g} TFLOP/s bf16, {chip.hbm_bytes_per_second / 1e9:g} GB/s); compiled in "
              f"{r['compile_seconds']:.1f} s")
    if args.json:
        import json

        from gqa_uptrain.checkpoint import atomic_write_text
        atomic_write_text(args.json, json.dumps(out, indent=2) + "\n")
    return out


def run(args: argparse.Namespace) -> int:
    if args.topology or args.compile:
        from gqa_uptrain.cli.common import model_config
        from gqa_uptrain.model import check_remat_policy
        cfg = model_config(args)
        _compiled_report(args, cfg, check_remat_policy(_remat_policy(args)))
        return 0
    import flax.linen as nn
    import jax
    import numpy as np
    from flax import traverse_util

    from gqa_uptrain import sharding
    from gqa_uptrain.cli.common import model_config
    from gqa_uptrain.model import abstract_params, check_remat_policy

    cfg = model_config(args)
    remat = check_remat_policy(_remat_policy(args))  # a bad name is an error even when no estimate is printed
    boxed = abstract_params(cfg)
    flat = traverse_util.flatten_dict(boxed, sep="/", is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned))
    mesh_shape = sharding.parse_mesh(args.mesh, flag="--mesh") if args.mesh else None
    total = 0
    groups: dict[str, int] = {}
    per_device = 0
    rows = []
    for name, leaf in sorted(flat.items()):
        shape, axes = leaf.value.shape, leaf.names
        n = int(np.prod(shape))
        total += n
        top = name.split("/")[0]
        groups[top] = groups.get(top, 0) + n
        row = [name, "x".join(map(str, shape)), ",".join(str(a) for a in axes), f"{n:,}"]
        if mesh_shape:
            spec = sharding.logical_to_mesh_spec(axes, shape, mesh_shape, head_dim=cfg.head_dim)
            b = sharding.bytes_per_device(shape, leaf.value.dtype.itemsize, spec, mesh_shape)
            per_device += b
            row.append(str(tuple(spec)))
        rows.append(row)
    if not args.summary:
        headers = ["parameter", "shape", "logical axes", "count"] + (["mesh spec"] if mesh_shape else [])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for r in rows:
            print("  ".join(c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        print()
    print(f"model: d_model={cfg.d_model} layers={cfg.num_encoder_layers}/{cfg.num_decoder_layers} "
          f"heads={cfg.num_heads} head_dim={cfg.head_dim} d_ff={cfg.d_ff} vocab={cfg.vocab_size}")
    print(f"kv heads: encoder={cfg.enc_kv_heads} decoder_self={cfg.dec_self_kv_heads} "
          f"decoder_cross={cfg.dec_cross_kv_heads}  (activations {cfg.dtype}, params {cfg.param_dtype})")
    for top, n in sorted(groups.items()):
        print(f"  {top:<16} {n:>16,}")
    print(f"  {'total':<16} {total:>16,}  ({total / 1e6:,.1f}M, {_fmt_bytes(total * 4)} in float32)")
    act_bytes = 4 if cfg.dtype == "float32" else 2
    self_b = cfg.kv_cache_bytes_per_token(act_bytes)
    cross_b = cfg.cross_kv_bytes_per_source_token(act_bytes)
    mha_b = cfg.replace(decoder_self_kv_heads=None).kv_cache_bytes_per_token(act_bytes)
    print(f"decoder self-attention KV cache: {self_b:,} bytes per generated token "
          f"({cfg.dtype}; MHA would need {mha_b:,}, ratio {mha_b / self_b:g}x)")
    print(f"decoder cross-attention K/V:     {cross_b:,} bytes per source token")
    if mesh_shape:
        print(f"mesh {mesh_shape}: parameters per device {_fmt_bytes(per_device)} "
              f"(of {_fmt_bytes(total * 4)} total)")
        _training_memory(args, cfg, boxed, mesh_shape, per_device, remat)
    del jax
    return 0

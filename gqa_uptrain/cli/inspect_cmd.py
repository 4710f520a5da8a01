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


def _remat_policy(args) -> str:
    """--remat_policy, else a bound REMAT_POLICY gin macro (as in the run files), else "none"."""
    if args.remat_policy is not None:
        return args.remat_policy
    import gin
    try:
        return gin.query_parameter("%REMAT_POLICY")
    except ValueError:
        return "none"


def _print_training_memory(args, cfg, table, mesh_shape, remat: str) -> None:
    from gqa_uptrain import memory
    opt_dev, opt_total = memory.optimizer_state_bytes(cfg, table.boxed, mesh_shape)
    act = memory.activation_bytes_per_device(cfg, mesh_shape, args.batch_size, args.inputs_length,
                                             args.targets_length, args.num_microbatches, remat)
    param_bytes = table.per_device_bytes
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

    from gqa_uptrain import memory
    from gqa_uptrain.errors import UserError
    if not args.topology or not args.mesh or not args.compile:
        raise UserError("--topology, --mesh and --compile go together (e.g. --topology v5e:2x2 "
                        "--mesh data=1,fsdp=2,model=2 --compile both)")
    out, chip, mesh = memory.topology_plan(cfg, args.topology, args.mesh)
    for note in memory.kv_replication_notes(cfg, out["mesh"]["model"]):
        print(f"note: {note}", file=sys.stderr)
    print(f"compiling for {args.topology} ({chip.name}, {out['devices']} devices, {_fmt_bytes(chip.hbm_bytes)} HBM "
          f"each), mesh {out['mesh']} ...", file=sys.stderr, flush=True)
    memory.compile_programs(out, cfg, mesh, chip, args.compile, batch_size=args.batch_size,
                            inputs_length=args.inputs_length, targets_length=args.targets_length,
                            num_microbatches=args.num_microbatches, remat_policy=remat,
                            decode_batch_size=args.decode_batch_size, max_decode_length=args.max_decode_length)
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
    from gqa_uptrain.cli.common import model_config
    from gqa_uptrain.model import check_remat_policy
    cfg = model_config(args)
    remat = check_remat_policy(_remat_policy(args))  # a bad name is an error even when no estimate is printed
    if args.topology or args.compile:
        _compiled_report(args, cfg, remat)
        return 0
    from gqa_uptrain import memory, sharding
    mesh_shape = sharding.parse_mesh(args.mesh, flag="--mesh") if args.mesh else None
    table = memory.parameter_table(cfg, mesh_shape)
    if not args.summary:
        rows = [[r.name, "x".join(map(str, r.shape)), ",".join(str(a) for a in r.axes), f"{r.count:,}"]
                + ([str(tuple(r.spec))] if mesh_shape else []) for r in table.rows]
        headers = ["parameter", "shape", "logical axes", "count"] + (["mesh spec"] if mesh_shape else [])
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for r in rows:
            print("  ".join(c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        print()
    total = table.total
    print(f"model: d_model={cfg.d_model} layers={cfg.num_encoder_layers}/{cfg.num_decoder_layers} "
          f"heads={cfg.num_heads} head_dim={cfg.head_dim} d_ff={cfg.d_ff} vocab={cfg.vocab_size}")
    print(f"kv heads: encoder={cfg.encoder_kv_heads} decoder_self={cfg.decoder_self_kv_heads} "
          f"decoder_cross={cfg.decoder_cross_kv_heads}  (activations {cfg.dtype}, params {cfg.param_dtype})")
    for top, n in sorted(table.groups.items()):
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
        print(f"mesh {mesh_shape}: parameters per device {_fmt_bytes(table.per_device_bytes)} "
              f"(of {_fmt_bytes(total * 4)} total)")
        _print_training_memory(args, cfg, table, mesh_shape, remat)
    return 0

"""gqa-uptrain inspect: parameter tree, counts and KV-cache sizes of a gin-configured model, without allocating."""
from __future__ import annotations

import argparse

HELP = "Print a model's parameter tree, counts and KV-cache bytes (jax.eval_shape: no allocation)"
DESCRIPTION = HELP + """.

Examples:
  gqa-uptrain inspect --gin_file=models/t5_1_1/xxl.gin --gin.NUM_KV_HEADS=8
  gqa-uptrain inspect --gin_file=models/t5_1_1/large.gin --gin.NUM_KV_HEADS=1 --mesh data=8,fsdp=4,model=4"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gqa_uptrain.cli.common import add_gin_arguments
    add_gin_arguments(parser, default_file="models/t5_1_1/tiny.gin")
    parser.add_argument("--mesh", default="", metavar="data=D,fsdp=F,model=M",
                        help="also report per-device parameter bytes under this mesh and the default sharding rules")
    parser.add_argument("--summary", action="store_true", help="print totals only, not every parameter")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def run(args: argparse.Namespace) -> int:
    import flax.linen as nn
    import jax
    import numpy as np
    from flax import traverse_util

    from gqa_uptrain import sharding
    from gqa_uptrain.cli.common import model_config
    from gqa_uptrain.model import abstract_params

    cfg = model_config(args)
    boxed = abstract_params(cfg)
    flat = traverse_util.flatten_dict(boxed, sep="/", is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned))
    mesh_shape = sharding.parse_mesh_spec(args.mesh) if args.mesh else None
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
            spec = sharding.logical_to_mesh_spec(axes, shape, mesh_shape)
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
    del jax
    return 0

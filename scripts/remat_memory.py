#!/usr/bin/env python3
"""What each remat policy does to the compiled training step of a gin-configured model (docs/train.md).

    python scripts/remat_memory.py --gin_file=models/t5_1_1/tiny.gin --batch_size 16 --inputs_length 128 \
        --targets_length 32

For every policy in model.REMAT_POLICIES it compiles `train.make_train_step` (Adafactor, one microbatch, no
dropout, parameters and optimiser state donated as in `train`) on this machine's backend and prints:
  residuals  bytes the forward keeps for the backward (leaves of jax.vjp's closure of the loss, parameters
             included; abstract: what the policy asks for, independent of the backend)
  XLA temp   the compiled step's temp buffer (`compiled.memory_analysis().temp_size_in_bytes`): what the
             backend's scheduler and buffer assignment actually need
  GFLOP      XLA's cost analysis of the step (the recomputation shows up here)
Nothing is run; only compiled.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: list[str]) -> int:
    from gqa_uptrain.gin_utils import add_gin_arguments, model_config
    from gqa_uptrain.gin_utils import split_gin_overrides
    argv, bindings = split_gin_overrides(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gin_arguments(parser, default_file="models/t5_1_1/tiny.gin")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--inputs_length", type=int, default=128)
    parser.add_argument("--targets_length", type=int, default=32)
    args = parser.parse_args(argv)
    args.gin_bindings = bindings

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gqa_uptrain import train as train_lib
    from gqa_uptrain.model import REMAT_POLICIES, abstract_params
    from gqa_uptrain.optim import OptimizerConfig, learning_rate_schedule, make_optimizer

    cfg = model_config(args).replace(dropout_rate=0.0)
    b, li, lt = args.batch_size, args.inputs_length, args.targets_length
    params = nn.meta.unbox(abstract_params(cfg))  # ShapeDtypeStructs: nothing is allocated
    batch = {"encoder_input_tokens": jax.ShapeDtypeStruct((b, li), jnp.int32),
             "decoder_input_tokens": jax.ShapeDtypeStruct((b, lt), jnp.int32),
             "decoder_target_tokens": jax.ShapeDtypeStruct((b, lt), jnp.int32)}
    ocfg = OptimizerConfig()
    opt = make_optimizer(ocfg)
    opt_state = jax.eval_shape(opt.init, params)
    print(f"model d_model={cfg.d_model} layers={cfg.num_encoder_layers}/{cfg.num_decoder_layers} "
          f"heads={cfg.num_heads} d_ff={cfg.d_ff} vocab={cfg.vocab_size} {cfg.dtype}; batch {b} x {li}/{lt}; "
          f"backend {jax.default_backend()}, jax {jax.__version__}")
    print("| remat_policy | residuals MiB | XLA temp MiB | GFLOP/step | compile s |")
    print("|---|---|---|---|---|")
    for policy in REMAT_POLICIES:
        tcfg = train_lib.TrainConfig(model_dir="unused", train_steps=1, batch_size=b, inputs_length=li,
                                     targets_length=lt, remat_policy=policy)

        def residual_leaves(p, tokens, tcfg=tcfg):
            def loss(q):
                sums = train_lib.seq2seq_model(cfg, tcfg).loss_sums(q, tokens)
                return sums["cross_entropy"] + sums["z_loss"]
            return jax.tree.leaves(jax.vjp(loss, p)[1])

        residuals = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                        for x in jax.eval_shape(residual_leaves, params, batch))
        step = train_lib.make_train_step(cfg, tcfg, opt, learning_rate_schedule(ocfg))
        t = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
            params, opt_state, jax.ShapeDtypeStruct((), jnp.int32), batch).compile()
        seconds = time.perf_counter() - t
        temp = compiled.memory_analysis().temp_size_in_bytes
        cost = compiled.cost_analysis()
        flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
        print(f"| {policy} | {residuals / 2**20:.1f} | {temp / 2**20:.1f} | {flops / 1e9:.2f} | {seconds:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

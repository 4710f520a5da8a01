#!/usr/bin/env python
"""GEMM throughput of XLA:CPU (jax) vs torch on this machine, for the matrix shapes of a T5.1.1 training step.

Explains `gqa-uptrain bench train` ratios: at the Small shape both steps are GEMM-bound, so the ratio follows these.
Usage: python scripts/gemm_bench.py [--shapes 1024x512x1024,2048x2048x2048] [--calls 20]
(M x K x N: [M, K] @ [K, N]). Set XLA_FLAGS before running to try XLA:CPU options.
"""
from __future__ import annotations

import argparse
import statistics
import time

# T5.1.1-Small, batch 8 x 128/32: projections, MLP, the logits GEMM and its weight gradient, head_dim-64 attention.
DEFAULT = "1024x512x1024,1024x1024x512,1024x512x512,256x512x32128,32128x256x512,512x1024x1024,1024x64x1024"


def _median_seconds(fn, calls: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT, help="comma-separated MxKxN")
    p.add_argument("--calls", type=int, default=20, help="timed calls per shape and library (median)")
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    try:
        import torch
    except ImportError:
        torch = None
    matmul = jax.jit(lambda x, y: x @ y)
    for spec in args.shapes.split(","):
        try:
            m, k, n = (int(v) for v in spec.lower().split("x"))
        except ValueError:
            p.error(f"bad shape {spec!r}: expected MxKxN, e.g. 1024x512x1024")
        a = np.random.default_rng(0).random((m, k), np.float32)
        b = np.random.default_rng(1).random((k, n), np.float32)
        flop = 2 * m * k * n / 1e9
        x, y = jnp.asarray(a), jnp.asarray(b)
        t_jax = _median_seconds(lambda: matmul(x, y).block_until_ready(), args.calls)
        line = f"[{m}, {k}] x [{k}, {n}]: jax {flop / t_jax:6.0f}"
        if torch is not None:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            line += f"  torch {flop / _median_seconds(lambda: ta @ tb, args.calls):6.0f}"
        print(line + " GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""Forward+backward time of one training loss per model implementation path (attention.IMPLS) on this machine.

Each (model, path) gets a jitted value_and_grad of the summed token cross-entropy; after a compile and one warm-up
call, rounds interleave the paths (rotating which goes first) and each round times `--calls` calls of each path, so
load from other jobs on a shared machine spreads over all paths. Prints min / median / max of the per-call time over
the rounds, and (with --kernels) the XLA:CPU kernels the fast path replaces against their plain forms.
Usage: python scripts/bench_model_paths.py [--models tiny,small] [--batch 8] [--inputs-length 256]
       [--targets-length 64] [--rounds 7] [--calls 3] [--kernels] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

PATHS = ("reference", "xla_cpu", "dot_product_attention")


def _loss_and_grad(cfg, impl: str):
    """jit((params, enc, dec_in, tgt) -> (loss, grads)); the batch is an argument, not a folded constant."""
    import jax
    import jax.numpy as jnp

    from gqa_uptrain.model import Transformer
    model = Transformer(cfg, impl=impl)

    def loss(params, enc, dec_in, tgt):
        logits = model.apply({"params": params}, enc, dec_in, tgt)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1)[..., 0]
        return -jnp.sum(logp * (tgt > 0))
    return jax.jit(jax.value_and_grad(loss))


def _time_calls(fn, args, calls: int) -> float:
    import jax
    t = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / calls


def _interleaved(fns: dict, args: dict, rounds: int, calls: int) -> dict[str, list[float]]:
    """{name: [seconds per call, one per round]}; every fn compiled and warmed up first."""
    import jax
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))
        jax.block_until_ready(fn(*args[name]))
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(_time_calls(fns[n], args[n], calls))
    return times


def _summary(seconds: list[float]) -> dict[str, float]:
    ms = [1e3 * s for s in seconds]
    return {"min_ms": min(ms), "median_ms": statistics.median(ms), "max_ms": max(ms)}


def bench_models(models: list[str], batch: int, inputs_length: int, targets_length: int, rounds: int,
                 calls: int) -> list[dict]:
    import jax
    import numpy as np

    from gqa_uptrain import gin_utils
    from gqa_uptrain.model import init_params
    rows = []
    for size in models:
        gin_utils.parse_gin([f"models/t5_1_1/{size}.gin"], [])
        cfg = gin_utils.model_config_from_gin()
        params = init_params(cfg, jax.random.PRNGKey(0))
        r = np.random.RandomState(0)
        enc = r.randint(2, cfg.vocab_size, size=(batch, inputs_length))
        enc[: batch // 2, inputs_length * 3 // 4:] = 0  # some padding
        tgt = r.randint(2, cfg.vocab_size, size=(batch, targets_length))
        dec_in = np.concatenate([np.zeros((batch, 1), int), tgt[:, :-1]], axis=1)
        data = tuple(jax.numpy.asarray(x, jax.numpy.int32) for x in (enc, dec_in, tgt))
        fns = {p: _loss_and_grad(cfg, p) for p in PATHS}
        times = _interleaved(fns, {p: (params, *data) for p in PATHS}, rounds, calls)
        for p in PATHS:
            rows.append({"model": size, "path": p, **_summary(times[p])})
            print(rows[-1], flush=True)
    return rows


def bench_kernels(rounds: int, calls: int) -> list[dict]:
    """The fast path's kernels against their plain forms, at shapes of the Small training step."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gqa_uptrain import xla_cpu
    r = np.random.RandomState(0)
    x = jnp.asarray(r.randn(16, 131072).astype(np.float32))
    a = jnp.asarray(r.randn(16, 8, 128, 128).astype(np.float32))
    y = jnp.asarray(r.randn(16, 8, 128, 128).astype(np.float32))
    cases = {
        "sum over leading axis [16, 131072]: jnp.sum": (jax.jit(lambda x: jnp.sum(x, axis=0)), (x,)),
        "sum over leading axis [16, 131072]: sum_leading_axes": (jax.jit(lambda x: xla_cpu.sum_leading_axes(x, 1)),
                                                                 (x,)),
        "x^T y [16, 8, 128, 128]: einsum": (jax.jit(lambda a, y: jnp.einsum("bgmk,bgmd->bgkd", a, y)), (a, y)),
        "x^T y [16, 8, 128, 128]: _contract_rows": (jax.jit(xla_cpu._contract_rows), (a, y)),
    }
    times = _interleaved({k: f for k, (f, _) in cases.items()}, {k: v for k, (_, v) in cases.items()}, rounds,
                         calls)
    return [{"kernel": k, **_summary(t)} for k, t in times.items()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,small", help="comma-separated configs/models/t5_1_1/<name>.gin")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs-length", type=int, default=256)
    p.add_argument("--targets-length", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (min/median/max are over these)")
    p.add_argument("--calls", type=int, default=3, help="calls per path per round (their mean is one sample)")
    p.add_argument("--kernels", action="store_true", help="also time the XLA:CPU kernels against plain forms")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args()
    import jax
    rows = bench_models([m for m in args.models.split(",") if m], args.batch, args.inputs_length,
                        args.targets_length, args.rounds, args.calls)
    print(f"backend {jax.default_backend()}, batch {args.batch}, lengths {args.inputs_length}/{args.targets_length}, "
          f"{args.rounds} rounds x {args.calls} calls; ms per forward+backward (min / median / max over rounds)")
    for row in rows:
        print(f"{row['model']:>6} {row['path']:>22}: {row['min_ms']:8.1f} {row['median_ms']:8.1f} "
              f"{row['max_ms']:8.1f}")
    kernels = bench_kernels(args.rounds, 20) if args.kernels else []
    for row in kernels:
        print(f"{row['kernel']:>55}: {row['min_ms']:7.2f} {row['median_ms']:7.2f} {row['max_ms']:7.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "backend": jax.default_backend(), "jax": jax.__version__,
                       "models": rows, "kernels": kernels}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

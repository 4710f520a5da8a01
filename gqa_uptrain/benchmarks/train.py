"""gqa-uptrain bench train: training tokens/s of our jitted Adafactor step vs HF PyTorch T5 on the same config/batch.

Both sides: the same T5.1.1 architecture (gated-GELU, untied logits, relative position buckets), the same initial
parameters (ours, copied into the HF model through the tested name table `gqa_uptrain.hf`), the same batch of random
tokens, float32 on CPU, one optimiser step per iteration (ours: optax Adafactor as in training; HF: transformers'
Adafactor with a fixed learning rate, no relative step). Tokens/s counts encoder + decoder tokens.

Fairness details, each of which moved the ratio on some machine:
- Identical weights: HF's own T5 init draws lm_head with std 1, ours (T5X) with std 1/sqrt(d_model); HF's larger
  logits make many softmax probabilities underflow, so timing each side's default init compares different numerics.
- Denormals: XLA:CPU runs with flush-to-zero/denormals-are-zero; torch does not by default. On Intel CPUs an
  operand full of denormals (e.g. the logits gradient) makes a GEMM ~30x slower (measured: the lm_head backward
  [512, 4224] x [4224, 128] took 140 ms instead of ~4 ms). The HF side calls `torch.set_flush_denormal(True)` so both
  sides use the same arithmetic; `--hf_denormals` keeps torch's default to show the difference.
- Separate processes, interleaved: each side runs in its own worker process (torch's OpenMP threads and XLA's
  thread pool in one process slow each other down), and the workers take turns in blocks of `--steps` for
  `--rounds` rounds while the other waits, so drift of a shared or freshly booted machine hits both alike. The
  medians over all timed steps are reported, with the per-round range.
Warm-up iterations (compilation) are excluded. The process keeps freed host memory mapped (gqa_uptrain.hostmem, as
training does); it applies to both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

HELP = "Training throughput (tokens/s): ours vs HF PyTorch T5ForConditionalGeneration, same config and batch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gqa_uptrain.gin_utils import add_gin_arguments
    add_gin_arguments(parser, default_file="models/t5_1_1/tiny.gin")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per step")
    parser.add_argument("--inputs_length", type=int, default=128, help="encoder tokens per sequence")
    parser.add_argument("--targets_length", type=int, default=32, help="decoder tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (ours, HF, ours, HF, ...)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps per side (compilation); the first is the loss check, so >= 1 runs")
    parser.add_argument("--no_hf", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument("--hf_denormals", action="store_true",
                        help="leave torch's denormal handling at its default (XLA:CPU flushes them; see --help)")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE (JSON)")


def _batch(cfg, b, li, lt, seed=0):
    import numpy as np
    r = np.random.default_rng(seed)
    enc = r.integers(2, cfg.vocab_size, size=(b, li)).astype(np.int32)
    tgt = r.integers(2, cfg.vocab_size, size=(b, lt)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], 1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": tgt,
            "decoder_loss_weights": np.ones_like(tgt)}


def ours_step(cfg, batch, params) -> Callable[[], float]:
    """One jitted optimiser step of ours per call; returns the step's loss."""
    import jax
    import jax.numpy as jnp

    from gqa_uptrain.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
    from gqa_uptrain.train import TrainConfig, make_train_step
    b, lt = batch["decoder_target_tokens"].shape
    tc = TrainConfig(model_dir="unused", batch_size=b, targets_length=lt, train_steps=1)
    ocfg = OptimizerConfig(schedule="constant", base_learning_rate=1e-3)
    opt = make_optimizer(ocfg)
    step_fn = jax.jit(make_train_step(cfg, tc, opt, learning_rate_schedule(ocfg)), donate_argnums=(0, 1))
    state = {"params": jax.tree.map(jnp.array, params)}
    state["opt"] = opt.init(state["params"])
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    step = jnp.int32(0)

    def one() -> float:
        state["params"], state["opt"], _, m = step_fn(state["params"], state["opt"], step, arrays)
        return float(m["loss"])
    return one


def hf_step(cfg, batch, params, flush_denormal: bool = True) -> Callable[[], float]:
    """One HF T5 + transformers Adafactor step per call, starting from `params` (ours, via the name table)."""
    import numpy as np
    import torch
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.optimization import Adafactor

    from gqa_uptrain import hf
    torch.set_flush_denormal(flush_denormal)
    model = T5ForConditionalGeneration(T5Config(**{**hf.hf_config_from_config(cfg), "dropout_rate": 0.0}))
    state = {k: torch.from_numpy(np.array(v)) for k, v in hf.hf_from_params(params, cfg).items()}  # writable copies
    # transformers 5.x always ties T5's lm_head to `shared` when it constructs a model (from_pretrained unties a
    # checkpoint that carries both); untie it before loading, as in T5.1.1 and ours.
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - set(hf.TIED_ALIASES):
        raise RuntimeError(f"HF T5 state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.train()
    opt = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=True, warmup_init=False)
    enc = torch.as_tensor(batch["encoder_input_tokens"], dtype=torch.long)
    labels = torch.as_tensor(batch["decoder_target_tokens"], dtype=torch.long)

    def one() -> float:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=enc, attention_mask=enc > 0, labels=labels).loss
        loss.backward()
        opt.step()
        return float(loss.detach())
    return one


def _timed(fn: Callable[[], Any], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def _worker(conn, side: str, config: dict, batch: dict, params: Any, warmup: int, flush_denormal: bool) -> None:
    """Child process: build one side's step, report its first loss, then time blocks of steps on request."""
    try:
        from gqa_uptrain.hostmem import retain_freed_memory
        retain_freed_memory()  # the same allocator settings on both sides, as `gqa-uptrain train` uses
        from gqa_uptrain.config import ModelConfig
        cfg = ModelConfig.from_dict(config)
        if side == "ours":
            import jax
            import numpy as np

            from gqa_uptrain.seq2seq import EncoderDecoderModel
            params = jax.tree.map(np.asarray, EncoderDecoderModel(cfg).init(jax.random.PRNGKey(0)))
            fn = ours_step(cfg, batch, params)
            info = {"jax": jax.__version__, "params": params}
        else:
            import torch
            fn = hf_step(cfg, batch, params, flush_denormal)
            info = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
        info["first_loss"] = fn()  # also the first of the `warmup` untimed steps
        _timed(fn, warmup - 1)
        conn.send(("ready", info))
        while (n := conn.recv()) is not None:
            conn.send(("times", _timed(fn, n)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


class _Side:
    """A worker process for one side, driven over a pipe."""

    def __init__(self, side: str, *args: Any) -> None:
        import multiprocessing as mp
        ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited XLA or OpenMP threads
        self.side, (self.conn, child) = side, ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, side, *args), daemon=True)
        self.proc.start()
        child.close()

    def recv(self) -> Any:
        try:
            kind, value = self.conn.recv()
        except EOFError:
            self.proc.join()
            raise RuntimeError(f"{self.side} benchmark worker died (exit code {self.proc.exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"{self.side} benchmark worker failed: {value}")
        return value

    def time(self, n: int) -> list[float]:
        self.conn.send(n)
        return self.recv()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


def _median(rounds: list[list[float]]) -> float:
    return statistics.median(t for r in rounds for t in r)


def run(args: argparse.Namespace) -> int:
    from gqa_uptrain.gin_utils import model_config
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    cfg = model_config(args).replace(dtype="float32", dropout_rate=0.0)
    batch = _batch(cfg, args.batch_size, args.inputs_length, args.targets_length)
    tokens = args.batch_size * (args.inputs_length + args.targets_length)
    print(f"config: d_model={cfg.d_model} layers={cfg.num_encoder_layers}/{cfg.num_decoder_layers} "
          f"heads={cfg.num_heads} (kv {cfg.decoder_self_kv_heads}) d_ff={cfg.d_ff} vocab={cfg.vocab_size}; batch "
          f"{args.batch_size} x {args.inputs_length}/{args.targets_length}; float32 CPU "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores); "
          f"{args.rounds} rounds x {args.steps} steps per side")
    with_hf = not args.no_hf
    if with_hf:
        import importlib.util
        if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
            print("HF baseline skipped: torch/transformers are not installed (pip install -e .[hf])")
            with_hf = False
    sides: dict[str, _Side] = {}
    try:
        sides["ours"] = _Side("ours", cfg.to_dict(), batch, None, args.warmup, True)
        info = {"ours": sides["ours"].recv()}
        params = info["ours"].pop("params")
        if with_hf:
            # Started after ours is warm, so the two compilations/warm-ups do not overlap either.
            sides["hf"] = _Side("hf", cfg.to_dict(), batch, params, args.warmup, not args.hf_denormals)
            info["hf"] = sides["hf"].recv()
        times: dict[str, list[list[float]]] = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, side in sides.items():
                times[name].append(side.time(args.steps))
    finally:
        for side in sides.values():
            side.close()
    first_loss = {name: i["first_loss"] for name, i in info.items()}
    if with_hf and abs(first_loss["hf"] - first_loss["ours"]) > 1e-3 * abs(first_loss["ours"]):
        # Same weights and batch: a differing loss means the two sides do not compute the same model.
        raise RuntimeError(f"first-step losses differ: ours {first_loss['ours']:.6f}, HF {first_loss['hf']:.6f}")
    result: dict[str, Any] = {
        "config": cfg.to_dict(), "batch_size": args.batch_size, "inputs_length": args.inputs_length,
        "targets_length": args.targets_length, "tokens_per_step": tokens, "rounds": args.rounds,
        "steps": args.steps, "first_step_loss": first_loss, "times_s": times, "jax": info["ours"]["jax"],
        "load_average_at_start": os.getloadavg()}
    ours = _median(times["ours"])
    result["ours_ms_per_step"] = ours * 1e3
    print(f"ours (jax jit, optax Adafactor):   {ours * 1e3:8.1f} ms/step  {tokens / ours:10.0f} tokens/s  "
          f"(first-step loss {first_loss['ours']:.5f})")
    if with_hf:
        hf_t = _median(times["hf"])
        per_round = [statistics.median(h) / statistics.median(o) for h, o in zip(times["hf"], times["ours"])]
        result.update(hf_ms_per_step=hf_t * 1e3, ratio=hf_t / ours, ratio_per_round=per_round,
                      torch=info["hf"]["torch"], torch_threads=info["hf"]["torch_threads"],
                      hf_flush_denormal=not args.hf_denormals)
        print(f"HF T5 (torch {info['hf']['torch']}, Adafactor):  {hf_t * 1e3:8.1f} ms/step  {tokens / hf_t:10.0f} "
              f"tokens/s  (first-step loss {first_loss['hf']:.5f}; {info['hf']['torch_threads']} threads, denormals "
              f"{'kept' if args.hf_denormals else 'flushed as in XLA'})")
        print(f"ratio ours / HF: {hf_t / ours:.2f}x tokens/s (per round {min(per_round):.2f}-{max(per_round):.2f}x)")
    if args.json:
        from gqa_uptrain.checkpoint import atomic_write_text
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0

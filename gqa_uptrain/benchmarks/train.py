"""gqa-uptrain bench train: training tokens/s of our jitted Adafactor step vs HF PyTorch T5 on the same config/batch.

Both sides: the same T5.1.1 architecture (gated-GELU, untied logits, relative position buckets), the same batch of
random tokens, float32 on CPU, one optimiser step per iteration (ours: optax Adafactor as in training; HF:
transformers' Adafactor with a fixed learning rate, no relative step). Tokens/s counts encoder + decoder tokens.
Warm-up iterations (compilation) are excluded; the median of the timed iterations is reported.
The process keeps freed host memory mapped (gqa_uptrain.hostmem, as training does); it applies to both sides.
"""
from __future__ import annotations

import argparse
import statistics
import time

HELP = "Training throughput (tokens/s): ours vs HF PyTorch T5ForConditionalGeneration, same config and batch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gqa_uptrain.cli.common import add_gin_arguments
    add_gin_arguments(parser, default_file="models/t5_1_1/tiny.gin")
    parser.add_argument("--batch_size", type=int, default=16, help="sequences per step")
    parser.add_argument("--inputs_length", type=int, default=128, help="encoder tokens per sequence")
    parser.add_argument("--targets_length", type=int, default=32, help="decoder tokens per sequence")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side (compilation)")
    parser.add_argument("--no_hf", action="store_true", help="skip the PyTorch baseline")


def _batch(cfg, b, li, lt, seed=0):
    import numpy as np
    r = np.random.default_rng(seed)
    enc = r.integers(2, cfg.vocab_size, size=(b, li)).astype(np.int32)
    tgt = r.integers(2, cfg.vocab_size, size=(b, lt)).astype(np.int32)
    dec_in = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], 1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": tgt,
            "decoder_loss_weights": np.ones_like(tgt)}


def _time(fn, steps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_ours(cfg, batch, steps, warmup) -> float:
    import jax
    import jax.numpy as jnp

    from gqa_uptrain.model import init_params
    from gqa_uptrain.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
    from gqa_uptrain.train import TrainConfig, make_train_step
    b, lt = batch["decoder_target_tokens"].shape
    tc = TrainConfig(model_dir="unused", batch_size=b, targets_length=lt, train_steps=1)
    ocfg = OptimizerConfig(schedule="constant", base_learning_rate=1e-3)
    opt = make_optimizer(ocfg)
    step_fn = jax.jit(make_train_step(cfg, tc, opt, learning_rate_schedule(ocfg)), donate_argnums=(0, 1))
    state = {"params": init_params(cfg, jax.random.PRNGKey(0))}
    state["opt"] = opt.init(state["params"])
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    step = jnp.int32(0)

    def one():
        state["params"], state["opt"], _, m = step_fn(state["params"], state["opt"], step, arrays)
        jax.block_until_ready(m["loss"])
    return _time(one, steps, warmup)


def bench_hf(cfg, batch, steps, warmup) -> float:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.optimization import Adafactor
    torch.manual_seed(0)
    hcfg = T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.d_ff,
                    num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
                    num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.relative_attention_num_buckets,
                    relative_attention_max_distance=cfg.relative_attention_max_distance, dropout_rate=0.0,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                    pad_token_id=0)
    model = T5ForConditionalGeneration(hcfg).train()
    opt = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=True, warmup_init=False)
    enc = torch.as_tensor(batch["encoder_input_tokens"], dtype=torch.long)
    labels = torch.as_tensor(batch["decoder_target_tokens"], dtype=torch.long)

    def one():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=enc, attention_mask=enc > 0, labels=labels).loss
        loss.backward()
        opt.step()
    return _time(one, steps, warmup)


def run(args: argparse.Namespace) -> int:
    import platform

    from gqa_uptrain.hostmem import retain_freed_memory
    retain_freed_memory()  # as `gqa-uptrain train` does (before XLA starts its threads); see gqa_uptrain.hostmem
    from gqa_uptrain.cli.common import model_config
    cfg = model_config(args).replace(dtype="float32", dropout_rate=0.0)
    batch = _batch(cfg, args.batch_size, args.inputs_length, args.targets_length)
    tokens = args.batch_size * (args.inputs_length + args.targets_length)
    print(f"config: d_model={cfg.d_model} layers={cfg.num_encoder_layers}/{cfg.num_decoder_layers} "
          f"heads={cfg.num_heads} (kv {cfg.dec_self_kv_heads}) d_ff={cfg.d_ff} vocab={cfg.vocab_size}; batch "
          f"{args.batch_size} x {args.inputs_length}/{args.targets_length}; float32 CPU ({platform.processor() or '?'})")
    ours = bench_ours(cfg, batch, args.steps, args.warmup)
    print(f"ours (jax jit, optax Adafactor):   {ours * 1e3:8.1f} ms/step  {tokens / ours:10.0f} tokens/s")
    if args.no_hf:
        return 0
    try:
        import torch
    except ImportError:
        print("HF baseline skipped: torch is not installed (pip install -e .[hf])")
        return 0
    hf = bench_hf(cfg, batch, args.steps, args.warmup)
    print(f"HF T5 (torch {torch.__version__}, Adafactor):  {hf * 1e3:8.1f} ms/step  {tokens / hf:10.0f} tokens/s "
          f"({torch.get_num_threads()} threads)")
    print(f"ratio ours / HF: {hf / ours:.2f}x tokens/s")
    return 0

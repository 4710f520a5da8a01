"""gqa-uptrain bench convert: time and peak memory of `gqa-uptrain convert` on a random HF T5.1.1 checkpoint.

Writes a random T5.1.1 checkpoint of the chosen size as HF safetensors (tensor by tensor with numpy; no torch),
then runs, each in its own subprocess so peak RSS is isolated (resource.getrusage(RUSAGE_CHILDREN) of a launcher):
  1. a baseline that only imports the libraries the converter imports (Python + jax + flax + orbax),
  2. the conversion itself.
Reports seconds, peak RSS, the largest single tensor, and
  ratio = (peak RSS - baseline RSS) / largest tensor     (target: <= 2).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

HELP = "Converter time and peak memory vs the largest tensor (random HF T5.1.1 checkpoint)"

# T5.1.1 sizes (d_model, heads, head_dim, d_ff, layers per stack).
SIZES = {
    "tiny": (128, 8, 16, 256, 2),
    "small": (512, 6, 64, 1024, 8),
    "base": (768, 12, 64, 2048, 12),
    "large": (1024, 16, 64, 2816, 24),
}

_LAUNCHER = """
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB on Linux
sys.exit(rc)
"""

_BASELINE = ("import jax, jax.numpy as jnp, flax, orbax.checkpoint, numpy, tqdm; "
             "import gqa_uptrain.readers, gqa_uptrain.convert, gqa_uptrain.checkpoint, gqa_uptrain.model; "
             "jnp.zeros(1).block_until_ready()")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", default="base", choices=sorted(SIZES), help="model size (default base)")
    parser.add_argument("--num-kv-heads", type=int, default=None, metavar="G",
                        help="target KV heads (default: num_heads / 4)")
    parser.add_argument("--method", default="mean", help="conversion method (default mean)")
    parser.add_argument("--workdir", default=None, metavar="DIR",
                        help="where to write the random checkpoint and the output (default: a temp dir, removed)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")


def write_random_hf(directory: pathlib.Path, size: str, seed: int = 0) -> tuple[int, int]:
    """Random HF T5.1.1 checkpoint (model.safetensors + config.json); returns (total bytes, largest tensor bytes)."""
    import numpy as np

    from gqa_uptrain import hf
    from gqa_uptrain.config import ModelConfig
    from gqa_uptrain.export import hf_specs, write_sharded_safetensors
    d, h, hd, ff, n = SIZES[size]
    cfg = ModelConfig(vocab_size=32128, d_model=d, num_heads=h, head_dim=hd, d_ff=ff, num_encoder_layers=n,
                      num_decoder_layers=n)
    specs = hf_specs(cfg)
    rng = np.random.default_rng(seed)

    def tensors():
        for name, shape, dtype in specs:
            yield name, (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(dtype)

    directory.mkdir(parents=True, exist_ok=True)
    write_sharded_safetensors(directory, specs, tensors(), max_shard_bytes=1 << 40)  # one model.safetensors
    conf = hf.hf_config_from_config(cfg)
    (directory / "config.json").write_text(json.dumps(conf))
    sizes = [int(np.prod(s)) * np.dtype(t).itemsize for _, s, t in specs]
    return sum(sizes), max(sizes)


def _measure(cmd: list[str]) -> tuple[float, int, str]:
    t = time.time()
    p = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    secs = time.time() - t
    if p.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    return secs, int(p.stdout.strip().splitlines()[-1]) * 1024, p.stderr


def run(args: argparse.Namespace) -> int:
    mib = 1 / 2 ** 20
    tmp = tempfile.TemporaryDirectory(prefix="gqa_bench_convert_") if args.workdir is None else None
    work = pathlib.Path(args.workdir or tmp.name)
    try:
        t = time.time()
        total, largest = write_random_hf(work / "hf", args.size)
        print(f"wrote random T5.1.1-{args.size} HF checkpoint: {total * mib:.0f} MiB, largest tensor "
              f"{largest * mib:.1f} MiB ({time.time() - t:.1f}s)")
        g = args.num_kv_heads or max(1, SIZES[args.size][1] // 4)
        base_s, base_rss, _ = _measure([sys.executable, "-c", _BASELINE])
        conv_s, conv_rss, err = _measure([sys.executable, "-m", "gqa_uptrain", "convert", "--source",
                                          str(work / "hf"), "--num-kv-heads", str(g), "--method", args.method,
                                          "--output", str(work / "out"), "--overwrite", "--no-progress"])
        ratio = (conv_rss - base_rss) / largest
        res = {"size": args.size, "num_kv_heads": g, "method": args.method, "checkpoint_mib": total * mib,
               "largest_tensor_mib": largest * mib, "baseline_seconds": base_s, "baseline_peak_rss_mib":
               base_rss * mib, "convert_seconds": conv_s, "convert_peak_rss_mib": conv_rss * mib,
               "extra_rss_over_largest_tensor": ratio, "target_ratio": 2.0}
        print(f"baseline (imports only): {base_s:6.1f}s  peak RSS {base_rss * mib:8.0f} MiB")
        print(f"convert (G={g}, {args.method}): {conv_s:6.1f}s  peak RSS {conv_rss * mib:8.0f} MiB")
        print(f"(peak - baseline) / largest tensor = {ratio:.2f}  (target <= 2.00; whole checkpoint = "
              f"{total / largest:.1f} largest tensors)")
        print(err.strip().splitlines()[-1] if err.strip() else "")
        if args.json:
            from gqa_uptrain.checkpoint import atomic_write_text
            atomic_write_text(args.json, json.dumps(res, indent=2) + "\n")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0

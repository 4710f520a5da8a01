"""gqa-uptrain bench decode: time per sample vs number of KV heads G, with a memory-bandwidth roofline and the
Hugging Face PyTorch `generate` baseline measured in the same run.

For each G (same model shape, random parameters, decoder self- and cross-attention with G KV heads):
  time per sample = (encode + greedy decode of exactly --output-len tokens) / batch, median of --repeats runs
  after a warm-up (compile) run; encode alone is timed too, so per-step decode time = (total - encode) / steps.
  KV bytes are measured from the cache arrays after prefill. The roofline for one decode step is
  (decoder weights + self KV cache + cross K/V bytes) / measured copy bandwidth (numpy copy of a large array:
  bytes read + bytes written per second, measured in this run).
The HF baseline is T5ForConditionalGeneration (torch, CPU) on the same MHA shape, greedy, with
min_new_tokens = max_new_tokens = --output-len.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

HELP = "Decode time per sample vs KV heads (G), KV-cache bytes, roofline, and the HF generate baseline"
DESCRIPTION = HELP + """.

Example (the CPU run committed in docs/bench/):
  gqa-uptrain bench decode --gin_file=models/t5_1_1/small.gin --kv-heads 1,2,3,6 --batch 8 --input-len 512 \\
    --output-len 64 --out docs/bench"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gqa_uptrain.gin_utils import add_gin_arguments
    add_gin_arguments(parser, default_file="models/t5_1_1/small.gin")
    parser.add_argument("--kv-heads", "--kv_heads", dest="kv_heads", default=None, metavar="G1,G2,...",
                        help="decoder KV-head counts to time (default: every divisor of num_heads)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--input-len", "--input_len", dest="input_len", type=int, default=512,
                        help="encoder tokens per sequence (default 512)")
    parser.add_argument("--output-len", "--output_len", dest="output_len", type=int, default=64,
                        help="generated tokens per sequence, exactly (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point after warm-up (default 3)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "model"),
                        help="activation and parameter dtype; 'model' keeps the gin file's (default float32: "
                             "CPUs have no fast bfloat16 matmuls)")
    parser.add_argument("--no-hf", "--no_hf", dest="no_hf", action="store_true",
                        help="skip the Hugging Face PyTorch baseline")
    parser.add_argument("--copy-mib", "--copy_mib", dest="copy_mib", type=int, default=512,
                        help="array size for the copy-bandwidth measurement (default 512 MiB)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write decode_<shape>.json, .md and .png here (e.g. docs/bench)")


# --------------------------------------------------------------------------------------------- helpers


def _interleaved_medians(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Warm up every fn, then time them round-robin `repeats` times (other load on a shared machine then hits
    all of them alike). Returns name -> list of seconds."""
    for fn in fns.values():
        fn()  # compile and first-touch allocation
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second moved by a large numpy copy (read + write), median of repeats."""
    import numpy as np
    n = mib * 2**20 // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / statistics.median(times)


def machine_description() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import jax
    info["jax"] = jax.__version__
    info["jax_devices"] = [str(d) for d in jax.devices()]
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def _tree_bytes(tree) -> int:
    import jax
    import numpy as np
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------------------ our decoder


def time_ours(cfg, batch: int, input_len: int, output_len: int, repeats: int, bandwidth: float) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gqa_uptrain import decode
    from gqa_uptrain.model import Transformer
    from gqa_uptrain.seq2seq import EncoderDecoderModel

    params = EncoderDecoderModel(cfg).init(jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    enc = jnp.asarray(rng.randint(2, min(cfg.vocab_size, 32000), (batch, input_len)), jnp.int32)
    model = Transformer(cfg)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
    encoded = encode(params, enc)

    times = _interleaved_medians({
        # What a user pays per batch: encoder + cached greedy loop in one compiled call.
        "total": lambda: decode.greedy_decode(cfg, params, enc, output_len, eos_id=None).block_until_ready(),
        "encode": lambda: encode(params, enc).block_until_ready(),
        # The decoder alone (prefill + output_len - 1 cached steps) on a precomputed encoder output.
        "decode": lambda: decode.greedy_decode_from_encoded(cfg, params, encoded, enc, output_len,
                                                            eos_id=None).block_until_ready(),
        # Prefill alone (start token + the one-off cross-attention K/V projection of the encoder output).
        "prefill": lambda: decode.greedy_decode_from_encoded(cfg, params, encoded, enc, 1,
                                                             eos_id=None).block_until_ready(),
    }, repeats)
    t_total, t_enc, t_dec, t_pre = (statistics.median(times[k]) for k in ("total", "encode", "decode", "prefill"))
    _, cache = decode.prefill(cfg, params, enc, output_len)
    kv = decode.cache_bytes(cache)
    dec_weights = _tree_bytes(params["decoder"])  # layers, norms, relpos table, logits_dense
    step_bytes = dec_weights + kv["total"]  # attention reads the whole (max-length) self cache each step
    t_step = t_dec / output_len
    # Incremental steps only (what the roofline describes): decoder time minus the prefill, per remaining step.
    t_inc = max(t_dec - t_pre, 1e-9) / max(output_len - 1, 1)
    return {"kv_heads": cfg.decoder_self_kv_heads, "time_per_sample_s": t_total / batch,
            "total_s": t_total, "runs_s": times, "encode_s": t_enc, "decode_s": t_dec, "decode_step_s": t_step,
            "prefill_s": t_pre, "incremental_step_s": t_inc,
            "tokens_per_s": batch * output_len / t_total, "kv_cache_self_bytes": kv["self"],
            "kv_cache_cross_bytes": kv["cross"], "decoder_weight_bytes": dec_weights,
            "bytes_per_step": step_bytes, "roofline_step_s": step_bytes / bandwidth,
            "step_vs_roofline": t_inc / (step_bytes / bandwidth)}


# --------------------------------------------------------------------------------------------- HF torch


def time_hf(cfg, batch: int, input_len: int, output_len: int, repeats: int) -> dict:
    import numpy as np
    import torch
    import transformers

    from gqa_uptrain import hf
    torch.manual_seed(0)
    hf_cfg = transformers.T5Config(**{**hf.hf_config_from_config(cfg.replace(decoder_self_kv_heads=None,
                                                                             decoder_cross_kv_heads=None,
                                                                             encoder_kv_heads=None)),
                                      "dropout_rate": 0.0})
    model = transformers.T5ForConditionalGeneration(hf_cfg).eval()
    if cfg.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    ids = torch.tensor(np.random.RandomState(0).randint(2, min(cfg.vocab_size, 32000), (batch, input_len)))
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                 max_new_tokens=output_len, min_new_tokens=output_len)
        assert out.shape[1] == output_len + 1, out.shape  # start token + exactly output_len tokens

    def run_encode():
        with torch.no_grad():
            model.encoder(input_ids=ids, attention_mask=mask)

    times = _interleaved_medians({"total": run, "encode": run_encode}, repeats)
    t_total, t_enc = statistics.median(times["total"]), statistics.median(times["encode"])
    # HF has no public decoder-only generate; its per-step time is (total - encode) / steps.
    return {"kv_heads": cfg.num_heads, "time_per_sample_s": t_total / batch, "total_s": t_total,
            "runs_s": times, "encode_s": t_enc, "decode_step_s": max(t_total - t_enc, 1e-9) / output_len,
            "tokens_per_s": batch * output_len / t_total, "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads()}


def time_hf_subprocess(cfg, batch: int, input_len: int, output_len: int, repeats: int) -> dict | None:
    """Run `time_hf` in a fresh interpreter: with JAX's thread pools alive in the same process torch ran ~10x
    slower on the 2-core benchmark machine, which would flatter our numbers."""
    spec = json.dumps({"config": cfg.to_dict(), "batch": batch, "input_len": input_len, "output_len": output_len,
                       "repeats": repeats})
    proc = subprocess.run([sys.executable, "-m", "gqa_uptrain.benchmarks.decode", "--hf-worker", spec],
                          capture_output=True, text=True, check=False)
    if proc.returncode == 3:
        print(f"skipping the HF baseline: {proc.stdout.strip()}", file=sys.stderr)
        return None
    if proc.returncode != 0:
        raise ValueError(f"HF baseline failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else '?'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _hf_worker(spec: str) -> int:
    from gqa_uptrain.config import ModelConfig
    from gqa_uptrain.hostmem import retain_freed_memory
    retain_freed_memory()  # the same allocator settings as our side
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"torch/transformers not installed ({e})")
        return 3
    s = json.loads(spec)
    row = time_hf(ModelConfig.from_dict(s["config"]), s["batch"], s["input_len"], s["output_len"], s["repeats"])
    print(json.dumps(row))
    return 0


# ---------------------------------------------------------------------------------------------- report


def _table(rows: list[dict], hf_row: dict | None) -> str:
    head = ("| impl | G | time/sample (ms) | encode (ms) | prefill (ms) | decode step (ms) | incremental step (ms) "
            "| roofline step (ms) | incr. step / roofline | tokens/s | self KV (MiB) | cross K/V (MiB) "
            "| incr. step speed-up vs MHA | ideal (bytes ratio) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    mha = max(rows, key=lambda r: r["kv_heads"])
    for r in rows:
        speed = mha["incremental_step_s"] / r["incremental_step_s"]
        ideal = mha["bytes_per_step"] / r["bytes_per_step"]
        lines.append(f"| ours (JAX) | {r['kv_heads']} | {1e3 * r['time_per_sample_s']:.1f} | {1e3 * r['encode_s']:.0f} "
                     f"| {1e3 * r['prefill_s']:.0f} | {1e3 * r['decode_step_s']:.2f} "
                     f"| {1e3 * r['incremental_step_s']:.2f} | {1e3 * r['roofline_step_s']:.2f} "
                     f"| {r['step_vs_roofline']:.2f} | {r['tokens_per_s']:.1f} "
                     f"| {r['kv_cache_self_bytes'] / 2**20:.2f} | {r['kv_cache_cross_bytes'] / 2**20:.2f} "
                     f"| {speed:.2f}x | {ideal:.2f}x |")
    if hf_row:
        lines.append(f"| HF torch generate | {hf_row['kv_heads']} | {1e3 * hf_row['time_per_sample_s']:.1f} "
                     f"| {1e3 * hf_row['encode_s']:.0f} | | {1e3 * hf_row['decode_step_s']:.2f} | | | "
                     f"| {hf_row['tokens_per_s']:.1f} | | | | |")
    return "\n".join(lines)


def _plot(rows: list[dict], hf_row: dict | None, path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gs = [r["kv_heads"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(gs, [1e3 * r["time_per_sample_s"] for r in rows], "o-", label="ours: time per sample")
    ax.plot(gs, [1e3 * (r["encode_s"] + r["prefill_s"] + r["roofline_step_s"] * (r["output_len"] - 1))
                 / r["batch"] for r in rows], "s--", label="measured encode + prefill, roofline steps")
    if hf_row:
        ax.plot([hf_row["kv_heads"]], [1e3 * hf_row["time_per_sample_s"]], "r^", markersize=9,
                label="HF torch generate (MHA)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(gs, [str(g) for g in gs])
    ax.set_xlabel("decoder KV heads G (G = H: MHA, G = 1: MQA)")
    ax.set_ylabel("time per sample (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gqa_uptrain.gin_utils import model_config
    from gqa_uptrain.hostmem import retain_freed_memory
    retain_freed_memory()  # as `infer` / `eval` do; the HF worker process applies it too

    base = model_config(args)
    if args.dtype != "model":
        base = base.replace(dtype=args.dtype, param_dtype=args.dtype)
    h = base.num_heads
    if args.kv_heads:
        try:
            groups = sorted({int(g) for g in args.kv_heads.split(",") if g.strip()})
        except ValueError:
            raise ValueError(f"--kv-heads must be comma-separated integers, got {args.kv_heads!r}") from None
    else:
        groups = [g for g in range(1, h + 1) if h % g == 0]
    if h not in groups:
        groups.append(h)  # MHA is the reference for the speed-ups
    configs = [base.with_decoder_kv_heads(g) for g in groups]  # validates divisibility with a clear error
    for name in ("batch", "input_len", "output_len", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")

    machine = machine_description()
    bandwidth = copy_bandwidth(args.copy_mib)
    print(f"machine: {machine.get('cpu_model', '?')}, {machine['cpus']} CPUs; copy bandwidth "
          f"{bandwidth / 1e9:.2f} GB/s (read + write)", file=sys.stderr)
    rows = []
    for cfg in tqdm(configs, desc="bench decode (ours)", unit="G", file=sys.stderr):
        r = time_ours(cfg, args.batch, args.input_len, args.output_len, args.repeats, bandwidth)
        r.update(batch=args.batch, output_len=args.output_len)
        rows.append(r)
    hf_row = None
    if not args.no_hf:
        print("timing HF torch generate (MHA) in a fresh process ...", file=sys.stderr)
        hf_row = time_hf_subprocess(base, args.batch, args.input_len, args.output_len, args.repeats)

    mha = next(r for r in rows if r["kv_heads"] == h)
    summary = {"ours_mha_vs_hf_tokens_per_s": hf_row and mha["tokens_per_s"] / hf_row["tokens_per_s"],
               "ours_mha_vs_hf_decode_step": hf_row and hf_row["decode_step_s"] / mha["decode_step_s"],
               "step_vs_roofline": {r["kv_heads"]: r["step_vs_roofline"] for r in rows},
               "decode_speedup_vs_mha": {r["kv_heads"]: mha["incremental_step_s"] / r["incremental_step_s"]
                                         for r in rows},
               "time_per_sample_speedup_vs_mha": {r["kv_heads"]: mha["time_per_sample_s"] / r["time_per_sample_s"]
                                                  for r in rows},
               "ideal_speedup_bytes": {r["kv_heads"]: mha["bytes_per_step"] / r["bytes_per_step"] for r in rows},
               "kv_only_ratio": {r["kv_heads"]: h / r["kv_heads"] for r in rows}}
    summary["fraction_of_ideal"] = {g: (summary["decode_speedup_vs_mha"][g] - 1) /
                                    (summary["ideal_speedup_bytes"][g] - 1)
                                    for g in summary["ideal_speedup_bytes"] if summary["ideal_speedup_bytes"][g] > 1}
    shape = (f"d{base.d_model}_h{h}_L{base.num_encoder_layers}x{base.num_decoder_layers}_b{args.batch}"
             f"_in{args.input_len}_out{args.output_len}_{base.dtype}")
    result = {"benchmark": "decode", "shape": shape, "model": base.to_dict(), "batch": args.batch,
              "input_len": args.input_len, "output_len": args.output_len, "repeats": args.repeats,
              "copy_bandwidth_bytes_per_s": bandwidth, "machine": machine, "ours": rows, "hf": hf_row,
              "summary": summary}
    table = _table(rows, hf_row)
    print(table)
    if hf_row:
        print(f"ours MHA vs HF generate: {summary['ours_mha_vs_hf_tokens_per_s']:.2f}x tokens/s, "
              f"{summary['ours_mha_vs_hf_decode_step']:.2f}x per decode step")
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"decode_{shape}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        title = (f"T5.1.1 d={base.d_model} H={h} {base.num_encoder_layers}+{base.num_decoder_layers} layers, "
                 f"batch {args.batch}, in {args.input_len}, out {args.output_len}, {base.dtype}\n"
                 f"{machine.get('cpu_model', '?')} ({machine['cpus']} CPUs)")
        _plot(rows, hf_row, out / f"decode_{shape}.png", title)
        (out / f"decode_{shape}.md").write_text(
            f"# Decode benchmark: {shape}\n\nMachine: {machine.get('cpu_model', '?')}, {machine['cpus']} CPUs, "
            f"copy bandwidth {bandwidth / 1e9:.2f} GB/s (numpy copy, read + write).\n\n{table}\n")
        print(f"wrote {out}/decode_{shape}.{{json,md,png}}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--hf-worker":
        sys.exit(_hf_worker(sys.argv[2]))
    sys.exit("usage: gqa-uptrain bench decode --help")

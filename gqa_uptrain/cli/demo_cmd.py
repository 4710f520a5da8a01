"""gqa-uptrain demo: the whole flow on the bundled corpus, a few minutes on a laptop CPU.

tiny MHA T5.1.1 pre-trained from scratch -> convert to GQA-2 and MQA (mean pooling) -> uptrain each, and an MHA
control, for α x the original steps -> evaluate held-out span-corruption loss (fixed noise) -> decode a sample ->
report. Every stage is the public CLI command a user would type; the demo prints each one before running it.
"""
from __future__ import annotations

import argparse

HELP = "End-to-end demo: tiny MHA model -> convert (GQA/MQA) -> uptrain -> evaluate -> report"
DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="demo_output", help="where everything is written (default %(default)s)")
    parser.add_argument("--pretrain_steps", type=int, default=300,
                        help="steps of from-scratch pre-training that make 'the original checkpoint' (default 300)")
    parser.add_argument("--alpha", type=float, default=0.1,
                        help="uptraining fraction of the original steps (paper: 0.05; default 0.1 so the CPU demo "
                             "uptrains for a measurable number of steps)")
    parser.add_argument("--kv_heads", default="2,1", help="decoder KV-head counts to convert to (default 2,1)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--inputs_length", type=int, default=128)
    parser.add_argument("--targets_length", type=int, default=32)
    parser.add_argument("--eval_examples", type=int, default=128, help="fixed-noise validation examples")
    parser.add_argument("--overwrite", action="store_true", help="start over if --output_dir has a previous demo")
    from gqa_uptrain.cli.common import add_progress_argument
    add_progress_argument(parser)


def _step(title: str, argv: list[str]) -> None:
    from gqa_uptrain.cli import main
    print(f"\n=== {title}\n$ gqa-uptrain {' '.join(argv)}", flush=True)
    rc = main(argv)
    if rc:
        raise RuntimeError(f"demo stage '{title}' failed (exit {rc})")


def run(args: argparse.Namespace) -> int:
    import pathlib
    import shutil
    import time

    from gqa_uptrain.checkpoint import read_config

    out = pathlib.Path(args.output_dir).absolute()
    if out.exists():
        if not args.overwrite and any(out.iterdir()):
            raise FileExistsError(f"{out} exists; pass --overwrite to start the demo over (or another --output_dir)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t_start = time.time()
    kv_heads = [int(g) for g in args.kv_heads.split(",") if g.strip()]
    lengths = [f"--gin.BATCH_SIZE={args.batch_size}", f"--gin.INPUTS_LENGTH={args.inputs_length}",
               f"--gin.TARGETS_LENGTH={args.targets_length}", "--gin.EVAL_EXAMPLES=32",
               *(["--no_progress"] if args.no_progress else [])]
    ev = ["--task", "gqa_span_corruption", "--num_examples", str(args.eval_examples), "--max_input_length",
          str(args.inputs_length), "--max_target_length", str(args.targets_length), "--quiet"]

    _step("1. pre-train a tiny MHA T5.1.1 from scratch (the 'original checkpoint')", [
        "train", "--gin_file=models/t5_1_1/tiny.gin", "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR={out}/mha",
        f"--gin.TRAIN_STEPS={args.pretrain_steps}", f"--gin.SAVE_EVERY={args.pretrain_steps}",
        f"--gin.EVAL_EVERY={args.pretrain_steps}", *lengths])
    heads = read_config(out / "mha").num_heads
    models = {"MHA": heads, **{("MQA" if g == 1 else f"GQA-{g}"): g for g in kv_heads}}
    for name, g in models.items():
        _step(f"2. convert to {name} (decoder self+cross attention, mean pooling)", [
            "convert", "--source", f"{out}/mha", "--num-kv-heads", str(g), "--output", f"{out}/{name}/converted",
            "--no-progress"])
        _step(f"3. evaluate {name} before uptraining (α=0)", [
            "eval", "--checkpoint", f"{out}/{name}/converted", *ev, "--output", f"{out}/{name}/eval_alpha0.json"])
        _step(f"4. uptrain {name} for α={args.alpha:g} x {args.pretrain_steps} steps (fresh Adafactor state)", [
            "train", "--gin_file=runs/uptrain.gin", f"--gin.INITIAL_CHECKPOINT={out}/{name}/converted",
            f"--gin.MODEL_DIR={out}/{name}/uptrained", f"--gin.UPTRAIN_FRACTION={args.alpha}",
            "--gin.EVAL_EVERY=1000000", *lengths])
        _step(f"5. evaluate {name} after uptraining", [
            "eval", "--checkpoint", f"{out}/{name}/uptrained", *ev, "--output", f"{out}/{name}/eval_uptrained.json"])
    sample = out / "sample.txt"
    sample.write_text("Blessed are the meek: for they shall inherit the earth.\n"
                      "a small <extra_id_0> animal that lives in <extra_id_1> woods\n")
    gq = next(n for n in models if n != "MHA")
    _step(f"6. decode with the uptrained {gq} model and its KV cache", [
        "infer", "--checkpoint", f"{out}/{gq}/uptrained", "--input", str(sample), "--output",
        f"{out}/samples.jsonl", "--max_decode_length", "16", "--quiet"])
    report = write_report(out, models, args, time.time() - t_start)
    print("\n" + report)
    print(f"demo finished in {time.time() - t_start:.0f}s; report: {out}/report.md")
    return 0


def write_report(out, models: dict[str, int], args, seconds: float) -> str:
    """report.md beside report.png, with links relative to the demo directory so both work wherever it is moved.

    Only what a minutes-long CPU run measures honestly: KV-cache bytes per token (exact, from the config) and
    held-out losses. Decode times at this toy size are per-step overheads and machine noise (MQA can come out
    slowest), so they are left to `gqa-uptrain bench decode` at a realistic shape."""
    import json
    import os
    import platform

    from gqa_uptrain.checkpoint import read_config

    def loss(path):
        return json.loads(path.read_text())["metrics"]["loss"]

    rows = []
    for name, g in models.items():
        rows.append({"name": name, "kv_heads": g, "kv_bytes": read_config(out / name / "converted")
                     .kv_cache_bytes_per_token(), "alpha0": loss(out / name / "eval_alpha0.json"),
                     "uptrained": loss(out / name / "eval_uptrained.json")})
    control = next(r["uptrained"] for r in rows if r["name"] == "MHA")
    _plot(out / "report.png", rows, args.alpha)
    c = read_config(out / "MHA" / "converted")  # the model the demo trained, as written beside its checkpoint
    lines = ["# gqa_uptrain demo report", "",
             f"Tiny T5.1.1 (d_model {c.d_model}, {c.num_heads} heads, {c.num_encoder_layers}+{c.num_decoder_layers} "
             f"layers, vocab {c.vocab_size}: the bundled SentencePiece pieces and sentinels) pre-trained "
             f"{args.pretrain_steps} steps on the bundled corpus, converted with mean pooling, uptrained "
             f"α={args.alpha:g} x {args.pretrain_steps} = {round(args.alpha * args.pretrain_steps)} steps. "
             f"Loss: held-out span corruption, {args.eval_examples} fixed-noise validation examples "
             f"(nats per target token). Δ is against the MHA control, which was uptrained the same way.",
             "", "![loss before and after uptraining, and KV-cache bytes per token, per model](report.png)", "",
             "Plot: [report.png](report.png)", "",
             "| model | decoder KV heads | KV cache bytes/token | loss α=0 | loss uptrained | Δ vs MHA control |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['kv_heads']} | {r['kv_bytes']:,} | {r['alpha0']:.4f} | "
                     f"{r['uptrained']:.4f} | {r['uptrained'] - control:+.4f} |")
    samples = (out / "samples.jsonl").read_text().strip().splitlines()
    lines += ["", "Greedy decodes (uptrained model; a tiny model trained for minutes, so expect babble):", ""]
    for s in samples:
        d = json.loads(s)
        lines.append(f"- `{d['input']}` -> `{d['output']}`")
    lines += ["", f"Machine: {_cpu_model() or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
              f"demo wall time {seconds:.0f}s.",
              "One run, one seed: loss differences smaller than a few hundredths are noise at this scale (see "
              "`scripts/reproduce_paper.sh` for seeds and spreads).",
              "", "Decode speed is not measured here: at this toy size a decode step is dominated by fixed "
              "per-step overheads, not by reading the KV cache, so times per sample move with machine load, not "
              "with KV heads. The KV-cache column above is what GQA/MQA shrink; to see its effect on speed run "
              "`gqa-uptrain bench decode` at a realistic shape (results and method: docs/bench/ in the "
              "gqa_uptrain repository)."]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def _plot(path, rows: list[dict], alpha: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r["name"] for r in rows]
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.bar([i - 0.2 for i in x], [r["alpha0"] for r in rows], 0.4, label="converted (α=0)")
    ax1.bar([i + 0.2 for i in x], [r["uptrained"] for r in rows], 0.4, label=f"uptrained (α={alpha:g})")
    ax1.set_xticks(list(x), names)
    ax1.set_ylabel("held-out loss (nats/token)")
    lo = min(min(r["alpha0"], r["uptrained"]) for r in rows)
    ax1.set_ylim(bottom=max(0.0, lo - 0.5))
    ax1.legend(fontsize=8)
    ax2.bar(list(x), [r["kv_bytes"] for r in rows], 0.5, color="tab:gray")
    ax2.set_xticks(list(x), names)
    ax2.set_ylabel("decoder KV-cache bytes per token")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

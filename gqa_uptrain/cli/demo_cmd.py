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
    import json
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
    _step("7. time per sample vs KV heads (decode benchmark, same model shape)", [
        "bench", "decode", "--gin_file=models/t5_1_1/tiny.gin", "--kv-heads",
        ",".join(str(g) for g in sorted(set(models.values()))), "--batch", "8", "--input-len",
        str(args.inputs_length), "--output-len", str(args.targets_length), "--repeats", "3", "--no-hf",
        "--out", f"{out}/bench"])
    report = write_report(out, models, args, time.time() - t_start)
    print("\n" + report)
    print(f"demo finished in {time.time() - t_start:.0f}s; report: {out}/report.md")
    del json
    return 0


def write_report(out, models: dict[str, int], args, seconds: float) -> str:
    import glob
    import json
    import platform

    from gqa_uptrain.checkpoint import read_config

    bench, machine = {}, {}
    for f in glob.glob(f"{out}/bench/decode_*.json"):
        result = json.loads(open(f).read())
        machine = result.get("machine", {})
        for row in result.get("ours", []):
            bench[int(row.get("kv_heads", -1))] = row
    def loss(path):
        return json.loads(path.read_text())["metrics"]["loss"]

    control = loss(out / "MHA" / "eval_uptrained.json")
    lines = [f"# gqa_uptrain demo report", "",
             f"Tiny T5.1.1 (d_model 128, 8 heads, 2+2 layers, bundled 4k SentencePiece vocab) pre-trained "
             f"{args.pretrain_steps} steps on the bundled corpus, converted with mean pooling, uptrained "
             f"α={args.alpha:g} x {args.pretrain_steps} = {round(args.alpha * args.pretrain_steps)} steps. "
             f"Loss: held-out span corruption, {args.eval_examples} fixed-noise validation examples "
             f"(nats per target token). Δ is against the MHA control, which was uptrained the same way.",
             "", "| model | decoder KV heads | KV cache bytes/token | loss α=0 | loss uptrained | Δ vs MHA control |"
             " time/sample (ms) |", "|---|---|---|---|---|---|---|"]
    for name, g in models.items():
        a0, up = loss(out / name / "eval_alpha0.json"), loss(out / name / "eval_uptrained.json")
        cfg = read_config(out / name / "converted")
        tps = bench.get(g, {}).get("time_per_sample_s")
        lines.append(f"| {name} | {g} | {cfg.kv_cache_bytes_per_token():,} | {a0:.4f} | {up:.4f} | "
                     f"{up - control:+.4f} | {'n/a' if tps is None else f'{tps * 1e3:.2f}'} |")
    samples = (out / "samples.jsonl").read_text().strip().splitlines()
    lines += ["", "Greedy decodes (uptrained model; a tiny model trained for minutes, so expect babble):", ""]
    for s in samples:
        d = json.loads(s)
        lines.append(f"- `{d['input']}` -> `{d['output']}`")
    cpu = machine.get("cpu_model") or platform.processor() or platform.machine()
    lines += ["", f"Machine: {cpu}, {machine.get('cpus', '?')} CPUs; demo wall time {seconds:.0f}s.",
              "One run, one seed: loss differences smaller than a few hundredths are noise at this scale (see "
              "`scripts/reproduce_paper.sh` for seeds and spreads). At this toy size decoding is dominated by "
              "per-step overheads, not KV-cache bytes, so times per sample differ little and move with machine "
              "load; `gqa-uptrain bench decode` on a larger shape shows the KV effect (docs/bench/)."]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text

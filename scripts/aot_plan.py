"""Table 1 / Figure 6 of the GQA paper in simulation, from XLA's compiled programs for a TPU v4 slice.

For each number of key/value groups G, T5.1.1-XXL (input 2048, output 512, bfloat16 parameters and activations) is
compiled ahead of time for `v4:2x2x2` (8 chips) with the decoder's encoder+prefill and one-token step programs
(gqa_uptrain/aot.py). The largest batch per chip up to 32 whose programs both fit in HBM is searched from XLA's
memory analysis; time per sample per chip is the roofline estimate (encoder+prefill once, 512 steps) times the
chips, divided by the batch. Each result is appended to --out as one JSON line as soon as it is known, so a long run
can be stopped and resumed (G values already in the file are skipped).

  JAX_PLATFORMS=cpu python scripts/aot_plan.py --groups 1,8,64 --out docs/bench/aot_table1.jsonl
  python scripts/aot_plan.py --table --out docs/bench/aot_table1.jsonl    # the markdown table of docs/scaling.md

`--uptrain` compiles the trainer's step instead (train.jit_train_step, layers scanned: ModelConfig.scan_layers) for
a T5.1.1 size and G on each --topologies slice, with the microbatch counts of --microbatches tried in order until
one fits, and appends one line per compile to docs/bench/aot_uptrain.jsonl (with the machine, its load, the jax and
libtpu versions and the compile seconds); `--uptrain --table` prints the table of docs/scaling.md from them:

  JAX_PLATFORMS=cpu nice -n 5 python scripts/aot_plan.py --uptrain --size xxl --groups 8 \
      --topologies v4:2x2x4=data=1,fsdp=16,model=1 --microbatches 4,8
  python scripts/aot_plan.py --uptrain --table

Besides the roofline from XLA's "bytes accessed" (which counts every HLO operand, including copies and transposes
of the cache), the table gives a floor: the step's argument bytes (every weight and cache entry read once) over
the HBM bandwidth.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

DECODE_STEPS = 512
PAPER = {1: 0.24, 8: 0.28, 64: 1.51}  # Table 1, XXL, seconds per sample per TPUv4 chip


def xxl(g: int):
    from gqa_uptrain.config import ModelConfig
    return ModelConfig(vocab_size=32128, d_model=4096, num_heads=64, head_dim=64, d_ff=10240, num_encoder_layers=24,
                       num_decoder_layers=24, decoder_self_kv_heads=g, decoder_cross_kv_heads=g, dtype="bfloat16",
                       param_dtype="bfloat16")


def measure(cfg, mesh, chip, per_chip: int, chips: int, inputs: int, outputs: int) -> dict:
    from gqa_uptrain import aot
    batch = per_chip * chips
    t0 = time.perf_counter()
    r = aot.compile_decode(cfg, mesh, chip, batch, inputs, outputs)
    pre, step = r["prefill"], r["step"]
    fits = pre["fits"] and step["fits"]
    # Roofline: the encoder+prefill program once, then one step program per output token.
    wall = pre["roofline_seconds"] + DECODE_STEPS * step["roofline_seconds"] if fits else None
    return {"per_chip_batch": per_chip, "global_batch": batch, "fits": fits,
            "peak_bytes": max(pre["per_device_bytes"]["total"] or 0, step["per_device_bytes"]["total"] or 0),
            "prefill": pre, "step": step, "wall_estimate_seconds": wall,
            "seconds_per_sample_per_chip": wall * chips / batch if fits else None,
            "measure_seconds": time.perf_counter() - t0}


def largest_batch(cfg, mesh, chip, chips, inputs, outputs, log) -> dict:
    """Largest per-chip batch in {32, 16, 8, 4, 2, 1}... refined linearly: try 32; if it does not fit, fit
    peak = a + b * batch through two compiled points and check the predicted largest batch."""
    top = measure(cfg, mesh, chip, 32, chips, inputs, outputs)
    log(top)
    if top["fits"]:
        return {**top, "tried": [32]}
    low = measure(cfg, mesh, chip, 8, chips, inputs, outputs)
    log(low)
    tried = [32, 8]
    slope = (top["peak_bytes"] - low["peak_bytes"]) / 24
    guess = int((chip.hbm_bytes - low["peak_bytes"]) / slope) + 8 if slope > 0 else 8
    guess = max(1, min(31, guess))
    best = low if low["fits"] else None
    while guess >= 1 and guess not in tried:
        r = measure(cfg, mesh, chip, guess, chips, inputs, outputs)
        log(r)
        tried.append(guess)
        if r["fits"]:
            best = r if best is None or r["per_chip_batch"] > best["per_chip_batch"] else best
            break
        guess -= 1 if guess <= 8 else max(1, guess // 8)
    if best is None:
        return {**low, "tried": tried}
    return {**best, "tried": tried}


def table(path: pathlib.Path) -> str:
    rows = sorted((json.loads(l) for l in path.read_text().splitlines() if l.strip()), key=lambda d: d["groups"])
    by_g = {d["groups"]: d["result"] for d in rows}
    ref = by_g.get(8)
    out = ["| G | batch/chip | peak GiB/chip | prefill s | step ms | step ms (floor) | s/sample/chip | floor | "
           "vs GQA-8 | paper s | paper vs GQA-8 | compile s |", "|---" * 12 + "|"]
    for d in rows:
        r, g = d["result"], d["groups"]
        if not r["fits"]:
            out.append(f"| {g} | none fits | | | | | | | | | | |")
            continue
        from gqa_uptrain.aot import CHIPS
        bw = CHIPS[d["topology"].split(":")[0]].hbm_bytes_per_second
        chips = r["global_batch"] // r["per_chip_batch"]
        floor_step = r["step"]["per_device_bytes"]["arguments"] / bw
        floor = (r["prefill"]["roofline_seconds"] + DECODE_STEPS * floor_step) * chips / r["global_batch"]
        rel = r["seconds_per_sample_per_chip"] / ref["seconds_per_sample_per_chip"] if ref else float("nan")
        paper = PAPER.get(g)
        out.append(f"| {g} | {r['per_chip_batch']} | {r['peak_bytes'] / 2**30:.1f} | "
                   f"{r['prefill']['roofline_seconds']:.2f} | {r['step']['roofline_seconds'] * 1e3:.1f} | "
                   f"{floor_step * 1e3:.1f} | {r['seconds_per_sample_per_chip']:.3f} | {floor:.3f} | {rel:.2f} | "
                   f"{paper if paper else ''} | {f'{paper / PAPER[8]:.2f}' if paper else ''} | "
                   f"{r['prefill']['compile_seconds'] + r['step']['compile_seconds']:.0f} |")
    return "\n".join(out)


def plot(path: pathlib.Path, png: str) -> None:
    """Figure 6's shape: time per sample per chip against G, roofline and floor, with the paper's three points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from gqa_uptrain.aot import CHIPS
    rows = sorted((json.loads(l) for l in path.read_text().splitlines() if l.strip()), key=lambda d: d["groups"])
    rows = [d for d in rows if d["result"]["fits"]]
    g = [d["groups"] for d in rows]
    est = [d["result"]["seconds_per_sample_per_chip"] for d in rows]
    bw = CHIPS[rows[0]["topology"].split(":")[0]].hbm_bytes_per_second
    floor = [(d["result"]["prefill"]["roofline_seconds"] + DECODE_STEPS * d["result"]["step"]["per_device_bytes"]
              ["arguments"] / bw) / d["result"]["per_chip_batch"] for d in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(g, est, "o-", label="compiled, roofline (XLA bytes)")
    ax.plot(g, floor, "s--", label="compiled, floor (argument bytes)")
    ax.plot(list(PAPER), list(PAPER.values()), "k*", markersize=10, label="paper, Table 1")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("key/value groups G")
    ax.set_ylabel("s per sample per chip")
    ax.set_title("T5-XXL, in 2048 / out 512, v4:2x2x2 (estimate)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


UPTRAIN_OUT = "docs/bench/aot_uptrain.jsonl"


def t5_config(size: str, groups: int, scan: bool = True):
    """The configs/models/t5_1_1/<size>.gin model with G decoder key/value heads (the paper's uptraining target)."""
    from gqa_uptrain import gin_utils
    gin_utils.parse_gin([f"models/t5_1_1/{size}.gin"], [f"NUM_KV_HEADS = {groups}", f"SCAN_LAYERS = {scan}"])
    return gin_utils.model_config_from_gin()


def machine() -> dict:
    """What the compile ran on: CPU model, cores, load at the start, this process's nice value, versions."""
    import importlib.metadata
    import os
    import platform
    cpu = next((l.split(":", 1)[1].strip() for l in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if pathlib.Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 1),
            "nice": os.nice(0), "jax": importlib.metadata.version("jax"),
            "libtpu": importlib.metadata.version("libtpu")}


def _reset_peak_rss() -> None:
    """Start a new peak-RSS (VmHWM) window for this process (Linux; a no-op elsewhere)."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_bytes() -> int | None:
    """Peak resident memory since the last _reset_peak_rss (VmHWM), or None off Linux."""
    try:
        line = next(l for l in pathlib.Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


_KEY = ("size", "groups", "topology", "mesh", "batch_size", "inputs_length", "targets_length", "num_microbatches",
        "remat_policy", "scan_layers")


def _done(out: pathlib.Path) -> list[dict]:
    return [json.loads(l) for l in out.read_text().splitlines() if l.strip()] if out.exists() else []


def uptrain(args) -> None:
    """Compile the train step per (G, slice), microbatch counts in order until one fits; a JSON line each."""
    from gqa_uptrain import aot
    from gqa_uptrain.train import TrainConfig
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for g in [int(x) for x in args.groups.split(",")]:
        cfg = t5_config(args.size, g, scan=not args.no_scan)
        for entry in args.topologies.split(";"):
            topo, _, mesh_spec = entry.partition("=")
            chip, mesh = aot.chip_for(topo), aot.topology_mesh(topo, mesh_spec)
            for m in [int(x) for x in args.microbatches.split(",")]:
                tc = TrainConfig(model_dir="unused", train_steps=1, batch_size=args.batch_size,
                                 inputs_length=args.inputs_length, targets_length=args.targets_length,
                                 num_microbatches=m, remat_policy=args.remat_policy)
                rec = {"size": args.size, "groups": g, "num_heads": cfg.num_heads, "topology": topo, "mesh": mesh_spec, "devices": mesh.size,
                       "batch_size": args.batch_size, "inputs_length": args.inputs_length,
                       "targets_length": args.targets_length, "num_microbatches": m,
                       "remat_policy": args.remat_policy, "scan_layers": cfg.scan_layers}
                # Resumable: a configuration already in --out is not compiled again (and a fitting one ends the
                # microbatch search for its slice).
                prev = [d for d in _done(out) if all(d.get(k) == rec[k] for k in _KEY)]
                if prev:
                    print(f"{args.size} G={g} {topo} microbatches={m}: already in {out}", file=sys.stderr)
                    if prev[-1]["result"]["fits"]:
                        break
                    continue
                rec["machine"] = machine()
                print(f"{args.size} G={g} {topo} {mesh_spec} microbatches={m} ...", file=sys.stderr, flush=True)
                _reset_peak_rss()
                cpu0 = time.process_time()
                r = aot.compile_train(cfg, tc, mesh, chip)
                # CPU seconds of this process: less dependent on the host's load than the wall-clock compile_seconds.
                rec["compile_cpu_seconds"] = round(time.process_time() - cpu0, 1)
                rec["peak_rss_bytes"] = _peak_rss_bytes()
                rec["load_average_1min_end"] = round(__import__("os").getloadavg()[0], 1)
                with out.open("a") as f:
                    f.write(json.dumps({**rec, "result": r}) + "\n")
                total = r["per_device_bytes"]["total"]
                print(f"  fits={r['fits']} total={'?' if total is None else f'{total / 2**30:.1f} GiB'} "
                      f"compile {r['compile_seconds']:.0f} s ({rec['compile_cpu_seconds']:.0f} CPU s)",
                      file=sys.stderr, flush=True)
                if r["fits"]:
                    break


def recost(args) -> None:
    """Records written before the current aot.apply_loop_factor (no `dot_flops_per_device`): trace their step (no
    compile) and scale XLA's raw cost by the loop factor, rewriting --out in place."""
    from gqa_uptrain import aot
    from gqa_uptrain.train import TrainConfig
    out = pathlib.Path(args.out)
    rows = _done(out)
    for d in rows:
        r = d["result"]
        if r["flops_per_device"] is None or "dot_flops_per_device" in r:
            continue
        raw = r.pop("xla_cost_per_device", None) or {"flops": r["flops_per_device"],
                                                     "bytes": r["bytes_accessed_per_device"]}
        for k in ("cost_scaled_by_microbatches", "cost_loop_factor"):
            r.pop(k, None)
        r["flops_per_device"], r["bytes_accessed_per_device"] = raw["flops"], raw["bytes"]
        tc = TrainConfig(model_dir="unused", train_steps=1, batch_size=d["batch_size"],
                         inputs_length=d["inputs_length"], targets_length=d["targets_length"],
                         num_microbatches=d["num_microbatches"], remat_policy=d["remat_policy"])
        cfg = t5_config(d["size"], d["groups"], scan=d["scan_layers"])
        print(f"re-costing {d['size']} G={d['groups']} {d['topology']} m={d['num_microbatches']}", file=sys.stderr)
        mesh = aot.topology_mesh(d["topology"], d["mesh"])
        aot.apply_loop_factor(r, aot.trace_train(cfg, tc, mesh), aot.chip_for(d["topology"]), mesh.size)
        r["recosted"] = True
    out.write_text("".join(json.dumps(d) + "\n" for d in rows))


def _chips(d: dict) -> int:
    return d["devices"]  # v4 / v5p: one megacore device per chip


def _gib(x) -> str:
    return "?" if x is None else f"{x / 2**30:.1f}"


def uptrain_table(path: pathlib.Path) -> str:
    """Every compile (fits or not), then per (size, G, generation) the smallest slice that fits."""
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    gen = lambda d: d["topology"].split(":")[0]  # noqa: E731
    kind = lambda d: ("MQA" if d["groups"] == 1 else "MHA" if d["groups"] == d["num_heads"]  # noqa: E731
                      else f"GQA-{d['groups']}")
    roof = lambda r: "-" if r["roofline_seconds"] is None else f"{r['roofline_seconds']:.1f} ({r['roofline_bound']})"  # noqa: E731

    def mm(d):  # the matmul FLOPs alone at the chip's peak: the compute side of the roofline
        from gqa_uptrain.aot import CHIPS
        f = d["result"].get("dot_flops_per_device")
        return "-" if f is None else f"{f / CHIPS[gen(d)].peak_flops:.1f}"
    out = ["| model | attention | slice (chips) | mesh | microbatches | remat, scan | fits | GiB/chip (of HBM) | "
           "margin GiB | temp GiB | roofline s/step | matmuls s/step | compile s (wall) | compile CPU s | "
           "peak RSS GiB | host load (start, end; nice) |", "|---" * 16 + "|"]
    for d in sorted(rows, key=lambda d: (d["size"], -d["groups"], gen(d), _chips(d), d["num_microbatches"])):
        r, mc = d["result"], d["machine"]
        b = r["per_device_bytes"]
        out.append(f"| {d['size'].upper()} | {kind(d)} | {d['topology']} ({_chips(d)}) | {d['mesh']} | "
                   f"{d['num_microbatches']} | {d['remat_policy']}, {'scan' if d['scan_layers'] else 'unrolled'} | "
                   f"{'yes' if r['fits'] else 'NO'} | {_gib(b['total'])} ({r['hbm_bytes'] / 2**30:.0f}) | "
                   f"{_gib(r['margin_bytes'])} | {'-' if b['temp'] is None else _gib(b['temp'])} | {roof(r)} | {mm(d)} | "
                   f"{r['compile_seconds']:.0f} | {d.get('compile_cpu_seconds', '-')} | "
                   f"{_gib(d.get('peak_rss_bytes'))} | {mc['load_average_1min']}, "
                   f"{d.get('load_average_1min_end', '?')}; {mc.get('nice', '?')} |")
    best: dict = {}
    for d in rows:
        if d["result"]["fits"]:
            key = (d["size"], d["groups"], gen(d))
            if key not in best or (_chips(d), d["num_microbatches"]) < (_chips(best[key]), best[key]["num_microbatches"]):
                best[key] = d
    out += ["", "| model | attention | generation | smallest slice that fits (of those compiled) | mesh | microbatches "
            "| GiB/chip (of HBM) | margin GiB | roofline s/step | matmuls s/step |", "|---" * 10 + "|"]
    for (size, g, gn), d in sorted(best.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2])):
        r = d["result"]
        out.append(f"| {size.upper()} | {kind(d)} | {gn} | {d['topology']} ({_chips(d)} chips) | {d['mesh']} | "
                   f"{d['num_microbatches']} | {_gib(r['per_device_bytes']['total'])} ({r['hbm_bytes'] / 2**30:.0f}) | "
                   f"{_gib(r['margin_bytes'])} | {roof(r)} | {mm(d)} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", default="1,2,4,8,16,32,64")
    p.add_argument("--topology", default="v4:2x2x2")
    p.add_argument("--mesh", default="data=1,fsdp=1,model=8")
    p.add_argument("--inputs_length", type=int, default=None, help="default 2048 (decoding), 512 (--uptrain)")
    p.add_argument("--outputs_length", type=int, default=DECODE_STEPS)
    p.add_argument("--out", default=None, help=f"JSON lines (default docs/bench/aot_table1.jsonl, with --uptrain "
                                                  f"{UPTRAIN_OUT})")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    p.add_argument("--plot", default=None, metavar="PNG", help="with --table: also draw the curve")
    u = p.add_argument_group("uptraining (--uptrain): the train step instead of decoding")
    u.add_argument("--uptrain", action="store_true")
    u.add_argument("--size", default="xxl", choices=["small", "base", "large", "xl", "xxl"])
    u.add_argument("--topologies", default="v4:2x2x4=data=1,fsdp=16,model=1",
                   help="';'-separated TOPOLOGY=MESH entries, e.g. 'v4:2x2x4=fsdp=16;v5p:2x2x2=fsdp=8'")
    u.add_argument("--microbatches", default="1,2,4,8", help="counts tried in order until one fits")
    u.add_argument("--batch_size", type=int, default=2048)
    u.add_argument("--targets_length", type=int, default=114)
    u.add_argument("--remat_policy", default="full")
    u.add_argument("--no_scan", action="store_true", help="unrolled layers (compile time grows with depth)")
    u.add_argument("--recost", action="store_true", help="scale the cost of records in --out written before the "
                   "loop factor (aot.apply_loop_factor) by tracing their step; no compile")
    args = p.parse_args(argv)
    if args.uptrain:
        args.inputs_length = args.inputs_length or 512  # the uptraining setting: 512 / 114
        args.out = args.out or UPTRAIN_OUT
        if args.table:
            print(uptrain_table(pathlib.Path(args.out)))
        elif args.recost:
            recost(args)
        else:
            uptrain(args)
        return 0
    args.out = args.out or "docs/bench/aot_table1.jsonl"
    args.inputs_length = args.inputs_length or 2048
    if args.table:
        print(table(pathlib.Path(args.out)))
        if args.plot:
            plot(pathlib.Path(args.out), args.plot)
        return 0
    from gqa_uptrain import aot
    chip = aot.chip_for(args.topology)
    mesh = aot.topology_mesh(args.topology, args.mesh)
    chips = mesh.devices.size
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        done = {json.loads(l)["groups"] for l in out.read_text().splitlines() if '"result"' in l}

    def log(r):
        print(f"  batch/chip {r['per_chip_batch']}: peak {r['peak_bytes'] / 2**30:.2f} GiB fits={r['fits']} "
              f"({r['measure_seconds']:.0f} s to compile)", file=sys.stderr, flush=True)

    for g in [int(x) for x in args.groups.split(",")]:
        if g in done:
            continue
        print(f"G={g}", file=sys.stderr, flush=True)
        r = largest_batch(xxl(g), mesh, chip, chips, args.inputs_length, args.outputs_length, log)
        rec = {"groups": g, "topology": args.topology, "mesh": args.mesh, "inputs_length": args.inputs_length,
               "outputs_length": args.outputs_length, "paper_seconds": PAPER.get(g), "result": r}
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        t = r["seconds_per_sample_per_chip"]
        print(f"G={g}: batch/chip {r['per_chip_batch']} fits={r['fits']} "
              f"{'-' if t is None else f'{t:.3f}'} s/sample/chip (estimate)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

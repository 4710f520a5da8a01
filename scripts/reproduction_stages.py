#!/usr/bin/env python
"""Stages of scripts/reproduce_paper.sh that are not plain `gqa-uptrain` calls (issue #16).

  machine ROOT                      record the machine (CPU model, cores, RAM) in ROOT/machine.json
  pick-length ORIGINAL [--flat X]   choose the original's length from its validation curve (printed, JSON)
  original ORIGINAL STEP OUT        OUT = a checkpoint dir holding ORIGINAL's step STEP only (the sweeps' source)
  continued ROOT [--original DIR]    evaluate the original run itself continued to N and N + α·N (its saved
                                    pre-training checkpoints) with the sweeps' eval command: ROOT/continued/<step>/
  finetune ROOT ...                 fine-tune uptrained models on gqa_wordnet_gloss and score them, resumably

Why a checkpoint of a long run can stand in for a shorter run: pre-training uses T5's rsqrt schedule with 10k
warm-up steps, i.e. a constant learning rate below step 10,000, so step N of a long run is what a run of length N
would have produced (same data order, same updates). The length is picked where the validation loss has
flattened: the first saved step s at which the least-squares slope of the eval loss over [s, s + window] is
smaller than `flat` nats per 1000 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any

FLAT_NATS_PER_1K = 0.02
WINDOW = 1000


# ------------------------------------------------------------------------------------------------ machine

def machine_info() -> dict:
    """CPU model, logical cores, RAM and JAX platforms of this machine (the decode benchmark's description, which
    reads lscpu, plus /proc/meminfo); 'unknown' where missing."""
    from gqa_uptrain.benchmarks.decode import machine_description
    d = machine_description()
    info = {"cpu": d.get("cpu_model", "unknown"), "cores": d["cpus"], "ram_gib": None,
            "accelerators": sorted({x.split(":")[0].split("(")[0].strip() for x in d.get("jax_devices", [])})}
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def record_machine(root: pathlib.Path) -> dict:
    """Append this machine to ROOT/machine.json unless it is already listed (a resumed run on another machine
    is listed too, so the report can say the results come from more than one)."""
    path = root / "machine.json"
    machines = json.loads(path.read_text()) if path.exists() else []
    me = machine_info()
    if me not in machines:
        machines.append(me)
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(machines, indent=2) + "\n")
    return me


# ------------------------------------------------------------------------------------------ original length

def eval_curve(model_dir: pathlib.Path) -> list[tuple[int, float]]:
    """(step, validation loss) from a training MODEL_DIR's metrics.jsonl, one point per step (the last record
    wins: a resumed run rewrites the steps after its checkpoint)."""
    path = model_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not a training MODEL_DIR with periodic eval")
    pts: dict[int, float] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if r.get("split") == "eval" and "loss" in r:
                pts[int(r["step"])] = float(r["loss"])
    return sorted(pts.items())


def saved_steps(model_dir: pathlib.Path) -> list[int]:
    d = model_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "params").exists()) \
        if d.is_dir() else []


def slope_per_1k(curve: list[tuple[int, float]], start: int, window: int) -> float | None:
    """Least-squares slope of the loss over [start, start + window], in nats per 1000 steps (negative =
    improving); None when the window is not covered by at least 3 eval points reaching its end."""
    pts = [(s, v) for s, v in curve if start <= s <= start + window]
    if len(pts) < 3 or pts[-1][0] < start + window:
        return None
    mx = sum(s for s, _ in pts) / len(pts)
    my = sum(v for _, v in pts) / len(pts)
    num = sum((s - mx) * (v - my) for s, v in pts)
    den = sum((s - mx) ** 2 for s, _ in pts)
    return num / den * 1000


def pick_length(curve: list[tuple[int, float]], candidates: list[int], flat: float = FLAT_NATS_PER_1K,
                window: int = WINDOW) -> dict:
    """The first candidate step whose next `window` steps improve the eval loss by less than `flat` nats per 1000
    steps. Returns {"step", "flattened", "slopes": {step: slope}, "flat", "window", "loss"}; when no candidate
    qualifies, the last candidate with "flattened": False."""
    if not candidates:
        raise ValueError("no saved checkpoints to choose the original's length from")
    slopes = {s: slope_per_1k(curve, s, window) for s in candidates}
    chosen = next((s for s in candidates if slopes[s] is not None and -slopes[s] < flat), None)
    step = chosen if chosen is not None else candidates[-1]
    loss = dict(curve).get(step)
    return {"step": step, "flattened": chosen is not None, "slopes": {str(k): v for k, v in slopes.items()},
            "flat": flat, "window": window, "loss": loss}


def materialize_original(original: pathlib.Path, step: int, out: pathlib.Path) -> None:
    """OUT/config.json + OUT/checkpoints/STEP copied from ORIGINAL (never modified), so every tool sees a run
    whose latest step is STEP. Refuses an OUT made from another step or source."""
    prov = {"source": str(original.absolute()), "step": step}
    if (out / "original.json").exists():
        old = json.loads((out / "original.json").read_text())
        if old != prov:
            raise ValueError(f"{out} was made from {old['source']} step {old['step']}, not {original} step {step}; "
                             "use another ROOT or set ORIGINAL_STEPS to match")
        return
    src = original / "checkpoints" / str(step)
    if not (src / "params").exists():
        raise FileNotFoundError(f"{src} is not a saved checkpoint (saved: {saved_steps(original)})")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "checkpoints").mkdir(parents=True)
    for f in ("config.json", "model.gin", "train_config.json"):
        if (original / f).exists():
            shutil.copyfile(original / f, tmp / f)
    shutil.copytree(src, tmp / "checkpoints" / str(step))
    (tmp / "original.json").write_text(json.dumps(prov, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


# ------------------------------------------------------------------------------- the original, continued

# Sweeps whose α grid decides which continued steps the report compares with (issue #16 part 1 and 2).
SWEEPS = ("groups", "restart_warmup", "restart_carry", "methods", "alpha")


def original_of(root: pathlib.Path, original: pathlib.Path | None = None) -> tuple[pathlib.Path, int]:
    """(the long pre-training MODEL_DIR, the step N the sweeps start from), from ROOT/mha_original/original.json
    (`original` overrides the directory)."""
    prov_path = root / "mha_original" / "original.json"
    if not prov_path.exists():
        raise FileNotFoundError(f"{prov_path} not found: run the original stage first")
    prov = json.loads(prov_path.read_text())
    return (original or pathlib.Path(prov["source"])), int(prov["step"])


def uptrain_steps(alpha: float, original_steps: int) -> int:
    """Uptraining steps for α, by the trainer's own rule (gqa_uptrain.train_state.resolve_length)."""
    from types import SimpleNamespace

    from gqa_uptrain.train_state import resolve_length
    cfg = SimpleNamespace(train_steps=None, original_steps=original_steps, uptrain_fraction=alpha)
    return resolve_length(cfg, None)[0]


def continued_plan(root: pathlib.Path, original: pathlib.Path | None = None) -> dict:
    """What the `continued` stage evaluates: the original at N and, for every α > 0 of the sweeps under ROOT, the
    original run itself continued to N + α·N (no conversion, no optimiser restart) where it saved that step; the
    eval settings (task, splits, flags) are the first sweep's, so the losses compare with the sweeps' exactly.
    Returns {"original", "original_steps", "eval_task", "splits", "eval_args", "sweep", "steps": {step: [α, ...]},
    "unsaved": {step: [α, ...]}}."""
    from gqa_uptrain import sweep
    src, n = original_of(root, original)
    present = [name for name in SWEEPS if (root / name / "sweep.json").exists()]
    if not present:
        raise FileNotFoundError(f"no sweep under {root} (looked for {', '.join(SWEEPS)}): run the groups stage first")
    cfg, _ = sweep._read_spec(root / present[0])
    alphas = sorted({a for name in present for a in sweep._read_spec(root / name)[0].alphas if a > 0})
    have = set(saved_steps(src))
    steps: dict[int, list[float]] = {n: [0.0]} if n in have else {}
    unsaved: dict[int, list[float]] = {} if n in have else {n: [0.0]}
    for a in alphas:
        s = n + uptrain_steps(a, n)
        (steps if s in have else unsaved).setdefault(s, []).append(a)
    return {"original": str(src.absolute()), "original_steps": n, "eval_task": cfg.eval_task,
            "splits": ["validation", *cfg.extra_eval_splits], "eval_args": list(cfg.eval_args), "sweep": present[0],
            "steps": {str(k): v for k, v in sorted(steps.items())},
            "unsaved": {str(k): v for k, v in sorted(unsaved.items())}}


def continued_stages(root: pathlib.Path, plan: dict) -> list:
    """One `gqa-uptrain eval` per (saved step, split), the sweeps' command with `--step`:
    ROOT/continued/<step>/eval.json (validation) and eval_<split>.json."""
    from gqa_uptrain.sweep import Stage
    cli = [sys.executable, "-m", "gqa_uptrain"]
    out = []
    for step in plan["steps"]:
        d = root / "continued" / step
        for split in plan["splits"]:
            f = "eval" if split == "validation" else f"eval_{split}"
            out.append(Stage(f"continued {step} {split}", cli + [
                "eval", "--checkpoint", plan["original"], "--step", step, "--task", plan["eval_task"],
                *(["--split", split] if split != "validation" else []), "--output", str(d / f"{f}.json"),
                *plan["eval_args"]], d / f"{f}.json", d / f"{f}.log"))
    return out


def continued(root: pathlib.Path, original: pathlib.Path | None = None) -> dict:
    """Run the `continued` evals (each skipped once done) and record the plan in ROOT/continued/continued.json.
    Refuses a ROOT whose earlier continued evals used other eval settings or another original."""
    plan = continued_plan(root, original)
    base = root / "continued"
    spec_path = base / "continued.json"
    if spec_path.exists():
        old = json.loads(spec_path.read_text())
        fixed = ("original", "original_steps", "eval_task", "eval_args")
        if any(old.get(k) != plan[k] for k in fixed):
            raise ValueError(f"{base} was evaluated with other settings (see {spec_path}: "
                             + ", ".join(f"{k}={old.get(k)}" for k in fixed) + "); use another ROOT")
    base.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for st in continued_stages(root, plan):
        st.run(env)
    spec_path.write_text(json.dumps(plan, indent=2) + "\n")
    for s, al in plan["unsaved"].items():
        print(f"[continued] step {s} (α={', '.join(f'{a:g}' for a in al)}) is not saved in {plan['original']}; "
              "skipped", flush=True)
    return plan


# --------------------------------------------------------------------------------------------- fine-tuning

FT_MODELS = ("kv8-mean", "kv2-mean", "kv2-svd", "kv1-mean", "kv1-svd")


UPTRAIN_SWEEPS = ("alpha", "methods", "groups")  # where "auto" looks for an uptrained model, in this order


def _uptrained(root: pathlib.Path, sweep_name: str, model: str, alpha: float, seeds: list[int]) -> bool:
    return all((root / sweep_name / "runs" / f"{model}-a{alpha:g}-s{seed}" / "train.done").exists() for seed in seeds)


def resolve_sources(root: pathlib.Path, models: list[str], seeds: list[int], alpha: float, requested: str,
                    earlier: dict[str, str] | None = None) -> dict[str, str]:
    """model -> the sweep under ROOT whose uptrained runs it is fine-tuned from: `requested` for every model, or
    for "auto" the one an earlier call used for it (`earlier`: a resumed stage keeps its models), else the first
    of alpha, methods, groups that has finished it for every seed (later sweeps reuse earlier sweeps' runs with the
    same inputs, so a model is the same model in each), else alpha when ROOT/alpha is a sweep, else groups."""
    if requested != "auto":
        return {m: requested for m in models}
    earlier = earlier or {}
    default = "alpha" if (root / "alpha" / "sweep.json").exists() else "groups"
    return {m: earlier.get(m) or next((s for s in UPTRAIN_SWEEPS if _uptrained(root, s, m, alpha, seeds)), default)
            for m in models}


def _finetune_started(base: pathlib.Path) -> bool:
    """Has any fine-tuning run begun? (A finetune.json alone is a stage that stopped before training, e.g. an
    older version that recorded its settings before finding its uptrained models missing.)"""
    return (base / "runs").is_dir() and any((base / "runs").iterdir())


def finetune_sources(spec: dict[str, Any]) -> dict[str, str]:
    """model -> uptraining sweep of a finetune.json (older ones name one `uptrain_sweep` for all, or none: alpha)."""
    return spec.get("sources") or {m: spec.get("uptrain_sweep", "alpha") for m in spec.get("models", [])}


def _check_growth(base: pathlib.Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """A started stage may gain models and seeds; its other settings, and the source of a model it already
    fine-tuned, must not change (the finished runs would no longer be what the report says)."""
    fixed = ("alpha", "steps", "batch", "eval_examples", "extra")
    changed = [k for k in fixed if old.get(k) != new.get(k)]
    dropped = [str(x) for k in ("models", "seeds") for x in old.get(k, []) if x not in new[k]]
    moved = [f"{m} ({a} -> {new['sources'][m]})" for m, a in finetune_sources(old).items()
             if m in new["sources"] and new["sources"][m] != a]
    if changed or dropped or moved:
        what = "; ".join([*(f"{k} {old.get(k)} -> {new.get(k)}" for k in changed),
                          *([f"drops {', '.join(dropped)}"] if dropped else []),
                          *([f"moves {', '.join(moved)}"] if moved else [])])
        raise ValueError(f"{base} holds a fine-tuning stage with other settings ({what}; see "
                         f"{base / 'finetune.json'}): it can only gain models and seeds; use another ROOT")


def finetune(root: pathlib.Path, models: list[str], seeds: list[int], alpha: float, steps: int, batch: int,
             eval_examples: int, uptrain_sweep: str = "auto", extra: tuple[str, ...] = ()) -> None:
    """Fine-tune each uptrained model ROOT/<sweep>/runs/<model>-a<alpha>-s<seed>/train with
    configs/runs/finetune.gin (constant LR 1e-3, dropout 0.1) and score it with greedy decoding on the
    gqa_wordnet_gloss validation split: ROOT/finetune/runs/<model>-s<seed>/{train/,eval.json,eval_seconds.json}.
    Each stage is skipped once done (gqa_uptrain.sweep.Stage). The sweep of each model: see resolve_sources;
    ROOT/finetune/finetune.json records it. A started stage can be re-run with more models or seeds."""
    from gqa_uptrain.sweep import Stage
    cli = [sys.executable, "-m", "gqa_uptrain"]
    base = root / "finetune"
    spec_path = base / "finetune.json"
    old = json.loads(spec_path.read_text()) if spec_path.exists() and _finetune_started(base) else None
    sources = resolve_sources(root, models, seeds, alpha, uptrain_sweep, finetune_sources(old) if old else None)
    missing = [f"{s}/runs/{m}-a{alpha:g}-s{seed}" for m, s in sources.items() for seed in seeds
               if not _uptrained(root, s, m, alpha, [seed])]
    if missing:  # checked before anything is written
        raise FileNotFoundError(f"{root} has no finished uptraining run {', '.join(missing)}: run that stage "
                                f"first, or choose FT_MODELS / FT_ALPHA from its grid")
    spec = {"models": models, "seeds": seeds, "alpha": alpha, "steps": steps, "batch": batch,
            "eval_examples": eval_examples, "sources": sources, "extra": list(extra)}
    if old is not None:
        _check_growth(base, old, spec)
    base.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    env = dict(os.environ)
    for model in models:
        for seed in seeds:
            src = root / sources[model] / "runs" / f"{model}-a{alpha:g}-s{seed}"
            d = base / "runs" / f"{model}-s{seed}"
            train = Stage("finetune", cli + [
                "train", "--gin_file=runs/finetune.gin", f"--gin.INITIAL_CHECKPOINT={src / 'train'}",
                f"--gin.MODEL_DIR={d / 'train'}", f"--gin.TRAIN_STEPS={steps}", f"--gin.SEED={seed}",
                f"--gin.BATCH_SIZE={batch}", "--gin.INPUTS_LENGTH=64", "--gin.TARGETS_LENGTH=32",
                f"--gin.SAVE_EVERY={steps}", "--gin.EVAL_EVERY=1000000",
                # finetune.gin's own CHECKPOINT_DATASET (False: the gloss task's reader cannot be checkpointed).
                "--no_progress", *extra],
                d / "train.done", d / "train.log")
            ev = Stage("eval", cli + [
                "eval", "--checkpoint", str(d / "train"), "--task", "gqa_wordnet_gloss", "--metrics",
                "loss,rouge,bleu", "--num_examples", str(eval_examples), "--max_input_length", "64",
                "--max_target_length", "32", "--max_decode_length", "32", "--method", "greedy", "--quiet",
                "--output", str(d / "eval.json")], d / "eval.json", d / "eval.log")
            train.run(env)
            if not ev.done.exists():
                t0 = time.time()
                ev.run(env)
                (d / "eval_seconds.json").write_text(json.dumps(
                    {"seconds": time.time() - t0, "examples": eval_examples,
                     "note": "wall time of the whole eval command (start-up, loss and greedy decoding)"}) + "\n")
            print(f"[finetune] {model} seed {seed} done", flush=True)


# --------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("machine")
    m.add_argument("root", type=pathlib.Path)
    p = sub.add_parser("pick-length")
    p.add_argument("original", type=pathlib.Path)
    p.add_argument("--flat", type=float, default=FLAT_NATS_PER_1K, help="nats per 1000 steps (default %(default)s)")
    p.add_argument("--window", type=int, default=WINDOW, help="steps after the candidate (default %(default)s)")
    p.add_argument("--output", type=pathlib.Path, default=None, help="also write the choice as JSON here")
    o = sub.add_parser("original")
    o.add_argument("original", type=pathlib.Path)
    o.add_argument("step", type=int)
    o.add_argument("out", type=pathlib.Path)
    c = sub.add_parser("continued", help="evaluate the original run continued to N + α·N (issue #16 part 1)")
    c.add_argument("root", type=pathlib.Path)
    c.add_argument("--original", type=pathlib.Path, default=None,
                   help="the long pre-training MODEL_DIR (default: ROOT/mha_original/original.json's source)")
    f = sub.add_parser("finetune")
    f.add_argument("root", type=pathlib.Path)
    f.add_argument("--models", default=",".join(FT_MODELS))
    f.add_argument("--seeds", default="0,1,2")
    f.add_argument("--alpha", type=float, default=0.05)
    f.add_argument("--steps", type=int, default=300)
    f.add_argument("--batch", type=int, default=16)
    f.add_argument("--eval_examples", type=int, default=200)
    f.add_argument("--uptrain_sweep", default="auto",
                   help="sweep under ROOT whose uptrained runs are fine-tuned: alpha, methods, groups, or auto "
                        "(default: per model, the one an earlier call used, else the first of alpha, methods, groups "
                        "that finished it)")
    f.add_argument("--extra", action="append", default=[], help="more train flags (repeatable)")
    args = ap.parse_args(argv)
    if args.cmd == "machine":
        print(json.dumps(record_machine(args.root)))
    elif args.cmd == "pick-length":
        choice = pick_length(eval_curve(args.original), saved_steps(args.original), args.flat, args.window)
        choice["source"] = str(args.original.absolute())
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(choice, indent=2) + "\n")
        print(choice["step"])
    elif args.cmd == "original":
        materialize_original(args.original, args.step, args.out)
    elif args.cmd == "continued":
        try:
            continued(args.root, args.original)
        except (FileNotFoundError, ValueError) as e:  # bad ROOT: one line, not a traceback
            print(f"error: {e}", file=sys.stderr)
            return 1
    else:
        try:
            finetune(args.root, [x for x in args.models.split(",") if x], _ints(args.seeds), args.alpha, args.steps,
                     args.batch, args.eval_examples, args.uptrain_sweep, tuple(args.extra))
        except (FileNotFoundError, ValueError) as e:  # missing models or a changed ROOT: one line
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.replace(",", " ").split()]


if __name__ == "__main__":
    sys.exit(main())

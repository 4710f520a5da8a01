#!/usr/bin/env python
"""Write docs/reproduction.md from the stages of scripts/reproduce_paper.sh.

Every number and every "holds / does not hold" below is computed from the results under ROOT; nothing is typed
in, and the setup (seeds, machine, lengths, batch sizes) is read from the runs. A difference between two settings
is called real only when it exceeds the sum of their sample standard deviations over seeds; otherwise it is
reported as within the spread (≈). Sections whose stage has not run are left out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from reproduction_stages import eval_curve, pick_length, saved_steps, slope_per_1k  # noqa: E402

from gqa_uptrain import sweep  # noqa: E402

VAL = "eval.metrics.loss"
DOCS = "eval_python_docs.metrics.loss"
UNIT = "nats/target token"
AXIS = {VAL: f"validation loss ({UNIT})", DOCS: f"python_docs held-out loss ({UNIT})"}
SPLIT_NAME = {VAL: "validation split", DOCS: "second held-out set (python_docs)"}
TOL = 0.01  # "within 0.01 nats of the control" (issue #16 part 2)
METHOD_ORDER = ["mean", "first", "random", "align", "svd"]


@dataclasses.dataclass
class Sweep:
    name: str
    root: pathlib.Path
    rows: list[dict]
    num_heads: int
    original_steps: int | None
    cfg: sweep.SweepConfig

    def summary(self, metric: str = VAL) -> dict[tuple, dict]:
        return {(x["kv_heads"], x["method"], x["alpha"]): x for x in sweep.summarise(self.rows, metric)}

    @property
    def seeds(self) -> list[int]:
        return sorted({int(r["seed"]) for r in self.rows})


def load_sweep(root: pathlib.Path, name: str) -> Sweep | None:
    d = root / name
    if not (d / "sweep.json").exists():
        return None
    rows = sweep.aggregate(d, VAL)
    cfg, spec = sweep._read_spec(d)
    return Sweep(name, d, rows, spec["num_heads"], spec["original_steps"], cfg)


# ------------------------------------------------------------------------------------------------ statistics

def fmt(x: dict | None) -> str:
    return "–" if x is None else f"{x['mean']:.4f} ± {x['std']:.4f} (n={x['n']})"


def compare(a: dict, b: dict) -> str:
    """'<' / '>' when a is really lower/higher than b, '≈' when the difference is within the summed spreads."""
    if abs(a["mean"] - b["mean"]) <= a["std"] + b["std"]:
        return "≈"
    return "<" if a["mean"] < b["mean"] else ">"


def gap(s: dict, key: tuple, h: int) -> dict | None:
    """Loss difference to the MHA control at the same α: {'mean', 'spread' (sum of the two stds)}."""
    ctrl = s.get((h, "mean", key[2]))
    if key not in s or ctrl is None:
        return None
    return {"mean": s[key]["mean"] - ctrl["mean"], "spread": s[key]["std"] + ctrl["std"]}


def fmt_gap(g: dict | None) -> str:
    return "–" if g is None else f"{g['mean']:+.4f} ± {g['spread']:.4f}"


def first_alpha_within(s: dict, kv: int, method: str, h: int, tol: float = TOL) -> float | None:
    """Smallest α whose mean gap to the control at the same α is at most `tol` nats; None = never."""
    for a in sorted({k[2] for k in s if k[0] == kv and k[1] == method}):
        g = gap(s, (kv, method, a), h)
        if g is not None and g["mean"] <= tol:
            return a
    return None


def name(kv: int, h: int) -> str:
    return sweep.attention_kind(kv, h)


# ------------------------------------------------------------------------------------------------- plotting

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: pathlib.Path, written: list[pathlib.Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    written.append(path)


def plot_gaps_vs_alpha(series: dict[str, list[tuple[float, dict]]], title: str, path: pathlib.Path,
                       written: list, log_x: bool = False, tol: float | None = None, symlog_y: bool = False) -> None:
    """Gap to the MHA control against α (α > 0 only: the conversion-only gaps are orders of magnitude larger and
    would flatten the differences this plot is about; they are in the tables), error bars = summed seed spreads."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in series.items():
        pts = [(a, g) for a, g in pts if a > 0 and g is not None]
        if pts:
            ax.errorbar([a for a, _ in pts], [g["mean"] for _, g in pts], yerr=[g["spread"] for _, g in pts],
                        fmt="o-", capsize=3, label=label)
    ax.axhline(0.0, color="black", lw=0.8)
    if tol is not None:
        ax.axhline(tol, color="grey", ls="--", lw=0.8, label=f"control + {tol:g} nats")
    if log_x:
        ax.set_xscale("log")
    if symlog_y:  # linear within ±0.01 nats (the differences that matter), logarithmic beyond
        ax.set_yscale("symlog", linthresh=TOL)
    ax.set(xlabel="uptraining fraction α (uptraining steps / pre-training steps)",
           ylabel=f"loss gap to MHA control ({UNIT})", title=title)
    ax.legend(fontsize=7)
    save(fig, path, written)


# --------------------------------------------------------------------------------------------------- sections

def setup_section(root: pathlib.Path, original: pathlib.Path | None, sweeps: list[Sweep], seconds: dict) -> list[str]:
    machines = json.loads((root / "machine.json").read_text()) if (root / "machine.json").exists() else []
    mach = "; ".join(f"{m['cpu']}, {m['cores']} logical cores, {m['ram_gib']} GiB RAM"
                     + (f", {'/'.join(m['accelerators'])}" if m.get("accelerators") else "") for m in machines) \
        or "not recorded"
    src = root / "mha_original"
    prov = json.loads((src / "original.json").read_text()) if (src / "original.json").exists() else {}
    cfg = json.loads((src / "config.json").read_text()) if (src / "config.json").exists() else {}
    pre = json.loads((src / "train_config.json").read_text()) if (src / "train_config.json").exists() else {}
    seeds = sorted({s for sw in sweeps for s in sw.seeds})
    up = _first_train_config(sweeps)
    n_eval = _eval_examples(sweeps)
    total = sum(seconds.values())
    L = ["# Reproducing the GQA paper's ablations at CPU scale", "",
         "Generated by `scripts/reproduce_paper.sh` → `scripts/reproduction_report.py` from the results (nothing "
         f"typed in by hand). Machine (from the run's `machine.json`): {mach}."
         + (f" Wall time of the stages timed here: {total / 60:.0f} min ("
            + ", ".join(f"{k} {v / 60:.0f}" for k, v in seconds.items()) + " min)." if seconds else ""), "",
         "## Setup", ""]
    if cfg:
        L.append(f"- **Original checkpoint:** T5.1.1 architecture at toy width (d_model {cfg['d_model']}, "
                 f"{cfg['num_heads']} heads × {cfg['head_dim']}, d_ff {cfg['d_ff']}, {cfg['num_encoder_layers']}+"
                 f"{cfg['num_decoder_layers']} layers, vocab {cfg['vocab_size']}), pre-trained from scratch with seed "
                 f"{pre.get('seed', '?')} on span corruption of the bundled corpus "
                 f"(batch {pre.get('batch_size', '?')}, "
                 f"inputs {pre.get('inputs_length', '?')} / targets {pre.get('targets_length', '?')} tokens, "
                 f"Adafactor, rsqrt schedule); step {prov.get('step', '?')} of a run of "
                 f"{pre.get('resolved_train_steps', '?')} steps is the original (length chosen below).")
    L.append("- **Conversion:** decoder self- and cross-attention to G KV heads; encoder stays MHA (the paper's "
             "setup).")
    if up:
        L.append(f"- **Uptraining:** α × {up.get('resolved_original_steps', '?')} steps with the pre-training "
                 f"recipe (batch {up.get('batch_size')}, inputs {up.get('inputs_length')} / targets "
                 f"{up.get('targets_length')}), fresh Adafactor state, schedule continued from the original's step. "
                 "The MHA control (G = H) is 'converted' (identity) and uptrained exactly like the others, so every "
                 "gap is measured against a model that went through the same optimiser restart.")
    L += [f"- **Evaluation:** span-corruption loss ({UNIT}) on the first {n_eval} examples, noise fixed, of two "
          "held-out sets: the corpus validation split and a second set of English text outside the corpus "
          "(Python reference-manual prose, split `python_docs`; `gqa_uptrain/assets/corpus/README.md`).",
          f"- **Seeds:** {', '.join(map(str, seeds)) or '–'} (read from the runs): each changes the uptraining data "
          "order and noise and the `random` initialisation; α = 0 rows are deterministic except `random` and use "
          "one seed. Values are mean ± sample standard deviation over seeds.",
          "- **Rule:** a difference is called real only when it exceeds the sum of the two standard deviations; "
          "otherwise it is 'within the spread' (≈). Gaps are given as mean ± that sum."]
    return L


def _first_train_config(sweeps: list[Sweep]) -> dict:
    for sw in sweeps:
        for p in sorted((sw.root / "runs").glob("*/train/train_config.json")):
            return json.loads(p.read_text())
    return {}


def _eval_examples(sweeps: list[Sweep]) -> str:
    ns = set()
    for sw in sweeps:
        for p in (sw.root / "runs").glob("*/eval*.json"):
            ns.add(json.loads(p.read_text()).get("num_examples"))
    return "/".join(str(n) for n in sorted(x for x in ns if x is not None)) or "?"


def pretrain_section(original: pathlib.Path | None, root: pathlib.Path, assets: pathlib.Path,
                     written: list) -> list[str]:
    if original is None or not (original / "metrics.jsonl").exists():
        return []
    curve = eval_curve(original)
    if not curve:
        return []
    choice_path = root / "length.json"
    rule = json.loads(choice_path.read_text()) if choice_path.exists() else {}
    flat, window = rule.get("flat", 0.02), rule.get("window", 1000)
    choice = pick_length(curve, saved_steps(original), flat, window)
    used = json.loads((root / "mha_original" / "original.json").read_text())["step"] \
        if (root / "mha_original" / "original.json").exists() else None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([s for s, _ in curve], [v for _, v in curve], "o-", ms=3, label="validation loss")
    if used is not None:
        ax.axvline(used, color="red", ls="--", lw=1, label=f"original used: step {used}")
    ax.set(xlabel="pre-training step", ylabel=AXIS[VAL], title="pre-training curve of the original")
    ax.legend()
    save(fig, assets / "pretrain_curve.png", written)
    L = ["", "## Length of the original (pre-training curve)", "",
         f"Validation loss every {curve[1][0] - curve[0][0] if len(curve) > 1 else '?'} steps up to step "
         f"{curve[-1][0]} ({curve[0][1]:.4f} at step {curve[0][0]}, {curve[-1][1]:.4f} at step {curve[-1][0]}). "
         f"Rule: the first saved step whose next {window} steps improve the loss by less than {flat:g} nats per 1000 "
         "steps (least-squares slope over the window). The schedule is rsqrt with 10k warm-up, i.e. a constant "
         "learning rate up to step 10,000, so a checkpoint at step N of this run is what a run of length N gives.",
         "", "| saved step | loss | slope over the next window (nats / 1000 steps) |", "|---|---|---|"]
    losses = dict(curve)
    for s in saved_steps(original):
        sl = slope_per_1k(curve, s, window)
        L.append(f"| {s} | {losses[s]:.4f} | {'–' if sl is None else f'{sl:+.4f}'} |" if s in losses else
                 f"| {s} | – | – |")
    if choice["flattened"]:
        L.append(f"\nThe loss flattens at step {choice['step']} (slope {choice['slopes'][str(choice['step'])]:+.4f} "
                 f"> −{flat:g}).")
    else:
        L.append(f"\nThe loss has not flattened by this rule within the run: the last saved step "
                 f"{choice['step']} is the longest original available.")
    if used is not None:
        L.append(f"The sweeps use step {used}" + (" (the rule's choice)." if used == choice["step"] else
                                                  f", set by ORIGINAL_STEPS instead of the rule's {choice['step']}."))
    L.append("\n![pre-training curve](reproduction/pretrain_curve.png)")
    return L


def groups_section(g: Sweep, metric: str = VAL) -> list[str]:
    s, h = g.summary(metric), g.num_heads
    alphas = sorted({k[2] for k in s})
    kinds = sorted({k[0] for k in s}, reverse=True)
    bench = {kv: sweep.read_bench(g.root, kv) for kv in kinds}
    L = ["", f"## Groups × uptraining fraction (mean pooling), {SPLIT_NAME[metric]}", "",
         "| model | " + " | ".join(f"loss α={a:g}" for a in alphas)
         + " | time/sample (ms) | decode step (ms) | KV cache vs MHA |", "|---|" + "---|" * (len(alphas) + 3)]
    for kv in kinds:
        t, st = bench[kv].get("time_per_sample_s"), bench[kv].get("incremental_step_s")
        L.append(f"| {name(kv, h)} | " + " | ".join(fmt(s.get((kv, "mean", a))) for a in alphas)
                 + f" | {'–' if t is None else f'{t * 1e3:.1f}'} | {'–' if st is None else f'{st * 1e3:.2f}'}"
                 f" | {kv / h:.3g}× |")
    L += ["", "Gap to the MHA control at the same α (positive = worse than MHA; ± the summed seed spreads):", "",
          "| model | " + " | ".join(f"α={a:g}" for a in alphas) + " |", "|---|" + "---|" * len(alphas)]
    for kv in kinds:
        if kv != h:
            L.append(f"| {name(kv, h)} | " + " | ".join(fmt_gap(gap(s, (kv, "mean", a), h)) for a in alphas) + " |")
    return L


def findings(g: Sweep | None, m: Sweep | None) -> list[str]:
    """The paper's orderings, on the validation split (as in the earlier report)."""
    L = ["", "## Which of the paper's findings hold here (validation split)", ""]
    if m is not None:
        ms = m.summary()
        up = max((k[2] for k in ms), default=None)
        if up is not None and all((1, x, up) in ms for x in ("mean", "first", "random")):
            a, b, c = (ms[(1, x, up)] for x in ("mean", "first", "random"))
            r1, r2 = compare(a, b), compare(b, c)
            holds = r1 == "<" and r2 == "<"
            L.append(f"- **mean > first > random (MQA, α={up:g}):** mean {a['mean']:.4f} {r1} first {b['mean']:.4f} "
                     f"{r2} random {c['mean']:.4f} → {'holds' if holds else 'does not hold as a strict ordering'}.")
            for extra in ("align", "svd"):
                if (1, extra, up) in ms:
                    e = ms[(1, extra, up)]
                    L.append(f"- **{extra} vs mean (MQA, α={up:g}):** {e['mean']:.4f} {compare(e, a)} "
                             f"{a['mean']:.4f}.")
    if g is not None:
        s, h = g.summary(), g.num_heads
        kinds = sorted({k[0] for k in s}, reverse=True)
        gqa = [kv for kv in kinds if 1 < kv < h]
        alphas = sorted({k[2] for k in s})
        for a in [x for x in alphas if x > 0]:
            if gqa and all((kv, "mean", a) in s for kv in (1, h, gqa[0])):
                q = gqa[0]
                G_, M_, H_ = s[(q, "mean", a)], s[(1, "mean", a)], s[(h, "mean", a)]
                L.append(f"- **Uptrained GQA between MQA and MHA (α={a:g}):** {name(q, h)} {G_['mean']:.4f}, MQA "
                         f"{M_['mean']:.4f}, MHA control {H_['mean']:.4f}; {name(q, h)} vs MQA: {compare(G_, M_)}, "
                         f"vs MHA: {compare(G_, H_)}.")
        top = max(alphas)
        if (h, "mean", 0.0) in s and (h, "mean", top) in s:
            c0, c1 = s[(h, "mean", 0.0)], s[(h, "mean", top)]
            L.append(f"- **The MHA control moves:** {c1['mean'] - c0['mean']:+.4f} from α=0 to α={top:g} "
                     f"({'real' if compare(c1, c0) != '≈' else 'within the spread'}; optimiser restart on a trained "
                     "model), which is why every gap is taken against the control at the same α.")
        bench = {kv: sweep.read_bench(g.root, kv).get("incremental_step_s") for kv in kinds}
        if gqa and all(bench.values()):
            frac = (bench[h] - bench[gqa[0]]) / max(bench[h] - bench[1], 1e-12)
            L.append(f"- **GQA speed close to MQA (decode step):** MHA {bench[h] * 1e3:.2f} ms, {name(gqa[0], h)} "
                     f"{bench[gqa[0]] * 1e3:.2f} ms, MQA {bench[1] * 1e3:.2f} ms; {name(gqa[0], h)} gets "
                     f"{frac * 100:.0f}% of MQA's saving → {'holds' if frac >= 0.5 else 'does not hold'}.")
    return L


def methods_section(m: Sweep, g: Sweep | None, metric: str = VAL) -> list[str]:
    s = m.summary(metric)
    ctrl = g.summary(metric) if g is not None else {}
    alphas = sorted({k[2] for k in s})
    methods = sorted({k[1] for k in s}, key=lambda x: METHOD_ORDER.index(x) if x in METHOD_ORDER else 99)
    h = m.num_heads
    L = ["", f"## Conversion method for MQA ({SPLIT_NAME[metric]}; `align` and `svd` are beyond the paper)", "",
         "| method | " + " | ".join(f"loss α={a:g}" for a in alphas) + " | " +
         " | ".join(f"gap α={a:g}" for a in alphas) + " |", "|---|" + "---|" * (2 * len(alphas))]
    both = {**ctrl, **s}
    for meth in methods:
        L.append(f"| {meth} | " + " | ".join(fmt(s.get((1, meth, a))) for a in alphas) + " | "
                 + " | ".join(fmt_gap(gap(both, (1, meth, a), h)) for a in alphas) + " |")
    L.append("| MHA control | " + " | ".join(fmt(ctrl.get((h, "mean", a))) for a in alphas) + " |"
             + " |" * len(alphas))
    return L


def alpha_section(al: Sweep, assets: pathlib.Path, written: list) -> list[str]:
    s, h = al.summary(), al.num_heads
    alphas = sorted({k[2] for k in s})
    cells = sorted({(k[0], k[1]) for k in s if k[0] != h}, key=lambda c: (c[0], METHOD_ORDER.index(c[1])
                                                                            if c[1] in METHOD_ORDER else 99))
    L = ["", "## How much uptraining does each method need? (validation split)", "",
         "Gap to the MHA control at the same α (± summed seed spreads), and the smallest α at which the mean gap is "
         f"at most {TOL:g} nats ('never' if no α in the grid reaches it).", "",
         "| model | method | " + " | ".join(f"α={a:g}" for a in alphas) + f" | smallest α within {TOL:g} |",
         "|---|---|" + "---|" * (len(alphas) + 1)]
    within = {}
    for kv, meth in cells:
        a_ok = first_alpha_within(s, kv, meth, h)
        within[(kv, meth)] = a_ok
        L.append(f"| {name(kv, h)} | {meth} | " + " | ".join(fmt_gap(gap(s, (kv, meth, a), h)) for a in alphas)
                 + f" | {'never' if a_ok is None else f'{a_ok:g}'} |")
    L.append("")
    for kv in sorted({c[0] for c in cells}):
        need = {meth: within[(kv, meth)] for (k, meth) in cells if k == kv}
        base = need.get("mean")
        for meth, a in need.items():
            if meth == "mean":
                continue
            if a is not None and base is not None:
                L.append(f"- **{name(kv, h)}, {meth} vs mean:** within {TOL:g} nats of the control at α = {a:g} vs "
                         f"{base:g} ({a / base:.2g}× mean's uptraining)." if base > 0 else
                         f"- **{name(kv, h)}, {meth} vs mean:** α = {a:g} vs {base:g}.")
            else:
                L.append(f"- **{name(kv, h)}, {meth} vs mean:** {meth} "
                         f"{'never' if a is None else f'at α = {a:g}'}, mean "
                         f"{'never' if base is None else f'at α = {base:g}'} (within this grid).")
        for meth in need:
            pts = [s.get((kv, meth, a)) for a in alphas]
            if pts[0] is None:
                continue
            worse = [a for a, p in zip(alphas, pts) if p is not None and a > 0 and compare(p, pts[0]) == ">"]
            if worse:
                L.append(f"- **{name(kv, h)}, {meth}: uptraining first makes it worse:** loss above its α = 0 value "
                         f"({pts[0]['mean']:.4f}) beyond the spread at α = {', '.join(f'{a:g}' for a in worse)}.")
    for kv in sorted({c[0] for c in cells}):
        series = {meth: [(a, gap(s, (kv, meth, a), h)) for a in alphas] for (k, meth) in cells if k == kv}
        plot_gaps_vs_alpha(series, f"{name(kv, h)}: gap to MHA control vs α",
                           assets / f"alpha_gap_kv{kv}.png", written, log_x=True, tol=TOL, symlog_y=True)
        L.append(f"\n![{name(kv, h)} gap vs α](reproduction/alpha_gap_kv{kv}.png)")
    return L


def agreement(a_sum: dict, b_sum: dict, h: int, tag: str) -> tuple[int, int, int, list[str]]:
    """Pairs of settings at the same α whose losses differ beyond the spread in `a_sum`: (how many, how many have
    the same order in `b_sum`, how many are real there too, the ones that reverse beyond the spread there)."""
    pairs = agree = real_both = 0
    flips = []
    keys = sorted(k for k in a_sum if k in b_sum)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if a[2] != b[2]:
                continue
            ca = compare(a_sum[a], a_sum[b])
            if ca == "≈":
                continue
            pairs += 1
            cb = compare(b_sum[a], b_sum[b])
            agree += (b_sum[a]["mean"] < b_sum[b]["mean"]) == (ca == "<")
            if cb == ca:
                real_both += 1
            elif cb != "≈":
                flips.append(f"{tag}: {name(a[0], h)} {a[1]} vs {name(b[0], h)} {b[1]} at α={a[2]:g}")
    return pairs, agree, real_both, flips


def agreement_section(title: str, what: str, pairs_of: list[tuple[dict, dict, int, str]]) -> list[str]:
    pairs = agree = real_both = 0
    flips: list[str] = []
    for a_sum, b_sum, h, tag in pairs_of:
        n, g, r, f = agreement(a_sum, b_sum, h, tag)
        pairs, agree, real_both, flips = pairs + n, agree + g, real_both + r, flips + f
    if not pairs:
        return []
    return ["", f"## {title}", "",
            f"Of the {pairs} pairs of settings (same sweep, same α) whose validation-split losses differ beyond the "
            f"spread, {agree} have the same order {what} and {real_both} are also real there; {len(flips)} reverse "
            "beyond the spread" + (": " + "; ".join(flips[:10]) + "." if flips else ".")]


def heldout_section(sweeps: list[Sweep]) -> list[str]:
    """Does each real difference on the validation split have the same sign on the second held-out set?"""
    return agreement_section("Second held-out set (python_docs)", "on python_docs",
                             [(sw.summary(VAL), sw.summary(DOCS), sw.num_heads, sw.name) for sw in sweeps])


def other_seed_section(sweeps: list[Sweep], other_root: pathlib.Path) -> list[str]:
    """Do the conclusions survive a different pre-training seed (the same stages run under another ROOT)?"""
    pairs_of = []
    for sw in sweeps:
        o = load_sweep(other_root, sw.name)
        if o is not None:
            pairs_of.append((sw.summary(VAL), o.summary(VAL), sw.num_heads, sw.name))
    seed = json.loads((other_root / "mha_original" / "train_config.json").read_text()).get("seed", "?") \
        if (other_root / "mha_original" / "train_config.json").exists() else "?"
    return agreement_section(f"Another pre-training seed ({seed}, `{other_root}`)",
                             "with the other original", pairs_of)


def finetune_section(root: pathlib.Path, g: Sweep | None, al: Sweep | None, assets: pathlib.Path,
                     written: list) -> list[str]:
    base = root / "finetune"
    if not (base / "finetune.json").exists():
        return []
    spec = json.loads((base / "finetune.json").read_text())
    h = (al or g).num_heads if (al or g) else 8
    metrics = ["rouge1", "rouge2", "rougeL", "bleu"]
    rows: dict[str, list[dict]] = {}
    for m in spec["models"]:
        for seed in spec["seeds"]:
            d = base / "runs" / f"{m}-s{seed}"
            if (d / "eval.json").exists():
                r = json.loads((d / "eval.json").read_text())["metrics"]
                t = json.loads((d / "eval_seconds.json").read_text()) if (d / "eval_seconds.json").exists() else {}
                r["wall_ms_per_example"] = 1e3 * t["seconds"] / t["examples"] if t else float("nan")
                rows.setdefault(m, []).append(r)
    if not rows:
        return []
    import statistics

    def ms(vals):
        return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "n": len(vals)}
    stats = {m: {k: ms([r[k] for r in rs if k in r]) for k in metrics + ["wall_ms_per_example"]}
             for m, rs in rows.items()}
    up = (al or g).summary() if (al or g) else {}
    label = {}
    for m in rows:
        kv, meth = m.split("-")
        label[m] = f"{name(int(kv[2:]), h)} {meth}" if int(kv[2:]) != h else "MHA control"
    bench_root = (g or al).root if (g or al) else None
    L = ["", "## After fine-tuning (WordNet gloss task)", "",
         f"Each model uptrained at α = {spec['alpha']:g} is fine-tuned {spec['steps']} steps on `gqa_wordnet_gloss` "
         f"(configs/runs/finetune.gin: constant learning rate 1e-3, dropout 0.1; batch {spec['batch']}, inputs 64 / "
         f"targets 32) and scored on the first {spec['eval_examples']} validation examples with greedy decoding "
         f"(ROUGE F-measure and BLEU, 0-100). Seeds {', '.join(map(str, spec['seeds']))} (uptraining and "
         "fine-tuning seed). *time/sample*: the decode benchmark of this model shape (as in the groups table); "
         "*eval wall/example*: the whole eval command (start-up included) divided by the examples.", "",
         "| model | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU | time/sample (ms) | eval wall/example (ms) | "
         f"pre-training loss α={spec['alpha']:g} |", "|---|---|---|---|---|---|---|---|"]
    for m in rows:
        kv = int(m.split("-")[0][2:])
        t = sweep.read_bench(bench_root, kv).get("time_per_sample_s") if bench_root else None
        pl = up.get((kv, m.split("-")[1] if kv != h else "mean", spec["alpha"]))
        L.append(f"| {label[m]} | " + " | ".join(f"{stats[m][k]['mean']:.2f} ± {stats[m][k]['std']:.2f}"
                                                for k in metrics)
                 + f" | {'–' if t is None else f'{t * 1e3:.1f}'} | {stats[m]['wall_ms_per_example']['mean']:.1f} | "
                 f"{fmt(pl)} |")
    # Ordering: pairs real on pre-training loss vs the same pair on ROUGE-L (higher is better).
    same = diff = unclear = 0
    notes = []
    models = list(rows)
    for i, a in enumerate(models):
        for b in models[i + 1:]:
            ka, kb = [(int(x.split("-")[0][2:]), x.split("-")[1]) for x in (a, b)]
            pa = up.get((ka[0], ka[1] if ka[0] != h else "mean", spec["alpha"]))
            pb = up.get((kb[0], kb[1] if kb[0] != h else "mean", spec["alpha"]))
            if pa is None or pb is None:
                continue
            cl = compare(pa, pb)
            ra, rb = stats[a]["rougeL"], stats[b]["rougeL"]
            cr = compare({"mean": -ra["mean"], "std": ra["std"]}, {"mean": -rb["mean"], "std": rb["std"]})
            if cl == "≈" or cr == "≈":
                unclear += 1
            elif cl == cr:
                same += 1
            else:
                diff += 1
                notes.append(f"{label[a]} vs {label[b]}")
    L += ["", f"**Does the fine-tuned ordering match the pre-training-loss ordering?** Of the model pairs, {same} "
          f"are ordered the same way by pre-training loss and by ROUGE-L with both differences real, {diff} are "
          f"ordered oppositely with both real" + (f" ({'; '.join(notes)})" if notes else "")
          + f", and {unclear} are within the spread on at least one of the two."]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = range(len(models))
    ax.errorbar(list(xs), [stats[m]["rougeL"]["mean"] for m in models],
                yerr=[stats[m]["rougeL"]["std"] for m in models], fmt="o", capsize=3)
    ax.set_xticks(list(xs), [label[m] for m in models], rotation=20)
    ax.set(ylabel="ROUGE-L F-measure (0-100)", title="after fine-tuning on WordNet glosses")
    save(fig, assets / "finetune_rougeL.png", written)
    L.append("\n![fine-tuning ROUGE-L](reproduction/finetune_rougeL.png)")
    return L


def restart_section(arms: dict[str, Sweep], assets: pathlib.Path, written: list) -> list[str]:
    """Issue #16 part 1: control drift and GQA/MQA gaps for each optimiser-restart arm."""
    if len(arms) < 2:
        return ["", "## Optimiser restart (issue #16 part 1)", "",
                "Only the fresh-state arm (the groups sweep) has run. `scripts/reproduce_paper.sh` runs the warm-up "
                "arm once `OptimizerConfig.restart_warmup_steps` exists and the carried-state arm once `gqa-uptrain "
                "convert --carry-optimizer-state` does (configs/sweeps/repro_restart_*.gin)."] if arms else []
    h = next(iter(arms.values())).num_heads
    alphas = sorted({k[2] for sw in arms.values() for k in sw.summary() if k[2] > 0})
    L = ["", "## Optimiser restart (issue #16 part 1)", "",
         "Control drift = MHA control at α minus the original MHA model (α = 0); gaps = GQA/MQA minus the control "
         "at the same α (± summed spreads). Goal: the control moves by less than the seed spread, and the converted "
         "models land closer to it.", "",
         "| arm | " + " | ".join(f"control drift α={a:g}" for a in alphas) + " | "
         + " | ".join(f"{name(kv, h)} gap α={a:g}" for kv in (2, 1) for a in alphas) + " |",
         "|---|" + "---|" * (3 * len(alphas))]
    for arm, sw in arms.items():
        s = sw.summary()
        drift = []
        for a in alphas:
            c0, c1 = s.get((h, "mean", 0.0)), s.get((h, "mean", a))
            drift.append("–" if c0 is None or c1 is None else
                         f"{c1['mean'] - c0['mean']:+.4f} ± {c1['std'] + c0['std']:.4f} "
                         f"({'within spread' if compare(c1, c0) == '≈' else 'real'})")
        L.append(f"| {arm} | " + " | ".join(drift) + " | "
                 + " | ".join(fmt_gap(gap(s, (kv, "mean", a), h)) for kv in (2, 1) for a in alphas) + " |")
    fresh = arms.get("fresh")
    if fresh is not None:
        fs = fresh.summary()
        for arm, sw in arms.items():
            if arm == "fresh":
                continue
            s = sw.summary()
            for kv in (2, 1):
                for a in alphas:
                    x, y = s.get((kv, "mean", a)), fs.get((kv, "mean", a))
                    if x and y:
                        L.append(f"- {arm} vs fresh, {name(kv, h)} α={a:g}: loss {x['mean']:.4f} {compare(x, y)} "
                                 f"{y['mean']:.4f}.")
    series = {f"{arm} {name(kv, h)}": [(a, gap(sw.summary(), (kv, "mean", a), h)) for a in alphas]
              for arm, sw in arms.items() for kv in (2, 1)}
    plot_gaps_vs_alpha(series, "gap to MHA control per optimiser-restart arm", assets / "restart_gaps.png", written)
    L.append("\n![restart gaps](reproduction/restart_gaps.png)")
    return L


def gap_plots(g: Sweep | None, m: Sweep | None, assets: pathlib.Path, written: list) -> list[str]:
    L = []
    for metric in (VAL, DOCS):
        if g is not None and any(metric in r for r in g.rows):
            s, h = g.summary(metric), g.num_heads
            alphas = sorted({k[2] for k in s})
            series = {name(kv, h): [(a, gap(s, (kv, "mean", a), h)) for a in alphas]
                      for kv in sorted({k[0] for k in s}) if kv != h}
            tag = "val" if metric == VAL else "docs"
            plot_gaps_vs_alpha(series, f"groups: gap to MHA control ({SPLIT_NAME[metric]})",
                               assets / f"groups_gap_{tag}.png", written)
            L.append(f"![groups gap {tag}](reproduction/groups_gap_{tag}.png)")
    if m is not None and g is not None:
        s = {**g.summary(), **m.summary()}
        h = m.num_heads
        alphas = sorted({k[2] for k in m.summary() if k[2] > 0})
        methods = sorted({k[1] for k in m.summary()}, key=lambda x: METHOD_ORDER.index(x)
                         if x in METHOD_ORDER else 99)
        if alphas:
            plt = _plt()
            fig, ax = plt.subplots(figsize=(6, 4))
            for a in alphas:
                gs = [gap(s, (1, meth, a), h) for meth in methods]
                xs = [i for i, x in enumerate(gs) if x]
                ax.errorbar(xs, [gs[i]["mean"] for i in xs], yerr=[gs[i]["spread"] for i in xs], fmt="o",
                            capsize=3, label=f"α={a:g}")
            ax.axhline(0.0, color="black", lw=0.8)
            ax.set_xticks(range(len(methods)), methods)
            ax.set(xlabel="conversion method (MQA)", ylabel=f"loss gap to MHA control ({UNIT})",
                   title="conversion method after uptraining")
            ax.legend()
            save(fig, assets / "methods_gap.png", written)
            L.append("![methods gap](reproduction/methods_gap.png)")
    return ["", "## Plots", ""] + L if L else []


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("root", type=pathlib.Path, help="the ROOT given to scripts/reproduce_paper.sh")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/reproduction.md"))
    ap.add_argument("--other_root", type=pathlib.Path, default=None,
                    help="the ROOT of the same stages from an original with another pre-training seed: check that "
                         "each real difference keeps its order there")
    ap.add_argument("--original", type=pathlib.Path, default=None,
                    help="the long pre-training MODEL_DIR (default: read from ROOT/mha_original/original.json)")
    args = ap.parse_args(argv)
    root = args.root
    assets = args.out.parent / "reproduction"
    assets.mkdir(parents=True, exist_ok=True)
    written: list[pathlib.Path] = []
    original = args.original
    if original is None and (root / "mha_original" / "original.json").exists():
        original = pathlib.Path(json.loads((root / "mha_original" / "original.json").read_text())["source"])
    g, m, al = (load_sweep(root, n) for n in ("groups", "methods", "alpha"))
    arms = {"fresh": g} if g is not None else {}
    for arm in ("warmup", "carry"):
        sw = load_sweep(root, f"restart_{arm}")
        if sw is not None:
            arms[arm] = sw
    sweeps = [sw for sw in (g, m, al) if sw is not None]
    seconds = json.loads((root / "stage_seconds.json").read_text()) if (root / "stage_seconds.json").exists() else {}
    L = setup_section(root, original, sweeps, seconds)
    L += pretrain_section(original, root, assets, written)
    if g is not None:
        L += groups_section(g)
        if any(DOCS in r for r in g.rows):
            L += groups_section(g, DOCS)
    if m is not None:
        L += methods_section(m, g)
        if any(DOCS in r for r in m.rows):
            L += methods_section(m, g, DOCS)
    L += findings(g, m)
    if al is not None:
        L += alpha_section(al, assets, written)
    L += heldout_section(sweeps)
    if args.other_root is not None:
        L += other_seed_section(sweeps, args.other_root)
    L += finetune_section(root, g, al, assets, written)
    L += restart_section(arms, assets, written)
    L += gap_plots(g, m, assets, written)
    csvs = []
    for sw in sweeps + [a for k, a in arms.items() if k != "fresh"]:
        if (sw.root / "results.csv").exists():
            dst = assets / f"{sw.name}_results.csv"
            dst.write_bytes((sw.root / "results.csv").read_bytes())
            csvs.append(f"[reproduction/{dst.name}](reproduction/{dst.name})")
    if csvs:
        L += ["", "Per-run results: " + ", ".join(csvs) + ". Re-run: `scripts/reproduce_paper.sh` (resumes where "
              "it stopped)."]
    args.out.write_text("\n".join(L) + "\n")
    print(f"wrote {args.out} ({len(written)} plots)")


if __name__ == "__main__":
    main()

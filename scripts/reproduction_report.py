#!/usr/bin/env python
"""Write docs/reproduction.md from the stages of scripts/reproduce_paper.sh.

Every number and every "holds / does not hold" below is computed from the results under ROOT; nothing is typed
in, and the setup (seeds, machine, lengths, batch sizes) is read from the runs. A difference between two settings
is called real only when it exceeds the sum of their sample standard deviations over seeds; otherwise it is
reported as within the spread (≈). A part whose stage has not run says so in one line with the command that
runs it. The report only reads ROOT and the original (it writes --out and the plots and CSVs beside it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from reproduction_stages import (eval_curve, finetune_sources, pick_length, saved_steps, slope_per_1k,  # noqa: E402
                                 uptrain_steps)

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
    """The finished runs of ROOT/<name> (read only: `sweep.collect_rows`, not `aggregate`, which writes results
    files into the sweep); None when that stage has not started."""
    d = root / name
    if not (d / "sweep.json").exists():
        return None
    rows = sweep.collect_rows(d)
    cfg, spec = sweep._read_spec(d)
    return Sweep(name, d, rows, spec["num_heads"], spec["original_steps"], cfg)


# ----------------------------------------------------------------------------------- stages not (yet) run

@dataclasses.dataclass
class Context:
    """What a re-run command needs: ROOT, the original's MODEL_DIR, the step the sweeps start from (passed as
    ORIGINAL_STEPS so the original stage agrees with ROOT/mha_original whatever the length rule says), the seeds."""
    root: pathlib.Path
    original: pathlib.Path | None
    original_steps: int | None
    seeds: list[int]
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # SWEEP_GIN etc. the caller ran with

    def command(self, stages: str, **env: str) -> str:
        """The scripts/reproduce_paper.sh call that runs `stages` (then the report) on this ROOT."""
        import shlex
        parts = [f"ORIGINAL={self.original or '<pre-training MODEL_DIR>'}"]
        parts += [f"{k}={shlex.quote(v)}" for k, v in self.env.items() if k not in env]
        if self.original_steps is not None:
            parts.append(f"ORIGINAL_STEPS={self.original_steps}")
        if self.seeds:
            parts.append(f'SEEDS="{" ".join(map(str, self.seeds))}"')
        parts += [f"{k}={v}" for k, v in env.items()]
        parts.append(f'STAGES="{stages} report"')
        return " ".join(parts) + f" scripts/reproduce_paper.sh {self.root.absolute()}"


def not_run(what: str, stage: str, why: str, ctx: Context, **env: str) -> str:
    """The one line a part whose stage has not run gets instead of its results."""
    return (f"*Not in this report: {what}. The `{stage}` stage has not run ({why}); run it with "
            f"`{ctx.command(stage, **env)}`.*")


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
    return {"mean": s[key]["mean"] - ctrl["mean"], "spread": s[key]["std"] + ctrl["std"],
            "n": min(s[key]["n"], ctrl["n"])}


def fmt_gap(g: dict | None, n_full: int | None = None) -> str:
    """'+0.0123 ± 0.0045', with '(n=k)' when fewer than n_full seeds are in (a sweep read while it runs)."""
    if g is None:
        return "–"
    return f"{g['mean']:+.4f} ± {g['spread']:.4f}" + (f" (n={g['n']})" if n_full and g["n"] < n_full else "")


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
                       written: list, log_x: bool = False, tol: float | None = None, symlog_y: bool = False) -> bool:
    """Gap to the MHA control against α (α > 0 only: the conversion-only gaps are orders of magnitude larger and
    would flatten the differences this plot is about; they are in the tables), error bars = summed seed spreads.
    False (and no file) when there is no gap to plot yet."""
    if not any(a > 0 and g is not None for pts in series.values() for a, g in pts):
        return False
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
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    save(fig, path, written)
    return True


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
    planned = sorted({s for sw in sweeps for s in sw.cfg.seeds})
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
                 f"{_run_length(original, pre)} steps is the original (length chosen below).")
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
          f"- **Seeds:** {', '.join(map(str, seeds)) or '–'} (read from the runs"
          + (f"; configured: {', '.join(map(str, planned))}, the rest not finished yet" if planned != seeds else "")
          + "): each changes the uptraining data "
          "order and noise and the `random` initialisation; α = 0 rows are deterministic except `random` and use "
          "one seed. Values are mean ± sample standard deviation over seeds.",
          "- **Rule:** a difference is called real only when it exceeds the sum of the two standard deviations; "
          "otherwise it is 'within the spread' (≈). Gaps are given as mean ± that sum."]
    return L


def _run_length(original: pathlib.Path | None, pre: dict) -> int | str:
    """The pre-training run's last saved step (its train_config's length is stale when it was resumed longer)."""
    steps = saved_steps(original) if original is not None else []
    return steps[-1] if steps else pre.get("resolved_train_steps", "?")


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


def slope_before(curve: list[tuple[int, float]], end: int, window: int) -> float | None:
    """Least-squares slope of the loss over [end - window, end] in nats per 1000 steps (None if not covered)."""
    pts = [(st, v) for st, v in curve if st <= end]
    return slope_per_1k(pts, end - window, window) if pts and pts[-1][0] == end else None


def fmt_slope(x: float | None) -> str:
    return "–" if x is None else f"{x:+.4f}"


def pretrain_section(original: pathlib.Path | None, root: pathlib.Path, assets: pathlib.Path, written: list,
                     ctx: Context) -> list[str]:
    """The original's validation curve, the length rule's choice (ROOT/length.json), the step actually used
    (ROOT/mha_original/original.json) and, when they differ or the curve never flattened, the slopes that say how
    far from flat the original is."""
    head = ["", "## Length of the original (pre-training curve)", ""]
    prov_path = root / "mha_original" / "original.json"
    if not prov_path.exists():
        return head + [not_run("the original's length and curve", "original",
                               f"no {prov_path.relative_to(root)}", ctx)]
    used = int(json.loads(prov_path.read_text())["step"])
    if original is None or not (original / "metrics.jsonl").exists() or not eval_curve(original):
        return head + [f"The sweeps start from step {used} of `{original}`, whose validation curve "
                       "(metrics.jsonl with periodic eval) is not readable here, so the length cannot be checked."]
    curve = eval_curve(original)
    rule = json.loads((root / "length.json").read_text()) if (root / "length.json").exists() else {}
    flat, window = rule.get("flat", 0.02), rule.get("window", 1000)
    if "step" not in rule:  # length.json missing (older runs): apply the rule here
        rule = {**pick_length(curve, saved_steps(original), flat, window), **rule}
    picked, flattened = int(rule["step"]), bool(rule["flattened"])
    losses = dict(curve)
    last = curve[-1][0]
    at_used, at_end = slope_per_1k(curve, used, window), slope_before(curve, last, window)
    before_used = slope_before(curve, used, window)
    pre = json.loads((original / "train_config.json").read_text()) if (original / "train_config.json").exists() \
        else {}
    opt = pre.get("optimizer", {})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([st for st, _ in curve], [v for _, v in curve], "o-", ms=2, label="validation loss (trainer's eval)")
    ax.axvline(used, color="red", ls="--", lw=1, label=f"original used: step {used}")
    if picked != used:
        ax.axvline(picked, color="grey", ls=":", lw=1, label=f"length rule's choice: step {picked}"
                   + ("" if flattened else " (never flat: last saved step)"))
    ax.set(xlabel="pre-training step", ylabel=AXIS[VAL], title="pre-training curve of the original")
    ax.legend(fontsize=7)
    save(fig, assets / "pretrain_curve.png", written)
    step_ev = curve[1][0] - curve[0][0] if len(curve) > 1 else None
    L = head + [
        f"Validation loss of the pre-training run `{original}` from the trainer's periodic eval (metrics.jsonl"
        + (f", every {step_ev} steps" if step_ev else "")
        + (f", {pre['eval_examples']} examples" if pre.get("eval_examples") else "") + f") up to step {last}: "
        f"{curve[0][1]:.4f} at step {curve[0][0]}, {losses.get(used, float('nan')):.4f} at step {used}, "
        f"{curve[-1][1]:.4f} at step {last}. Rule: the first saved step whose next {window} steps improve the loss by "
        f"less than {flat:g} nats per 1000 steps (least-squares slope over the window)."]
    same = read_continued(root, VAL).get(used)
    if same is not None and used in losses:
        d = same - losses[used]
        L.append(f"At step {used} the sweeps' eval command (ROOT/continued) gives {same:.4f}, "
                 + ("the same as this curve (to 0.0001 nats), so the curve and the sweeps' tables are on one scale."
                    if abs(d) < 5e-5 else f"{d:+.4f} from this curve: compare the curve only with itself."))
    if opt.get("schedule") == "rsqrt":
        w = opt.get("warmup_steps", 0)
        L.append(f"The schedule is rsqrt with {w} warm-up steps (learning rate constant up to step {w}, then "
                 "∝ 1/√step) and does not depend on the run's length, so the checkpoint at step N of this run is what "
                 f"a run of length N gives; at the step used ({used}) the learning rate "
                 + ("has not started to decay." if used < w else "has just started to decay." if used == w else
                    f"has decayed by {1 - (w / used) ** 0.5:.0%}.") + " Uptraining continues the schedule from there.")
    L.append("")
    if flattened:
        L.append(f"**The loss flattens by this rule at step {picked}** (slope over the next {window} steps "
                 f"{fmt_slope(rule['slopes'].get(str(picked)) if rule.get('slopes') else None)} nats / 1000 steps).")
    else:
        L.append(f"**The loss never flattens by this rule within the run** (no saved step's next {window} steps "
                 f"improve by less than {flat:g} nats / 1000 steps); the rule falls back to the last saved step, "
                 f"{picked}.")
    if used == picked:
        L.append(f"The sweeps use step {used} (the rule's choice).")
    else:
        L.append(f"**The sweeps use step {used}, set by ORIGINAL_STEPS instead of the rule's {picked}.**")
    if used != picked or not flattened:
        L.append(f"At the step used the loss is still falling: slope {fmt_slope(before_used)} nats / 1000 steps over "
                 f"the {window} steps before it, {fmt_slope(at_used)} over the {window} after it; at the end of the "
                 f"curve (steps {last - window}–{last}) {fmt_slope(at_end)}. The original is therefore not a "
                 "converged model, and part of any change during uptraining is the pre-training that was still "
                 "going on (the continued-original reference in the optimiser-restart part measures exactly that).")
    L += ["", "| saved step | loss | slope over the next window (nats / 1000 steps) |", "|---|---|---|"]
    for st in saved_steps(original):
        mark = " **(used)**" if st == used else " (rule)" if st == picked else ""
        L.append(f"| {st}{mark} | " + (f"{losses[st]:.4f}" if st in losses else "–")
                 + f" | {fmt_slope(slope_per_1k(curve, st, window))} |")
    L.append("\n![pre-training curve](reproduction/pretrain_curve.png)")
    return L


def started_not_finished(sw: Sweep, title: str) -> list[str]:
    return ["", title, "", f"The `{sw.name}` stage has started (ROOT/{sw.name}/sweep.json) but none of its runs has "
            "finished; re-run the report when it has."]


def groups_section(g: Sweep, metric: str = VAL) -> list[str]:
    s, h = g.summary(metric), g.num_heads
    if not s:
        return started_not_finished(g, f"## Groups × uptraining fraction (mean pooling), {SPLIT_NAME[metric]}") \
            if metric == VAL else []
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
        top = max(alphas, default=0.0)
        if top > 0 and (h, "mean", 0.0) in s and (h, "mean", top) in s:
            c0, c1 = s[(h, "mean", 0.0)], s[(h, "mean", top)]
            L.append(f"- **The MHA control moves:** {c1['mean'] - c0['mean']:+.4f} from α=0 to α={top:g} "
                     f"({'real' if compare(c1, c0) != '≈' else 'within the spread'}), which is why every gap is "
                     "taken against the control at the same α; part 1 separates the optimiser restart from the "
                     "pre-training the original would have done in those steps anyway.")
        bench = {kv: sweep.read_bench(g.root, kv).get("incremental_step_s") for kv in (h, 1, *gqa[:1])}
        if gqa and all(bench.values()):
            frac = (bench[h] - bench[gqa[0]]) / max(bench[h] - bench[1], 1e-12)
            L.append(f"- **GQA speed close to MQA (decode step):** MHA {bench[h] * 1e3:.2f} ms, {name(gqa[0], h)} "
                     f"{bench[gqa[0]] * 1e3:.2f} ms, MQA {bench[1] * 1e3:.2f} ms; {name(gqa[0], h)} gets "
                     f"{frac * 100:.0f}% of MQA's saving → {'holds' if frac >= 0.5 else 'does not hold'}.")
    return L if len(L) > 3 else []


def methods_section(m: Sweep, g: Sweep | None, metric: str = VAL) -> list[str]:
    s = m.summary(metric)
    if not s:
        return started_not_finished(m, "## Conversion method for MQA") if metric == VAL else []
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
    if not s:
        return started_not_finished(al, "## Part 2: how much uptraining does each method need?")
    alphas = sorted({k[2] for k in s})
    n_full = len(al.cfg.seeds)  # α = 0 has one seed by design (deterministic)
    cells = sorted({(k[0], k[1]) for k in s if k[0] != h}, key=lambda c: (c[0], METHOD_ORDER.index(c[1])
                                                                            if c[1] in METHOD_ORDER else 99))
    L = ["", "## Part 2: how much uptraining does each method need? (validation split)", "",
         "Gap to the MHA control at the same α (± summed seed spreads), and the smallest α at which the mean gap is "
         f"at most {TOL:g} nats ('never' if no α in the grid reaches it).", "",
         "| model | method | " + " | ".join(f"α={a:g}" for a in alphas) + f" | smallest α within {TOL:g} |",
         "|---|---|" + "---|" * (len(alphas) + 1)]
    within = {}
    for kv, meth in cells:
        a_ok = first_alpha_within(s, kv, meth, h)
        within[(kv, meth)] = a_ok
        L.append(f"| {name(kv, h)} | {meth} | "
                 + " | ".join(fmt_gap(gap(s, (kv, meth, a), h), n_full if a > 0 else None) for a in alphas)
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
        if plot_gaps_vs_alpha(series, f"{name(kv, h)}: gap to MHA control vs α",
                              assets / f"alpha_gap_kv{kv}.png", written, log_x=True, tol=TOL, symlog_y=True):
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
    others = [(sw, o) for sw in sweeps if (o := load_sweep(other_root, sw.name)) is not None]
    pairs_of = [(sw.summary(VAL), o.summary(VAL), sw.num_heads, sw.name) for sw, o in others]
    seed = json.loads((other_root / "mha_original" / "train_config.json").read_text()).get("seed", "?") \
        if (other_root / "mha_original" / "train_config.json").exists() else "?"
    L = agreement_section(f"Another pre-training seed ({seed}, `{other_root}`)", "with the other original", pairs_of)
    for sw, o in others if L else []:
        a, b = sw.summary(VAL), o.summary(VAL)
        keys = [k for k in sorted(a, key=lambda k: (k[2], -k[0], k[1])) if k in b and k[0] != sw.num_heads]
        if not keys:
            continue
        L += ["", f"`{sw.name}` sweep, validation split: gap to the MHA control at the same α (± summed seed "
              "spreads), with this original and with the other; *same*: the two agree in sign, or both are within "
              "their spreads.", "", "| model | method | α | gap, this original | gap, other original | same |",
              "|---|---|---|---|---|---|"]
        for k in keys:
            ga, gb = gap(a, k, sw.num_heads), gap(b, k, o.num_heads)
            if ga is None or gb is None:
                continue
            sign = [0 if abs(g["mean"]) <= g["spread"] else (1 if g["mean"] > 0 else -1) for g in (ga, gb)]
            L.append(f"| {name(k[0], sw.num_heads)} | {k[1]} | {k[2]:g} | {fmt_gap(ga)} | {fmt_gap(gb)} | "
                     f"{'yes' if sign[0] == sign[1] else 'no'} |")
    return L


FT_METRICS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "bleu": "BLEU"}


def finetune_section(root: pathlib.Path, sweeps: dict[str, Sweep], ctx: Context, assets: pathlib.Path,
                     written: list) -> list[str]:
    """Issue #16 part 3: ROUGE/BLEU after fine-tuning, seed spreads, time per sample, and whether the ordering
    on each fine-tuned metric matches the one on pre-training loss of the same uptrained models."""
    import statistics
    base = root / "finetune"
    head = ["", "## Part 3: after fine-tuning (WordNet gloss task)", ""]
    if not (base / "finetune.json").exists():
        src = "alpha" if "alpha" in sweeps else "groups"
        env = {} if src == "alpha" else {"FT_MODELS": ",".join(
            f"kv{kv}-mean" for kv in sorted(sweeps["groups"].cfg.num_kv_heads, reverse=True))} \
            if "groups" in sweeps else {}
        return head + [not_run("fine-tuning", "finetune", "no ROOT/finetune/finetune.json", ctx, **env)]
    spec = json.loads((base / "finetune.json").read_text())
    sources = finetune_sources(spec)
    h = next((sweeps[s].num_heads for s in sources.values() if s in sweeps),
             next((sw.num_heads for sw in sweeps.values()), 8))
    rows: dict[str, list[dict]] = {}
    for m in spec["models"]:
        for seed in spec["seeds"]:
            d = base / "runs" / f"{m}-s{seed}"
            if (d / "eval.json").exists():
                r = json.loads((d / "eval.json").read_text())["metrics"]
                t = json.loads((d / "eval_seconds.json").read_text()) if (d / "eval_seconds.json").exists() else {}
                r["wall_ms_per_example"] = 1e3 * t["seconds"] / t["examples"] if t else float("nan")
                rows.setdefault(m, []).append(r)
    pending = [m for m in spec["models"] if len(rows.get(m, [])) < len(spec["seeds"])]
    if not rows:
        return head + [f"The finetune stage has started ({', '.join(spec['models'])}) but no model has finished; "
                       f"resume it with `{ctx.command('finetune')}`."]

    def ms(vals):
        return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "n": len(vals)}
    stats = {m: {k: ms([r[k] for r in rs if k in r]) for k in [*FT_METRICS, "wall_ms_per_example"]}
             for m, rs in rows.items()}

    def key(m):  # "kv2-svd" -> the pre-training summary key at FT_ALPHA
        kv, meth = m.split("-")
        return int(kv[2:]), meth, spec["alpha"]
    label = {m: "MHA control" if key(m)[0] == h else f"{name(key(m)[0], h)} {key(m)[1]}" for m in rows}
    summaries = {s: sweeps[s].summary() for s in set(sources.values()) if s in sweeps}
    up = {key(m): summaries[sources[m]][key(m)] for m in rows
          if sources.get(m) in summaries and key(m) in summaries[sources[m]]}
    bench_root = next((sw.root for sw in sweeps.values() if read_bench_any(sw.root)), None)
    L = head + [
        f"Each model uptrained at α = {spec['alpha']:g} (runs of the {from_sweeps(sources, rows)}) is fine-tuned "
        f"{spec['steps']} steps on `gqa_wordnet_gloss` (configs/runs/finetune.gin: constant learning rate 1e-3, "
        f"dropout 0.1; batch {spec['batch']}, inputs 64 / targets 32) and scored on the first {spec['eval_examples']} "
        "validation examples with greedy decoding (ROUGE F-measure and BLEU, 0-100; mean ± sample std over seeds). "
        f"Seeds {', '.join(map(str, spec['seeds']))} (uptraining and fine-tuning seed). *time/sample*: the decode "
        "benchmark of this model shape (as in the groups table); *eval wall/example*: the whole eval command "
        "(start-up included) divided by the examples.", "",
        "| model | n | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU | time/sample (ms) | eval wall/example (ms) | "
        f"pre-training loss α={spec['alpha']:g} |", "|---|---|---|---|---|---|---|---|---|"]
    for m in rows:
        t = sweep.read_bench(bench_root, key(m)[0]).get("time_per_sample_s") if bench_root else None
        L.append(f"| {label[m]} | {len(rows[m])} | " + " | ".join(
            f"{stats[m][k]['mean']:.2f} ± {stats[m][k]['std']:.2f}" for k in FT_METRICS)
                 + f" | {'–' if t is None else f'{t * 1e3:.1f}'} | {stats[m]['wall_ms_per_example']['mean']:.1f} | "
                 f"{fmt(up.get(key(m)))} |")
    if pending:
        L.append(f"\nNot finished for every seed: {', '.join(pending)} (resume: `{ctx.command('finetune')}`).")
    # Ordering: each pair of models, pre-training loss (lower is better) against each metric (higher is better).
    models = list(rows)
    L += ["", "**Does the fine-tuned ordering match the pre-training-loss ordering?** For each pair of models: same "
          "order on both with both differences real, opposite order with both real, or within the spread on at "
          "least one of the two.", "", "| metric | same order | opposite | within the spread |", "|---|---|---|---|"]
    for k, title in FT_METRICS.items():
        same, opp, unclear = [], [], 0
        for i, a in enumerate(models):
            for b in models[i + 1:]:
                pa, pb = up.get(key(a)), up.get(key(b))
                if pa is None or pb is None:
                    continue
                cl = compare(pa, pb)
                ra, rb = stats[a][k], stats[b][k]
                cr = compare({**ra, "mean": -ra["mean"]}, {**rb, "mean": -rb["mean"]})
                if cl == "≈" or cr == "≈":
                    unclear += 1
                else:
                    (same if cl == cr else opp).append(f"{label[a]} vs {label[b]}")
        L.append(f"| {title} | {len(same)} | {len(opp)}" + (f" ({'; '.join(opp)})" if opp else "")
                 + f" | {unclear} |")
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    xs = list(range(len(models)))
    for ax, k in zip(axes, ("rougeL", "bleu")):
        ax.errorbar(xs, [stats[m][k]["mean"] for m in models], yerr=[stats[m][k]["std"] for m in models], fmt="o",
                    capsize=3)
        ax.set_xticks(xs, [label[m] for m in models], rotation=20)
        ax.set(xlabel="model (uptrained, then fine-tuned)", ylabel=f"{FT_METRICS[k]} (0-100)",
               title=f"{FT_METRICS[k]} after fine-tuning")
    save(fig, assets / "finetune_rougeL.png", written)
    L.append("\n![fine-tuning ROUGE-L and BLEU](reproduction/finetune_rougeL.png)")
    return L


def from_sweeps(sources: dict[str, str], models) -> str:
    """"`groups` sweep" or "`groups` sweep (kv8-mean, kv2-mean) and `alpha` sweep (kv2-svd)"."""
    by: dict[str, list[str]] = {}
    for m in models:
        by.setdefault(sources[m], []).append(m)
    if len(by) == 1:
        return f"`{next(iter(by))}` sweep"
    return " and ".join(f"`{s}` sweep ({', '.join(ms)})" for s, ms in by.items())


def read_bench_any(root: pathlib.Path) -> bool:
    return any((root / "bench").glob("kv*/decode_*.json"))


ARMS = {"fresh": ("groups", "fresh Adafactor state (the groups sweep)", "groups"),
        "warmup": ("restart_warmup", "fresh state + learning-rate warm-up", "restart"),
        "carry": ("restart_carry", "Adafactor state and step carried through conversion", "restart")}


def read_continued(root: pathlib.Path, metric: str) -> dict[int, float]:
    """Step -> loss of the original run itself at that step (ROOT/continued, written by reproduction_stages.py
    continued with the sweeps' eval command)."""
    f = "eval.json" if metric == VAL else f"eval_{metric.split('.')[0][len('eval_'):]}.json"
    out = {}
    for d in sorted((root / "continued").glob("*")):
        if d.name.isdigit() and (d / f).exists():
            out[int(d.name)] = float(json.loads((d / f).read_text())["metrics"]["loss"])
    return out


def drift(c: dict | None, ref: float | None) -> dict | None:
    """Control minus a single deterministic reference evaluation: {'mean', 'spread' (the control's seed std),
    'n'}."""
    return None if c is None or ref is None else {"mean": c["mean"] - ref, "spread": c["std"], "n": c["n"]}


def moved(d: dict | None) -> str:
    """'within the seed spread' / 'real' (the rule), or why it cannot be judged."""
    if d is None:
        return "–"
    if d["n"] < 2:
        return "one seed: no spread"
    return "within the seed spread" if abs(d["mean"]) <= d["spread"] else "real"


def closer(g: dict | None, f: dict | None) -> str:
    """Is the gap `g` (an arm) closer to zero than `f` (fresh state) beyond their summed spreads?"""
    if g is None or f is None:
        return "–"
    if abs(abs(g["mean"]) - abs(f["mean"])) <= g["spread"] + f["spread"]:
        return "≈"
    return "closer" if abs(g["mean"]) < abs(f["mean"]) else "farther"


def restart_section(root: pathlib.Path, arms: dict[str, Sweep], ctx: Context, assets: pathlib.Path,
                    written: list) -> list[str]:
    """Issue #16 part 1: the MHA control's drift against (a) the original at N and (b) the original run continued
    to N + α·N, the GQA/MQA gaps to the control, for each optimiser-restart arm, and the verdict on the goal."""
    L = ["", "## Part 1: the optimiser restart shock", ""]
    for arm, (d, what, stage) in ARMS.items():
        if arm not in arms:
            L.append("- " + not_run(f"the {what} arm", stage, f"no ROOT/{d}/sweep.json", ctx))
    if (root / "continued" / "continued.json").exists():
        cont = json.loads((root / "continued" / "continued.json").read_text())
        if cont.get("unsaved"):
            L.append("- The original run saved no checkpoint at step "
                     + ", ".join(f"{k} (α={', '.join(f'{a:g}' for a in v)})" for k, v in cont["unsaved"].items())
                     + ", so reference (b) is missing there.")
    elif arms:
        L.append("- " + not_run("reference (b), the original continued to N + α·N", "restart",
                                "no ROOT/continued/continued.json; the report stage also runs it", ctx))
    if not arms:
        return L
    h = next(iter(arms.values())).num_heads
    n_steps = next((sw.original_steps for sw in arms.values() if sw.original_steps), None) or ctx.original_steps
    L += ([""] if L[-1] else []) + [f"Reference (a): the original at step N = {n_steps} before any uptraining; reference (b): the original "
          "run itself continued to step N + α·N with its own optimiser state (a saved pre-training checkpoint), "
          "i.e. what the same number of steps does without conversion or optimiser restart. Both are scored with "
          "the sweeps' eval command and splits (one deterministic evaluation each). Drift = MHA control after "
          "uptraining minus the reference, ± the control's seed standard deviation; gaps = GQA-2 / MQA minus the "
          "control at the same α, ± the summed seed spreads. Goal (issue #16): the control moves by less than the "
          "seed spread, and the converted models land closer to it at the same α (here: their gap is smaller than "
          "with fresh state beyond the summed spreads of the two gaps)."]
    verdict_lines = []
    plot_data = {}
    for metric in (VAL, DOCS):
        sums = {arm: sw.summary(metric) for arm, sw in arms.items()}
        if not any(sums.values()):
            continue
        cont = read_continued(root, metric)
        base_a = cont.get(n_steps) if n_steps is not None else None
        ctrl0 = next((sm[(h, "mean", 0.0)] for sm in sums.values() if (h, "mean", 0.0) in sm), None)
        src_a = "the original checkpoint"
        if base_a is None and ctrl0 is not None:
            base_a, src_a = ctrl0["mean"], "the identity-converted control at α = 0, the same model"
        alphas = sorted({k[2] for sm in sums.values() for k in sm if k[2] > 0})
        kinds = [kv for kv in sorted({k[0] for sm in sums.values() for k in sm}, reverse=True) if kv != h]
        L += ["", f"### {SPLIT_NAME[metric]}", ""]
        grid = sorted({a for sw in arms.values() for a in sw.cfg.alphas if a > 0})
        ref_steps = [n_steps + uptrain_steps(a, n_steps) for a in grid] if n_steps else []
        if base_a is None:
            L.append("Reference (a) is missing (no continued eval at N and no α = 0 control).")
        else:
            L.append(f"Reference (a) = {base_a:.4f} ({src_a})"
                     + (f"; the identity-converted control at α = 0 scores {ctrl0['mean']:.4f} "
                        f"({ctrl0['mean'] - base_a:+.4f})" if ctrl0 is not None and src_a.startswith("the original")
                        else "") + ". Reference (b) = "
                     + (", ".join(f"{cont[st]:.4f} at step {st}" for st in ref_steps if st in cont)
                        or "not evaluated")
                     + ".")
        table_at = len(L) + 1
        L += ["", "| arm | α | MHA control | drift vs (a) | verdict | drift vs (b) | verdict | "
              + " | ".join(f"{name(kv, h)} gap | vs fresh" for kv in kinds) + " |",
              "|---|---|---|---|---|---|---|" + "---|---|" * len(kinds)]
        for arm, sm in sums.items():
            for a in alphas:
                c = sm.get((h, "mean", a))
                ref_b = cont.get(n_steps + uptrain_steps(a, n_steps)) if n_steps else None
                da, db = drift(c, base_a), drift(c, ref_b)
                gaps = {kv: gap(sm, (kv, "mean", a), h) for kv in kinds}
                if c is None and not any(gaps.values()):
                    continue  # α not in this arm's grid, or not finished
                fresh = sums.get("fresh", {})
                vs = {kv: "(baseline)" if arm == "fresh" else closer(gaps[kv], gap(fresh, (kv, "mean", a), h))
                      for kv in kinds}
                L.append(f"| {arm} | {a:g} | {fmt(c)} | {fmt_gap(da)} | {moved(da)} | {fmt_gap(db)} | {moved(db)} | "
                         + " | ".join(f"{fmt_gap(gaps[kv])} | {vs[kv]}" for kv in kinds) + " |")
                if metric == VAL:
                    plot_data.setdefault(arm, []).append((a, c))
                    verdict_lines.append((arm, a, da, db, vs))
        if len(L) == table_at + 2:  # header only
            L[table_at:] = ["No uptrained MHA control (α > 0) has finished yet in any arm: no drift or gap yet."]
    # The verdict, per arm, on the validation split (the issue's measure).
    L += ["", "**Verdict on the goal (validation split):**", ""]
    for arm in arms:
        rows = [r for r in verdict_lines if r[0] == arm]
        if not rows:
            L.append(f"- {arm}: no finished uptrained control yet.")
            continue
        for ref, idx in (("(a) the original at N", 2), ("(b) the original continued", 3)):
            judged = [(r[1], r[idx]) for r in rows if r[idx] is not None]
            if not judged:
                L.append(f"- {arm}, control vs {ref}: no reference.")
                continue
            ok = all(moved(d) == "within the seed spread" for _, d in judged)
            L.append(f"- {arm}, control vs {ref}: "
                     + "; ".join(f"α={a:g} {d['mean']:+.4f} ({moved(d)})" for a, d in judged)
                     + f" → {'moves by less than the seed spread' if ok else 'does not stay within the seed spread'}.")
        if arm != "fresh":
            cmp_ = [(a, kv, v) for _, a, _, _, vs in rows for kv, v in vs.items() if v != "–"]
            absent = sorted({name(kv, h) for _, _, _, _, vs in rows for kv, v in vs.items() if v == "–"})
            if absent:
                L.append(f"- {arm}: no {' / '.join(absent)} runs to compare with fresh state (not in its grid or "
                         "not finished).")
            if cmp_:
                ok = all(v == "closer" for *_, v in cmp_)
                L.append(f"- {arm}, converted models vs fresh state: "
                         + "; ".join(f"{name(kv, h)} α={a:g} {v}" for a, kv, v in cmp_)
                         + f" → {'closer to the control everywhere' if ok else 'not closer everywhere'}.")
                okc = all(moved(r[2]) == "within the seed spread" for r in rows)
                L.append(f"- **{arm}: goal {'met' if ok and okc else 'not met'}** (control within the seed spread of "
                         f"the original at N: {'yes' if okc else 'no'}; converted models closer than with fresh "
                         f"state: {'yes' if ok else 'no'}).")
    # Plot: the control's loss against α per arm, with references (a) and (b).
    if any(c is not None for pts in plot_data.values() for _, c in pts):
        cont = read_continued(root, VAL)
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (arm, pts) in enumerate(plot_data.items()):
            pts = [(a, c) for a, c in pts if c is not None]
            if pts:
                ax.errorbar([a * (1 + 0.03 * i) for a, _ in pts], [c["mean"] for _, c in pts],
                            yerr=[c["std"] for _, c in pts], fmt="o", capsize=3, label=f"MHA control, {arm}")
        if n_steps:
            ref = sorted((st - n_steps) / n_steps for st in cont if st >= n_steps)
            if ref:
                ax.plot(ref, [cont[n_steps + round(r * n_steps)] for r in ref], "k-s", ms=4,
                        label="original continued (no restart)")
        ax.set(xlabel="uptraining fraction α (steps after N / N)", ylabel=AXIS[VAL],
               title="MHA control after uptraining vs the original")
        ax.legend(fontsize=7)
        save(fig, assets / "restart_control.png", written)
        L.append("\n![control vs original](reproduction/restart_control.png)")
        alphas = sorted({a for pts in plot_data.values() for a, _ in pts})
        series = {f"{arm} {name(kv, h)}": [(a, gap(sw.summary(), (kv, "mean", a), h)) for a in alphas]
                  for arm, sw in arms.items() for kv in sorted({k[0] for k in sw.summary()}) if kv != h}
        if plot_gaps_vs_alpha(series, "gap to MHA control per optimiser-restart arm", assets / "restart_gaps.png",
                              written):
            L.append("![restart gaps](reproduction/restart_gaps.png)")
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
            if plot_gaps_vs_alpha(series, f"groups: gap to MHA control ({SPLIT_NAME[metric]})",
                                  assets / f"groups_gap_{tag}.png", written):
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


def write_csv(sw: Sweep, path: pathlib.Path) -> None:
    """The sweep's per-run rows (as `gqa-uptrain sweep` writes results.csv, without writing into the sweep)."""
    import csv
    keys = sorted({k for r in sw.rows for k in r}, key=lambda k: (k.split(".")[0] not in ("run_id", "kind"), k))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(sw.rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("root", type=pathlib.Path, help="the ROOT given to scripts/reproduce_paper.sh")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/reproduction.md"),
                    help="the report; its plots and CSVs go to reproduction/ beside it (default %(default)s)")
    ap.add_argument("--other_root", type=pathlib.Path, default=None,
                    help="the ROOT of the same stages from an original with another pre-training seed: check that "
                         "each real difference keeps its order there")
    ap.add_argument("--original", type=pathlib.Path, default=None,
                    help="the long pre-training MODEL_DIR (default: read from ROOT/mha_original/original.json)")
    ap.add_argument("--rerun_env", action="append", default=[], metavar="NAME=VALUE",
                    help="an environment setting the stages ran with (e.g. SWEEP_GIN=...), repeated in the command "
                         "each missing part gives (scripts/reproduce_paper.sh passes its SWEEP_GIN, SWEEP_ARGS, "
                         "TRAIN_ARGS and PARALLEL)")
    args = ap.parse_args(argv)
    if any("=" not in kv for kv in args.rerun_env):
        raise SystemExit(f"error: --rerun_env takes NAME=VALUE, got {args.rerun_env}")
    root = args.root.absolute()
    if not root.is_dir():
        raise SystemExit(f"error: {root} is not a directory (the ROOT given to scripts/reproduce_paper.sh)")
    assets = args.out.parent / "reproduction"
    assets.mkdir(parents=True, exist_ok=True)
    written: list[pathlib.Path] = []
    original = args.original
    prov_path = root / "mha_original" / "original.json"
    if original is None and prov_path.exists():
        original = pathlib.Path(json.loads(prov_path.read_text())["source"])
    names = ("groups", "methods", "alpha", "restart_warmup", "restart_carry")
    loaded = {n: load_sweep(root, n) for n in names}
    sweeps_by = {n: sw for n, sw in loaded.items() if sw is not None}
    g, m, al = (loaded[n] for n in ("groups", "methods", "alpha"))
    arms = {arm: loaded[d] for arm, (d, _, _) in ARMS.items() if loaded.get(d) is not None}
    sweeps = [sw for sw in (g, m, al) if sw is not None]
    used = json.loads(prov_path.read_text())["step"] if prov_path.exists() else None
    seeds = list(next((sw.cfg.seeds for sw in sweeps_by.values()), ()))
    rerun_env = dict(kv.split("=", 1) for kv in args.rerun_env)
    ctx = Context(root, original, used, seeds, rerun_env)
    seconds = json.loads((root / "stage_seconds.json").read_text()) if (root / "stage_seconds.json").exists() else {}
    L = setup_section(root, original, sweeps, seconds)
    L.append("- **Stages in this report:** " + (", ".join(sweeps_by) or "no sweep")
             + ("; not run: " + ", ".join(n for n in names if n not in sweeps_by) if len(sweeps_by) < len(names)
                else "") + " (each part without its data says how to run it).")
    L += pretrain_section(original, root, assets, written, ctx)
    if g is not None:
        L += groups_section(g)
        if any(DOCS in r for r in g.rows):
            L += groups_section(g, DOCS)
    else:
        L += ["", "## Groups × uptraining fraction", "",
              not_run("the groups × α sweep (and every part built on it)", "groups", "no ROOT/groups/sweep.json",
                      ctx)]
    if m is not None:
        L += methods_section(m, g)
        if any(DOCS in r for r in m.rows):
            L += methods_section(m, g, DOCS)
    else:
        L += ["", "## Conversion method for MQA", "",
              not_run("the conversion-method comparison", "methods", "no ROOT/methods/sweep.json", ctx)]
    L += findings(g, m)
    L += restart_section(root, arms, ctx, assets, written)
    if al is not None:
        L += alpha_section(al, assets, written)
    else:
        L += ["", "## Part 2: how much uptraining does each method need?", "",
              not_run("loss against α per conversion method", "alpha", "no ROOT/alpha/sweep.json", ctx)]
    L += finetune_section(root, sweeps_by, ctx, assets, written)
    L += heldout_section(sweeps)
    if args.other_root is not None:
        L += other_seed_section(sweeps, args.other_root)
    L += gap_plots(g, m, assets, written)
    csvs = []
    for sw in sweeps_by.values():
        if sw.rows:
            dst = assets / f"{sw.name}_results.csv"
            write_csv(sw, dst)
            csvs.append(f"[reproduction/{dst.name}](reproduction/{dst.name})")
    if csvs:
        L += ["", "Per-run results: " + ", ".join(csvs) + ". Re-run: `scripts/reproduce_paper.sh` (resumes where "
              "it stopped)."]
    args.out.write_text("\n".join(L) + "\n")
    print(f"wrote {args.out} ({len(written)} plots)")


if __name__ == "__main__":
    main()

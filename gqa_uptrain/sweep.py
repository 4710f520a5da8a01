"""Sweeps over KV-head count, conversion method, uptraining fraction α and seed.

Each run lives in its own directory under the sweep root and walks the user's flow with the CLI's own commands
(convert -> train -> eval), so a sweep is exactly what a person would run by hand, and a crash of one run cannot
take the others down. Every stage leaves a marker; re-running the sweep skips completed stages, and an
interrupted training stage resumes from its latest checkpoint (the trainer does that by itself).

Layout:
  ROOT/sweep.json                     the resolved sweep (refuses to mix with a different sweep in the same ROOT)
  ROOT/runs/<run_id>/converted/       gqa-uptrain convert output
  ROOT/runs/<run_id>/train/           gqa-uptrain train MODEL_DIR (α > 0)
  ROOT/runs/<run_id>/eval.json        gqa-uptrain eval output (validation split)
  ROOT/runs/<run_id>/eval_<split>.json  the same loss on each of SweepConfig.extra_eval_splits (e.g. a second
                                      held-out set)
  ROOT/runs/<run_id>/<stage>.log      each stage's output
  ROOT/shared/kv<G>-<method>-s<seed>/ with share_alpha_runs: the one conversion and training the runs that differ
                                      only in α are cut from (see "prefix mode" below, docs/sweep.md)
  ROOT/bench/kv<G>/decode_*.json      time per sample for each G (model shape only; shared by runs)
  ROOT/results.csv, results.md, *.png the aggregation

Reuse (`run_sweep(reuse=...)`, `gqa-uptrain sweep --reuse OTHER_ROOT`): a run whose model inputs (`model_key`:
absolute source path, G, method, α, seed, convert flags, original steps, train gin file and bindings) equal those of a
finished run in another sweep root gets that run's converted/ and train/ directories as symlinks instead of
recomputing them (the commands would be identical, so the models are bit-identical); an eval whose settings also
match (`eval_specs`) is copied. Evals that differ, or runs the other root has not finished, are computed here.
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A grid. `source_checkpoint` is the original MHA model every run starts from."""

    source_checkpoint: str
    num_kv_heads: tuple[int, ...] = (1, 2, 8)
    methods: tuple[str, ...] = ("mean",)
    alphas: tuple[float, ...] = (0.0, 0.05)
    seeds: tuple[int, ...] = (0,)
    # Pre-training steps of the source; None reads it from the source checkpoint's manifest.
    original_steps: int | None = None
    model_gin_file: str = "models/t5_1_1/tiny.gin"
    convert_args: tuple[str, ...] = ()  # more `gqa-uptrain convert` flags, e.g. optimiser-state options
    train_gin_file: str = "runs/uptrain.gin"
    train_bindings: tuple[str, ...] = ()
    eval_task: str = "gqa_span_corruption"
    eval_args: tuple[str, ...] = ()
    downstream_task: str | None = None  # e.g. gqa_wordnet_gloss, evaluated with decoding
    downstream_args: tuple[str, ...] = ()
    # More splits of eval_task scored like the validation split (same eval_args), each into eval_<split>.json:
    # a second held-out set so that no conclusion rests on one validation split.
    extra_eval_splits: tuple[str, ...] = ()
    bench_args: tuple[str, ...] = ("--batch", "8", "--input-len", "256", "--output-len", "32")
    bench: bool = True  # False: no decode benchmarks (quality-only sweeps, quick tests)
    num_heads: int | None = None  # for labelling MHA/MQA; read from the source config when None
    # Prefix mode: runs that differ only in α (> 0) share one conversion and one training to their largest α that
    # saves a checkpoint at every α's step count; each α point is evaluated from its checkpoint (module docstring).
    # Same results as separate runs (bitwise: tests/test_sweep_prefix.py), far fewer steps and process start-ups.
    share_alpha_runs: bool = False

    def __post_init__(self) -> None:
        if not self.num_kv_heads or any(g <= 0 for g in self.num_kv_heads):
            raise ValueError(f"num_kv_heads must be positive integers, got {self.num_kv_heads}")
        if any(a < 0 for a in self.alphas):
            raise ValueError(f"alphas must be >= 0, got {self.alphas}")


@dataclasses.dataclass(frozen=True)
class Run:
    kv_heads: int
    method: str
    alpha: float
    seed: int

    @property
    def run_id(self) -> str:
        return f"kv{self.kv_heads}-{self.method}-a{self.alpha:g}-s{self.seed}"


def expand_grid(cfg: SweepConfig, num_heads: int) -> list[Run]:
    """All runs. For G = H (MHA) every method is the identity, so it is run once as 'mean' (the MHA control);
    α = 0 runs are deterministic except for 'random', so they use the first seed only."""
    runs = []
    for g in cfg.num_kv_heads:
        if num_heads % g:
            raise ValueError(f"num_kv_heads {g} does not divide the source's num_heads={num_heads}")
        methods = ("mean",) if g == num_heads else cfg.methods
        for method in methods:
            for alpha in cfg.alphas:
                seeds = cfg.seeds if (alpha > 0 or method == "random") else cfg.seeds[:1]
                runs.extend(Run(g, method, alpha, s) for s in seeds)
    return runs


def _cli() -> list[str]:
    return [sys.executable, "-m", "gqa_uptrain"]


class Stage:
    """One CLI invocation with a completion marker and a log file."""

    def __init__(self, name: str, argv: list[str], done: pathlib.Path, log: pathlib.Path, owner: str | None = None):
        self.name, self.argv, self.done, self.log = name, argv, done, log
        self.owner = owner  # the run this stage belongs to, when its chain serves several (prefix mode)

    def run(self, env: dict[str, str]) -> None:
        if self.done.exists():
            return
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as f:
            f.write(f"$ {' '.join(self.argv)}\n")
            f.flush()
            rc = subprocess.call(self.argv, stdout=f, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        if rc != 0:
            tail = self.log.read_text().strip().splitlines()[-1:] or [""]
            raise RuntimeError(f"stage {self.name} failed (exit {rc}); see {self.log}: {tail[0]}")
        if not self.done.exists():  # stages whose output is a file mark themselves; others get a marker
            self.done.write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")

    def describe(self) -> str:
        """The command, without the interpreter (what a dry run prints)."""
        return " ".join(self.argv[2:])


def _convert_stage(cfg: SweepConfig, run: Run, converted: pathlib.Path, log: pathlib.Path) -> Stage:
    return Stage("convert", _cli() + [
        "convert", "--source", cfg.source_checkpoint, "--num-kv-heads", str(run.kv_heads),
        "--method", run.method, "--seed", str(run.seed), "--output", str(converted), "--overwrite",
        *cfg.convert_args],
        converted / "config.json", log)


def _train_argv(cfg: SweepConfig, converted: pathlib.Path, model_dir: pathlib.Path, seed: int,
                original_steps: int | None, length: list[str]) -> list[str]:
    bindings = [f"--gin.INITIAL_CHECKPOINT={converted}", f"--gin.MODEL_DIR={model_dir}", *length,
                f"--gin.SEED={seed}"]
    if original_steps is not None:
        bindings.append(f"--gin.ORIGINAL_STEPS={original_steps}")
    # No model file: the trainer takes the architecture from the converted checkpoint.
    return _cli() + ["train", f"--gin_file={cfg.train_gin_file}", *bindings, *cfg.train_bindings]


def eval_stages(cfg: SweepConfig, d: pathlib.Path, final: pathlib.Path) -> list[Stage]:
    """The eval stages of the run directory `d` whose model is `final` (validation split, extra splits,
    downstream task)."""
    stages = [Stage("eval", _cli() + [
        "eval", "--checkpoint", str(final), "--task", cfg.eval_task, "--output", str(d / "eval.json"),
        *cfg.eval_args], d / "eval.json", d / "eval.log")]
    for split in cfg.extra_eval_splits:
        stages.append(Stage(f"eval_{split}", _cli() + [
            "eval", "--checkpoint", str(final), "--task", cfg.eval_task, "--split", split,
            "--output", str(d / f"eval_{split}.json"), *cfg.eval_args], d / f"eval_{split}.json",
            d / f"eval_{split}.log"))
    if cfg.downstream_task:
        stages.append(Stage("downstream", _cli() + [
            "eval", "--checkpoint", str(final), "--task", cfg.downstream_task,
            "--output", str(d / "downstream.json"), *cfg.downstream_args],
            d / "downstream.json", d / "downstream.log"))
    return stages


def run_stages(cfg: SweepConfig, root: pathlib.Path, run: Run, original_steps: int | None) -> list[Stage]:
    d = root / "runs" / run.run_id
    converted = d / "converted"
    stages = [_convert_stage(cfg, run, converted, d / "convert.log")]
    final = converted
    if run.alpha > 0:
        model_dir = d / "train"
        stages.append(Stage("train", _train_argv(cfg, converted, model_dir, run.seed, original_steps,
                                                 [f"--gin.UPTRAIN_FRACTION={run.alpha}"]),
                            d / "train.done", d / "train.log"))
        final = model_dir
    return stages + eval_stages(cfg, d, final)


# ------------------------------------------------------------------------------------------------ prefix mode
# With share_alpha_runs, the runs of one (G, method, seed) with α > 0 are cut from one training ("trunk"):
#   ROOT/shared/kv<G>-<method>-s<seed>/converted/     its conversion (the command a run's convert stage runs)
#   ROOT/shared/kv<G>-<method>-s<seed>/train/         TRAIN_STEPS = the largest step count still needed, with
#                                                     SAVE_STEPS = every α's step count (kept past rotation)
#   ROOT/shared/kv<G>-<method>-s<seed>/train-<K>.done  the trunk trained to step K
# and each α point's run directory looks like a separately trained one: converted -> the trunk's conversion
# (symlink), train/ a run directory holding only the trunk's checkpoint at round(α x original steps) (hard links),
# trained_in.json (the trunk and the step), then the same eval stages reading runs/<run_id>/train.
# Exact because the uptraining learning rate depends on the step only (continue_schedule: 1/sqrt(original + step)),
# the data order and dropout on the seed only, and saving a checkpoint changes nothing; the α = 0 runs are
# unchanged (convert, then evaluate the conversion).

# Train bindings prefix mode refuses: they would make the run's length, or where it is written, not the sweep's.
_LENGTH_BINDINGS = ("TRAIN_STEPS", "UPTRAIN_FRACTION", "SAVE_STEPS", "MODEL_DIR", "INITIAL_CHECKPOINT",
                    "train_steps", "uptrain_fraction", "save_steps", "model_dir", "initial_checkpoint")
TRAINED_IN = "trained_in.json"


@dataclasses.dataclass(frozen=True)
class Trunk:
    """One shared training and the α points (runs) cut from it."""

    kv_heads: int
    method: str
    seed: int
    points: tuple[tuple[Run, int], ...]  # (run, its step count), in step order

    @property
    def name(self) -> str:
        return f"kv{self.kv_heads}-{self.method}-s{self.seed}"


def check_share_alpha_runs(cfg: SweepConfig, launcher: str) -> None:
    """ValueError (one line) when prefix mode cannot give what separate runs give."""
    if launcher != "local":
        raise ValueError("SweepConfig.share_alpha_runs needs --launcher local (the α points are cut from the shared "
                         "run in-process, which is no SLURM job); set SweepConfig.share_alpha_runs = False")
    for b in cfg.train_bindings:
        name = b.split("=", 1)[0].lstrip("-").removeprefix("gin.")
        if name.split(".")[-1] in _LENGTH_BINDINGS:
            raise ValueError(f"SweepConfig.share_alpha_runs: train binding {b!r} sets the run's length or "
                             "directories, which prefix mode decides; remove it or share_alpha_runs = False")


def trunks(runs: Sequence[Run], original_steps: int) -> list[Trunk]:
    """The shared trainings of the runs with α > 0, one per (G, method, seed)."""
    from gqa_uptrain.train_state import uptrain_steps  # the trainer's own rounding of α x original steps
    groups: dict[tuple[int, str, int], list[tuple[Run, int]]] = {}
    for r in runs:
        if r.alpha > 0:
            groups.setdefault((r.kv_heads, r.method, r.seed), []).append((r, uptrain_steps(r.alpha, original_steps)))
    return [Trunk(g, m, s, tuple(sorted(pts, key=lambda p: (p[1], p[0].alpha)))) for (g, m, s), pts in groups.items()]


def trunk_done_marker(d: pathlib.Path, steps: int) -> pathlib.Path:
    """The marker of a trunk trained to at least `steps` (an existing longer one, else the one to write)."""
    done = [int(p.name[len("train-"):-len(".done")]) for p in d.glob("train-*.done")
            if p.name[len("train-"):-len(".done")].isdigit()]
    return d / f"train-{max([k for k in done if k >= steps], default=steps)}.done"


class KeepStage(Stage):
    """Makes runs/<run_id>/ of one α point from step `step` of the trunk (in-process, no CLI command)."""

    def __init__(self, trunk_dir: pathlib.Path, d: pathlib.Path, run: Run, step: int, trunk_steps: int):
        super().__init__("keep", [], d / "train.done", d / "keep.log", owner=run.run_id)
        self.trunk_dir, self.d, self.run_, self.step, self.trunk_steps = trunk_dir, d, run, step, trunk_steps

    def describe(self) -> str:
        return f"keep step {self.step} of {self.trunk_dir / 'train'} as {self.d / 'train'}"

    def run(self, env: dict[str, str]) -> None:
        if self.done.exists():
            return
        keep_checkpoint(self.trunk_dir, self.d, self.run_, self.step, self.trunk_steps)


def _link_tree(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Copy a directory tree as hard links (no space, and orbax never rewrites a saved step); plain copies where
    the file system cannot link."""
    import shutil

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link)


def keep_checkpoint(trunk_dir: pathlib.Path, d: pathlib.Path, run: Run, step: int, trunk_steps: int) -> None:
    """runs/<run_id>/{converted, train/, trained_in.json, train.done} for the α point `run` from the trunk's
    checkpoint at `step`: train/ is a run directory holding that step only, so `eval --checkpoint`, `train
    --gin.INITIAL_CHECKPOINT` and reuse read it as they read a separately trained run. Written under a temporary
    name and renamed; train.done last, so an interrupted call is redone whole."""
    import shutil

    from gqa_uptrain.checkpoint import TRAIN_CHECKPOINTS_DIR
    from gqa_uptrain.train_state import TRAIN_CONFIG_FILE
    src = trunk_dir / "train"
    ckpt = src / TRAIN_CHECKPOINTS_DIR / str(step)
    if not ckpt.is_dir():
        raise RuntimeError(f"{ckpt} is missing: the shared run {src} did not keep step {step} (delete {trunk_dir} "
                           "to train it again)")
    d.mkdir(parents=True, exist_ok=True)
    for stale in (d / "train.partial", d / "train"):
        if stale.is_symlink():
            stale.unlink()
        elif stale.exists():
            shutil.rmtree(stale)
    tmp = d / "train.partial"
    (tmp / TRAIN_CHECKPOINTS_DIR).mkdir(parents=True)
    for f in ("config.json", "model.gin"):
        shutil.copyfile(src / f, tmp / f)
    trained_in = {"model_dir": str(src), "step": step, "train_steps": trunk_steps}
    # What this directory's own training would have recorded, and where its parameters were really trained.
    tc = json.loads((src / TRAIN_CONFIG_FILE).read_text())
    tc.update(model_dir=str(d / "train"), uptrain_fraction=run.alpha, train_steps=None, save_steps=[],
              resolved_train_steps=step, trained_in=trained_in)
    (tmp / TRAIN_CONFIG_FILE).write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")
    _link_tree(ckpt, tmp / TRAIN_CHECKPOINTS_DIR / str(step))
    tmp.rename(d / "train")
    if not (d / "converted").exists():
        if (d / "converted").is_symlink():
            (d / "converted").unlink()
        (d / "converted").symlink_to(trunk_dir / "converted", target_is_directory=True)
    (d / TRAINED_IN).write_text(json.dumps(trained_in) + "\n")
    (d / "train.done").write_text(time.strftime("%Y-%m-%dT%H:%M:%S") + f" step {step} of {src}\n")


def trunk_stages(cfg: SweepConfig, root: pathlib.Path, trunk: Trunk, original_steps: int,
                 finished: set[str]) -> list[Stage]:
    """The chain of one trunk: convert and train to the largest step a point not in `finished` (done here or
    reused) needs, saving every point's step; then each point's keep and eval stages."""
    td = root / "shared" / trunk.name
    todo = [k for r, k in trunk.points if r.run_id not in finished]
    stages: list[Stage] = []
    if todo:
        steps = max(todo)
        keep = sorted({k for _, k in trunk.points if k <= steps})
        first = trunk.points[0][0]
        stages += [_convert_stage(cfg, first, td / "converted", td / "convert.log"),
                   Stage("train", _train_argv(cfg, td / "converted", td / "train", trunk.seed, original_steps,
                                              [f"--gin.TRAIN_STEPS={steps}",
                                               f"--gin.SAVE_STEPS=({', '.join(map(str, keep))},)"]),
                         trunk_done_marker(td, steps), td / "train.log")]
    for r, k in trunk.points:
        d = root / "runs" / r.run_id
        if r.run_id not in finished:
            stages.append(KeepStage(td, d, r, k, max(todo)))
        for s in eval_stages(cfg, d, d / "train"):
            s.owner = r.run_id
            stages.append(s)
    return stages


def bench_stage(cfg: SweepConfig, root: pathlib.Path, kv_heads: int) -> Stage:
    out = root / "bench" / f"kv{kv_heads}"
    return Stage("bench", _cli() + ["bench", "decode", f"--gin_file={cfg.model_gin_file}", "--kv-heads",
                                    str(kv_heads), "--out", str(out), "--no-hf", *cfg.bench_args],
                 out / "done", root / "bench" / f"kv{kv_heads}.log")


def read_bench(root: pathlib.Path, kv_heads: int) -> dict[str, float]:
    """The decode benchmark row for one G (written by `gqa-uptrain bench decode --out`)."""
    for f in sorted((root / "bench" / f"kv{kv_heads}").glob("decode_*.json")):
        for row in json.loads(f.read_text()).get("ours", []):
            if int(row.get("kv_heads", -1)) == kv_heads:
                return _flatten_metrics(row)
    return {}


def _source_info(path: str) -> tuple[int, int | None]:
    from gqa_uptrain.checkpoint import read_config
    from gqa_uptrain.train import recorded_source_step  # the trainer's own reading of the source's manifest
    cfg = read_config(path)
    step = recorded_source_step(path)
    run_dir = pathlib.Path(path) / "checkpoints"
    if step is None and run_dir.is_dir():  # a training MODEL_DIR: its latest complete step
        steps = [int(p.name) for p in run_dir.iterdir() if p.name.isdigit()]
        step = max(steps) if steps else None
    return cfg.num_heads, (int(step) if step is not None else None)


def sweep_jobs(cfg: SweepConfig, root: pathlib.Path, runs: Sequence[Run], original_steps: int | None,
               reused: Sequence[str] = ()) -> list[tuple[str, list[Stage]]]:
    """The sweep's independent chains of stages: one decode benchmark per G, then one chain per run (with
    share_alpha_runs: per α = 0 run, and one per trunk for the others). `reused`: run ids --reuse links.
    Seed-major: every grid point's first seed runs before any second seed, so a sweep stopped early (or read while
    it runs) has whole grids for its first seeds rather than every seed of its first few points."""
    by_seed = {s: i for i, s in enumerate(cfg.seeds)}
    runs = sorted(runs, key=lambda r: by_seed.get(r.seed, len(by_seed)))  # stable: grid order within a seed
    jobs: list[tuple[str, list[Stage]]] = [(f"bench-kv{g}", [bench_stage(cfg, root, g)])
                                           for g in (cfg.num_kv_heads if cfg.bench else ())]
    if not cfg.share_alpha_runs:
        return jobs + [(r.run_id, run_stages(cfg, root, r, original_steps)) for r in runs]
    jobs += [(r.run_id, run_stages(cfg, root, r, original_steps)) for r in runs if r.alpha == 0]
    finished = {r.run_id for r in runs if r.run_id in reused or _model_done(root / "runs" / r.run_id, r)}
    return jobs + [(f"shared-{t.name}", trunk_stages(cfg, root, t, original_steps, finished))
                   for t in trunks(runs, original_steps)]


def model_key(cfg: SweepConfig, run: Run, original_steps: int | None) -> str:
    """Content address of one run's model: every input that decides the converted and uptrained parameters.
    Two runs with the same key execute the same convert and train commands (up to their output paths)."""
    payload = {"source": str(pathlib.Path(cfg.source_checkpoint).absolute()), "run": dataclasses.asdict(run),
               "convert": list(cfg.convert_args),
               "original_steps": original_steps if run.alpha > 0 else None,
               "train": [cfg.train_gin_file, list(cfg.train_bindings)] if run.alpha > 0 else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def eval_specs(cfg: SweepConfig) -> dict[str, tuple]:
    """Output file name -> the settings that decide it (for a given model)."""
    specs = {"eval.json": (cfg.eval_task, "validation", tuple(cfg.eval_args))}
    specs.update({f"eval_{sp}.json": (cfg.eval_task, sp, tuple(cfg.eval_args)) for sp in cfg.extra_eval_splits})
    if cfg.downstream_task:
        specs["downstream.json"] = (cfg.downstream_task, "validation", tuple(cfg.downstream_args))
    return specs


def _read_spec(root: pathlib.Path) -> tuple[SweepConfig, dict[str, Any]]:
    spec_path = root / "sweep.json"
    if not spec_path.exists():
        raise FileNotFoundError(f"{spec_path} not found: not a sweep directory")
    spec = json.loads(spec_path.read_text())
    return SweepConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()}), spec


def _model_done(d: pathlib.Path, run: Run) -> bool:
    return (d / "converted" / "config.json").exists() and (run.alpha == 0 or (d / "train.done").exists())


def plan_reuse(cfg: SweepConfig, root: pathlib.Path, runs: Sequence[Run], original_steps: int | None,
               reuse: Sequence[str | os.PathLike]) -> dict[str, tuple[pathlib.Path, list[str]]]:
    """run_id -> (the finished run directory in another root with the same model_key, the eval files whose
    settings match too), for runs not already finished here."""
    others = []
    for o in reuse:
        o = pathlib.Path(o).absolute()
        if o == root:
            continue
        ocfg, ospec = _read_spec(o)
        others.append((o, ocfg, ospec["original_steps"]))
    plan: dict[str, tuple[pathlib.Path, list[str]]] = {}
    mine = eval_specs(cfg)
    for run in runs:
        if _model_done(root / "runs" / run.run_id, run):
            continue
        key = model_key(cfg, run, original_steps)
        for o, ocfg, osteps in others:
            od = o / "runs" / run.run_id
            if model_key(ocfg, run, osteps) == key and _model_done(od, run):
                theirs = eval_specs(ocfg)
                files = [f for f, v in mine.items() if theirs.get(f) == v and (od / f).exists()]
                plan[run.run_id] = (od.resolve(), files)
                break
    for g in cfg.num_kv_heads if cfg.bench else ():  # benchmarks depend on the model shape and bench flags only
        mine_b = root / "bench" / f"kv{g}"
        for o, ocfg, _ in others:
            ob = o / "bench" / f"kv{g}"
            if not (mine_b / "done").exists() and (ob / "done").exists() and \
                    (ocfg.model_gin_file, ocfg.bench_args) == (cfg.model_gin_file, cfg.bench_args):
                plan[f"bench-kv{g}"] = (ob.resolve(), [])
                break
    return plan


def apply_reuse(root: pathlib.Path, plan: dict[str, tuple[pathlib.Path, list[str]]]) -> None:
    """Link the reused models and copy the matching evals; a link is made last, so an interrupted reuse leaves
    the run looking unfinished (it is redone or re-linked on the next call), never half-linked as done."""
    import shutil
    for run_id, (od, files) in plan.items():
        if run_id.startswith("bench-"):
            dst = root / "bench" / run_id[len("bench-"):]
            if dst.exists():  # an interrupted earlier attempt: redo it whole
                shutil.rmtree(dst)
            shutil.copytree(od, dst)
            continue
        d = root / "runs" / run_id
        d.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(od / f, d / f)
        if (od / "train.done").exists():
            for sub in ("train", "converted"):
                if not (d / sub).exists():
                    (d / sub).symlink_to(od / sub, target_is_directory=True)
            shutil.copyfile(od / "train.done", d / "train.done")
        elif not (d / "converted").exists():
            (d / "converted").symlink_to(od / "converted", target_is_directory=True)
        (d / "reused_from").write_text(str(od) + "\n")


def run_sweep(cfg: SweepConfig, root: str | os.PathLike, parallel: int = 1, dry_run: bool = False,
              log: Callable[[str], None] = print, launcher: str = "local",
              reuse: Sequence[str | os.PathLike] = ()) -> list[dict[str, Any]]:
    """Run (or with dry_run, list) every stage of the grid not done yet under `root`. `reuse`: other sweep roots
    whose finished runs with the same model_key are linked instead of recomputed (see the module docstring).
    A dry run writes nothing: it checks `root` against an existing sweep.json but does not create one."""
    root = pathlib.Path(root).absolute()
    num_heads, meta_steps = _source_info(cfg.source_checkpoint)
    if cfg.num_heads is not None and cfg.num_heads != num_heads:
        raise ValueError(f"sweep says num_heads={cfg.num_heads} but {cfg.source_checkpoint} has {num_heads}")
    original_steps = cfg.original_steps if cfg.original_steps is not None else meta_steps
    if original_steps is None and any(a > 0 for a in cfg.alphas):
        raise ValueError(f"cannot size uptraining: set original_steps; {cfg.source_checkpoint} records no step")
    if cfg.share_alpha_runs:
        check_share_alpha_runs(cfg, launcher)
    runs = expand_grid(cfg, num_heads)
    spec = {"config": dataclasses.asdict(cfg), "num_heads": num_heads, "original_steps": original_steps}
    spec_path = root / "sweep.json"
    grown: list[str] = []
    if spec_path.exists():
        old_cfg, old = _read_spec(root)  # read through SweepConfig: fields added since it was written get defaults
        old = {**old, "config": dataclasses.asdict(old_cfg)}
        if _identity(old) != _identity(spec):
            raise ValueError(f"{root} holds a different sweep (see {spec_path}); use another directory")
        grown = grid_growth(old_cfg, cfg, root)
    plan = plan_reuse(cfg, root, runs, original_steps, reuse)
    jobs = sweep_jobs(cfg, root, runs, original_steps, reused=list(plan))
    if not dry_run or launcher == "slurm":  # a SLURM dry run writes its job scripts (and nothing else)
        root.mkdir(parents=True, exist_ok=True)
    if not dry_run:
        if not spec_path.exists() or grown:
            from gqa_uptrain.checkpoint import atomic_write_text
            atomic_write_text(spec_path, json.dumps(spec, indent=2) + "\n")
        if grown:
            log(f"sweep {root}: grid extended ({'; '.join(grown)})")
        apply_reuse(root, plan)
        if plan:
            log(f"sweep {root}: reused {len(plan)} finished runs/benchmarks from {', '.join(str(r) for r in reuse)}")
    if launcher == "slurm":
        log(f"sweep {root}: {len(runs)} runs, {len(cfg.num_kv_heads) if cfg.bench else 0} benchmarks, as SLURM jobs")
        submit_slurm(root, jobs, dry_run=dry_run, log=log)
        return []
    if launcher != "local":
        raise ValueError(f"unknown launcher {launcher!r}: expected local or slurm")
    n_bench = len(cfg.num_kv_heads) if cfg.bench else 0
    shared = sum(name.startswith("shared-") for name, _ in jobs)
    log(f"sweep {root}: {len(runs)} runs{f' ({shared} shared trainings)' if shared else ''}, {n_bench} decode "
        f"benchmarks, {parallel} at a time")
    env = dict(os.environ)
    if dry_run:
        for name, stages in jobs:
            for owner in dict.fromkeys(s.owner or name for s in stages):
                if owner in plan:
                    od, files = plan[owner]
                    log(f"[{owner}] reuse: {od} (model{''.join(', ' + f for f in files)})")
            for s in stages:
                owner = s.owner or name
                done = s.done.exists() or (owner in plan and (s.name in ("convert", "train", "bench", "keep") or
                                                              s.done.name in plan[owner][1]))
                log(f"[{owner}] {'done' if done else 'todo'}: {s.describe()}")
        return []
    failures: list[str] = []

    def work(item: tuple[str, list[Stage]]) -> None:
        name, stages = item
        t0 = time.time()
        for s in stages:
            if s.done.exists():
                continue
            log(f"[{name}] {s.name}{' ' + s.owner if s.owner else ''} ...")
            s.run(env)
        log(f"[{name}] complete ({time.time() - t0:.0f}s)")

    from tqdm import tqdm
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {pool.submit(work, j): j[0] for j in jobs}
        for fut in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="sweep", unit="run"):
            try:
                fut.result()
            except RuntimeError as e:
                failures.append(f"{futures[fut]}: {e}")
                log(f"[{futures[fut]}] FAILED: {e}")
    rows = aggregate(root)
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(jobs)} jobs failed (completed ones are kept; re-run to "
                           f"retry):\n  " + "\n  ".join(failures))
    return rows


# The axes of the grid. A root may grow along them (more G, methods, α or seeds); everything else is what each run
# is, so it must match exactly.
GRID_AXES = ("num_kv_heads", "methods", "alphas", "seeds")


def _identity(spec: dict[str, Any]) -> Any:
    """What makes two sweep.json files the same sweep: everything but the grid axes and share_alpha_runs, which
    changes how the runs are trained, not what they are (a root may be finished with or without it)."""
    spec = json.loads(json.dumps(spec))
    for k in ("share_alpha_runs", *GRID_AXES):
        spec["config"].pop(k, None)
    return spec


def grid_growth(old: SweepConfig, new: SweepConfig, root: pathlib.Path) -> list[str]:
    """How `new` extends the grid recorded in `root` ("num_kv_heads +4", ...; empty when equal). A run's directory
    depends only on its grid point and the settings _identity compares, so adding points leaves finished runs
    valid. Dropping points is refused: the root's results would silently lose rows."""
    def values(vs) -> str:
        return ", ".join(v if isinstance(v, str) else f"{v:g}" for v in vs)

    grown, dropped = [], []
    for axis in GRID_AXES:
        before, after = getattr(old, axis), getattr(new, axis)
        if set(before) - set(after):
            dropped.append(f"{axis} {values(v for v in before if v not in after)}")
        if set(after) - set(before):
            grown.append(f"{axis} + {values(v for v in after if v not in before)}")
    if dropped:
        raise ValueError(f"{root} holds a larger grid: this sweep drops {'; '.join(dropped)} (a root's grid can "
                         f"only grow; keep those values, or use another directory)")
    if old.share_alpha_runs and new.share_alpha_runs and set(new.alphas) - set(old.alphas):
        raise ValueError(f"{root} trains each model once for all its alphas (share_alpha_runs): new alphas "
                         f"{sorted(set(new.alphas) - set(old.alphas))} would need checkpoints its shared runs did "
                         f"not save; use another directory")
    return grown


# ------------------------------------------------------------------------------------------- SLURM launcher
# Each chain (a run's convert -> train -> eval -> downstream, or one benchmark) becomes SLURM jobs chained with
# afterok; the job scripts, job ids and logs sit next to the stage logs (gqa_uptrain/launch.py).


def jobs_of(root: str | os.PathLike) -> list[tuple[str, list[Stage]]]:
    """The chains of an existing sweep directory, from its sweep.json."""
    root = pathlib.Path(root).absolute()
    cfg, spec = _read_spec(root)
    if cfg.share_alpha_runs:
        raise ValueError(f"{root} is a share_alpha_runs sweep, which runs with the local launcher only: it has no "
                         "SLURM jobs (re-run it locally to continue it)")
    return sweep_jobs(cfg, root, expand_grid(cfg, spec["num_heads"]), spec["original_steps"])


def slurm_chains(jobs: Sequence[tuple[str, list[Stage]]]):
    from gqa_uptrain import launch
    return [[launch.JobSpec(f"{name}/{s.name}", s.name, tuple(s.argv), s.done, s.log,
                            launch.resources_for(s.name)) for s in stages] for name, stages in jobs]


def submit_slurm(root: pathlib.Path, jobs: Sequence[tuple[str, list[Stage]]], dry_run: bool = False,
                 log: Callable[[str], None] = print) -> list[str]:
    """Submit every stage that is not done, queued or running; then a job that aggregates after the last one.
    Returns the ids of the sweep's queued/running jobs."""
    from gqa_uptrain import launch
    chains = slurm_chains(jobs)
    states = launch.job_states(launch.recorded_ids(chains))
    workdir = os.getcwd()
    statuses = [st for c in chains for st in launch.submit_chain(c, states, workdir, log=log, dry_run=dry_run)]
    active = [s.job_id for s in statuses if s.active and s.job_id]
    if dry_run:
        return []
    if active:
        jid = launch.submit_aggregation(root / "aggregate.sbatch", [*_cli(), "sweep", "--root", str(root),
                                                                    "--aggregate_only"], active, workdir)
        log(f"{len(active)} jobs queued or running; aggregation job {jid} runs after them "
            f"(follow with: gqa-uptrain sweep --root {root} --status)")
    else:
        aggregate(root)
        log(f"nothing to submit: every stage is done. results: {root}/results.md")
    return active


def slurm_status(root: str | os.PathLike):
    from gqa_uptrain import launch
    return launch.chain_status(slurm_chains(jobs_of(root)))


def slurm_wait(root: str | os.PathLike, poll_s: float = 30.0, log: Callable[[str], None] = print):
    """Wait until no stage is queued or running, then aggregate what finished."""
    from gqa_uptrain import launch
    statuses = launch.wait(slurm_chains(jobs_of(root)), poll_s=poll_s, log=log)
    aggregate(root)
    return statuses


# ---------------------------------------------------------------------------------------------- aggregation

def _flatten_metrics(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def collect_rows(root: pathlib.Path) -> list[dict[str, Any]]:
    cfg, spec = _read_spec(root)
    bench = {}
    for g in cfg.num_kv_heads:
        bench[g] = read_bench(root, g)
    rows = []
    for run in expand_grid(cfg, spec["num_heads"]):
        d = root / "runs" / run.run_id
        if not (d / "eval.json").exists():
            continue
        row: dict[str, Any] = {"run_id": run.run_id, "kv_heads": run.kv_heads, "method": run.method,
                               "alpha": run.alpha, "seed": run.seed,
                               "kind": attention_kind(run.kv_heads, spec["num_heads"])}
        row.update({f"eval.{k}": v for k, v in _flatten_metrics(json.loads((d / "eval.json").read_text())).items()})
        for split in cfg.extra_eval_splits:
            if (d / f"eval_{split}.json").exists():
                row.update({f"eval_{split}.{k}": v for k, v in
                            _flatten_metrics(json.loads((d / f"eval_{split}.json").read_text())).items()})
        if (d / "downstream.json").exists():
            row.update({f"downstream.{k}": v
                        for k, v in _flatten_metrics(json.loads((d / "downstream.json").read_text())).items()})
        row.update({f"bench.{k}": v for k, v in bench.get(run.kv_heads, {}).items()})
        rows.append(row)
    return rows


def attention_kind(g: int, h: int) -> str:
    return "MHA" if g == h else "MQA" if g == 1 else f"GQA-{g}"


def summarise(rows: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Mean and sample standard deviation of `metric` over seeds for each (kv_heads, method, alpha)."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if metric in r and not math.isnan(r[metric]):
            groups.setdefault((r["kv_heads"], r["method"], r["alpha"]), []).append(r[metric])
    out = []
    for (g, m, a), vals in sorted(groups.items()):
        out.append({"kv_heads": g, "method": m, "alpha": a, "n": len(vals), "mean": statistics.fmean(vals),
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0})
    return out


def aggregate(root: str | os.PathLike, metric: str | None = None) -> list[dict[str, Any]]:
    """Write results.csv, results.md and plots from whatever runs have finished."""
    root = pathlib.Path(root)
    rows = collect_rows(root)
    if not rows:
        return rows
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k.split(".")[0] not in ("run_id", "kind"), k))
    with open(root / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    metric = metric or _default_metric(rows)
    summary = summarise(rows, metric)
    num_heads = json.loads((root / "sweep.json").read_text())["num_heads"]
    lines = [f"# Sweep results ({root.name})", "", f"Metric: `{metric}` (mean ± sample std over seeds, n runs).", "",
             "| model | method | α | n | mean | std |", "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {attention_kind(s['kv_heads'], num_heads)} | {s['method']} | {s['alpha']:g} | {s['n']} | "
                     f"{s['mean']:.4f} | {s['std']:.4f} |")
    tps = _time_per_sample(rows)
    if tps:
        lines += ["", "| model | time per sample (s) |", "|---|---|"]
        lines += [f"| {attention_kind(g, num_heads)} | {t:.4f} |" for g, t in sorted(tps.items())]
    (root / "results.md").write_text("\n".join(lines) + "\n")
    plot(rows, summary, metric, num_heads, root)
    return rows


def _default_metric(rows: Sequence[dict[str, Any]]) -> str:
    for k in ("eval.metrics.loss", "eval.loss"):
        if any(k in r for r in rows):
            return k
    cands = sorted(k for r in rows for k in r if k.startswith("eval."))
    if not cands:
        raise ValueError("no eval metrics found in the runs' eval.json files")
    return cands[0]


def metric_label(metric: str) -> str:
    """An axis label for a results.csv column: the loss columns in words and units, others as they are."""
    for prefix, what in (("eval.", "validation"), ("downstream.", "downstream")):
        if metric == f"{prefix}metrics.loss":
            return f"{what} loss (nats/target token)"
    if metric.startswith("eval_") and metric.endswith(".metrics.loss"):
        return f"{metric[len('eval_'):-len('.metrics.loss')]} held-out loss (nats/target token)"
    return metric


def _time_per_sample(rows: Sequence[dict[str, Any]]) -> dict[int, float]:
    out = {}
    for r in rows:
        for k in ("bench.time_per_sample_s", "bench.time_per_sample"):
            if k in r:
                out[r["kv_heads"]] = r[k]
    return out


def plot(rows, summary, metric: str, num_heads: int, root: pathlib.Path) -> list[pathlib.Path]:
    """The paper's figure shapes: quality vs time (Fig. 3), method (Fig. 4), α (Fig. 5), time vs G (Fig. 6)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    alphas = sorted({s["alpha"] for s in summary})
    tps = _time_per_sample(rows)

    def save(fig, name):
        p = root / name
        fig.tight_layout()
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p)

    if tps:
        top = max(alphas)
        pts = [s for s in summary if s["alpha"] == top and s["method"] == "mean" and s["kv_heads"] in tps]
        if pts:
            fig, ax = plt.subplots(figsize=(5, 4))
            for s in pts:
                ax.errorbar(tps[s["kv_heads"]], s["mean"], yerr=s["std"], fmt="o", capsize=3)
                ax.annotate(attention_kind(s["kv_heads"], num_heads), (tps[s["kv_heads"]], s["mean"]),
                            textcoords="offset points", xytext=(5, 5))
            ax.set(xlabel="time per sample (s)", ylabel=metric_label(metric), title=f"quality vs time (α={top:g})")
            save(fig, "quality_vs_time.png")
        fig, ax = plt.subplots(figsize=(5, 4))
        gs = sorted(tps)
        ax.plot(gs, [tps[g] for g in gs], "o-")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="KV groups G", ylabel="time per sample (s)", title="time per sample vs groups")
        save(fig, "time_vs_groups.png")
    methods = sorted({s["method"] for s in summary})
    if len(methods) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for a in alphas:
            pts = [s for s in summary if s["alpha"] == a and s["kv_heads"] != num_heads]
            gs = sorted({s["kv_heads"] for s in pts})
            for g in gs:
                sel = [next((s for s in pts if s["method"] == m and s["kv_heads"] == g), None) for m in methods]
                xs = [i for i, s in enumerate(sel) if s]
                ax.errorbar(xs, [sel[i]["mean"] for i in xs], yerr=[sel[i]["std"] for i in xs], fmt="o-",
                            capsize=3, label=f"{attention_kind(g, num_heads)} α={a:g}")
        ax.set_xticks(range(len(methods)), methods)
        ax.set(xlabel="conversion method", ylabel=metric_label(metric), title="conversion method")
        ax.legend(fontsize=7)
        save(fig, "methods.png")
    if len(alphas) > 1:
        fig, ax = plt.subplots(figsize=(5, 4))
        for g in sorted({s["kv_heads"] for s in summary}):
            pts = sorted((s for s in summary if s["kv_heads"] == g and s["method"] == "mean"),
                         key=lambda s: s["alpha"])
            if pts:
                ax.errorbar([s["alpha"] for s in pts], [s["mean"] for s in pts], yerr=[s["std"] for s in pts],
                            fmt="o-", capsize=3, label=attention_kind(g, num_heads))
        ax.set(xlabel="uptraining fraction α", ylabel=metric_label(metric), title="quality vs uptraining")
        ax.legend()
        save(fig, "quality_vs_alpha.png")
    return written

"""Launchers: where a sweep's stages (and a single `train`) run.

`local` runs them as subprocesses on this machine (gqa_uptrain/sweep.py's Stage.run). `slurm` writes each stage
as a readable sbatch script next to its log and submits it with `sbatch --parsable`, chained to the stage before it
with `--dependency=afterok:<job id>`. Nothing is scheduled by us: SLURM queues, runs, requeues and reports.

Per stage, in its run directory (for a stage whose log is `DIR/<stage>.log`):
  DIR/<stage>.sbatch   the job script (resubmit by hand: `sbatch DIR/<stage>.sbatch`)
  DIR/<stage>.log      the job's output, appended across requeues
  DIR/<stage>.job      JSON with the SLURM job id (and earlier ones), so a re-run never submits it twice

Resources come from gin, per stage scope (convert/train/eval/bench; downstream uses eval's, the sweep's aggregation
job the unscoped values), e.g. `train/SlurmResources.nodes = 4`; unscoped bindings apply to every stage
(configs/slurm/gpu_example.gin).

Preemption: jobs are `--requeue`able and asked for `--signal=USR1@N` (N seconds before the time limit). SLURM
delivers that signal, and the SIGTERM of `scancel`/preemption, to the srun step, i.e. to the trainer, which writes a
checkpoint and exits with preemption.PREEMPTED_EXIT_CODE; the script then requeues its own job, and the requeued
job resumes from the checkpoint (the trainer resumes by itself).
"""
from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time
from typing import Callable, Iterable, Mapping, Sequence

from gqa_uptrain.preemption import PREEMPTED_EXIT_CODE

LAUNCHERS = ("local", "slurm")
RESOURCE_SCOPES = ("convert", "train", "eval", "bench")
_SCOPE_OF = {"downstream": "eval"}
# Stages that run one process per task of the allocation (multi-host JAX); the others run one process.
MULTI_TASK_STAGES = ("train",)

# squeue/sacct states, grouped by what a re-run should do with the stage.
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "STOPPED"}
# A pending job whose afterok dependency failed: SLURM keeps it queued forever unless the cluster runs with
# kill_invalid_depend; either way it will never run.
BLOCKED_REASON = "DependencyNeverSatisfied"


class SlurmError(ValueError):
    """A SLURM command refused (bad partition/account, controller down): one clear CLI error line, like bad input."""


@dataclasses.dataclass(frozen=True)
class SlurmResources:
    """#SBATCH resources of one stage's job. None leaves the cluster's default."""

    partition: str | None = None
    nodes: int = 1
    ntasks_per_node: int = 1  # processes per node: 1 (one JAX process drives all local GPUs) or one per GPU
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem: str | None = None  # per node, sbatch syntax: "64G"
    time: str | None = None  # sbatch syntax: "2-00:00:00", "30:00"
    account: str | None = None
    extra: tuple[str, ...] = ()  # further sbatch options, one per #SBATCH line, e.g. ("--constraint=a100",)
    requeue: bool = True
    signal_before_limit_s: int = 120  # SIGUSR1 this long before the time limit: time to write a checkpoint

    def __post_init__(self) -> None:
        for name in ("nodes", "ntasks_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"SlurmResources.{name} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0 or (self.cpus_per_task is not None and self.cpus_per_task < 1):
            raise ValueError(f"SlurmResources: bad gpus_per_node={self.gpus_per_node} / "
                             f"cpus_per_task={self.cpus_per_task}")
        for e in self.extra:
            if not str(e).startswith("-"):
                raise ValueError(f"SlurmResources.extra entries are sbatch options like '--qos=high', got {e!r}")

    def sbatch_lines(self) -> list[str]:
        opts = [f"--nodes={self.nodes}", f"--ntasks-per-node={self.ntasks_per_node}"]
        if self.gpus_per_node:
            opts.append(f"--gpus-per-node={self.gpus_per_node}")
        for flag, value in (("cpus-per-task", self.cpus_per_task), ("mem", self.mem), ("time", self.time),
                            ("partition", self.partition), ("account", self.account)):
            if value is not None:
                opts.append(f"--{flag}={value}")
        if self.requeue:
            opts += ["--requeue", f"--signal=USR1@{self.signal_before_limit_s}"]
        else:
            opts.append("--no-requeue")
        return [f"#SBATCH {o}" for o in (*opts, *self.extra)]


def register_gin() -> None:
    from gqa_uptrain.gin_utils import configurable_dataclass
    configurable_dataclass(SlurmResources)


def resources_for(stage: str) -> SlurmResources:
    """The stage's resources from the parsed gin config (scope `stage/`, falling back to unscoped bindings)."""
    import gin

    from gqa_uptrain.gin_utils import build_dataclass
    register_gin()
    scope = _SCOPE_OF.get(stage, stage)
    if scope in RESOURCE_SCOPES:
        with gin.config_scope(scope):
            return build_dataclass(SlurmResources)
    return build_dataclass(SlurmResources)


def add_launcher_argument(parser: argparse.ArgumentParser, where: str) -> None:
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help=f"local: run here (default); slurm: write an sbatch script ({where}) and submit it")


def slurm_task_count() -> int:
    """Tasks of the srun step this process belongs to (0 outside one). SLURM_STEP_NUM_TASKS is set for srun steps
    only, not in the batch script, which must not join a jax.distributed cluster."""
    try:
        return int(os.environ.get("SLURM_STEP_NUM_TASKS", "0"))
    except ValueError:
        return 0


# ---------------------------------------------------------------------------------------------------- scripts


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One stage as a job: its command, files, and resources."""

    name: str  # e.g. "kv2-mean-a0.05-s0/train"
    stage: str
    argv: tuple[str, ...]
    done: pathlib.Path  # exists once the stage succeeded
    log: pathlib.Path
    resources: SlurmResources

    @property
    def script(self) -> pathlib.Path:
        return self.log.with_suffix(".sbatch")

    @property
    def job_file(self) -> pathlib.Path:
        return self.log.with_suffix(".job")


def job_script(job: JobSpec, workdir: str | os.PathLike) -> str:
    """The sbatch script for a stage: resources, then the command under srun, then exit-code handling."""
    r = job.resources
    srun = ["srun", "--kill-on-bad-exit=1"]
    if job.stage not in MULTI_TASK_STAGES:
        srun += ["--nodes=1", "--ntasks=1"]
    done = shlex.quote(str(job.done))
    lines = [
        "#!/bin/bash",
        f"# gqa-uptrain {job.stage} stage of {job.name}, written by the slurm launcher (gqa_uptrain/launch.py).",
        f"# Resubmit by hand: sbatch {shlex.quote(str(job.script))}",
        f"#SBATCH --job-name=gqa:{job.name}",
        f"#SBATCH --output={job.log}",
        "#SBATCH --open-mode=append",  # requeued runs append to the same log
        *r.sbatch_lines(),
        "",
        "set -uo pipefail",
        f"cd {shlex.quote(str(workdir))}",
        'echo "== $(date -u +%FT%TZ) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
        f"echo {shlex.quote('$ ' + shlex.join(job.argv))}",
        shlex.join([*srun, *job.argv]),
        "rc=$?",
        f"if [ $rc -eq {PREEMPTED_EXIT_CODE} ]; then",
        '  # The trainer saved a checkpoint on SIGTERM/SIGUSR1; the requeued job resumes from it.',
        '  echo "== stopped early (checkpoint written): requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
        'if [ $rc -ne 0 ]; then echo "== failed with exit $rc"; exit $rc; fi',
        # Stages whose output is a file mark themselves; the others get a marker (as the local launcher does).
        f"[ -e {done} ] || date -u +%FT%TZ > {done}",
        'echo "== $(date -u +%FT%TZ) done"',
        "",
    ]
    return "\n".join(lines)


def write_script(job: JobSpec, workdir: str | os.PathLike | None = None) -> pathlib.Path:
    job.script.parent.mkdir(parents=True, exist_ok=True)
    job.script.write_text(job_script(job, workdir or os.getcwd()))
    return job.script


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    except FileNotFoundError:
        raise FileNotFoundError(f"{cmd[0]} not found: the slurm launcher needs the SLURM client commands "
                                "(sbatch, squeue) on PATH") from None


def sbatch(script: pathlib.Path, after_ok: Sequence[str] = (), after_any: Sequence[str] = ()) -> str:
    """Submit; returns the job id."""
    cmd = ["sbatch", "--parsable"]
    deps = ([f"afterok:{':'.join(after_ok)}"] if after_ok else []) + (
        [f"afterany:{':'.join(after_any)}"] if after_any else [])
    if deps:
        cmd.append(f"--dependency={','.join(deps)}")
    p = _run([*cmd, str(script)])
    if p.returncode != 0:
        raise SlurmError(f"sbatch {script} failed (exit {p.returncode}): {p.stderr.strip()}")
    return p.stdout.strip().split(";")[0]  # "<id>[;<cluster>]"


def read_job_id(job_file: pathlib.Path) -> str | None:
    try:
        return str(json.loads(job_file.read_text())["job_id"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def record_job(job_file: pathlib.Path, job_id: str, script: pathlib.Path) -> None:
    previous: list[str] = []
    if job_file.exists():
        try:
            old = json.loads(job_file.read_text())
            previous = [*old.get("previous", []), str(old["job_id"])]
        except (ValueError, KeyError):
            pass
    job_file.write_text(json.dumps({"job_id": job_id, "script": str(script), "previous": previous,
                                    "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1) + "\n")


def job_states(job_ids: Iterable[str]) -> dict[str, tuple[str, str]]:
    """{job id: (STATE, reason)} from squeue (jobs still in the controller's memory, MinJobAge), then sacct for
    the rest where accounting is enabled. Ids SLURM no longer knows are absent."""
    ids = {str(j) for j in job_ids if j}
    if not ids:
        return {}
    out: dict[str, tuple[str, str]] = {}
    p = _run(["squeue", "-h", "-t", "all", "-u", getpass.getuser(), "-o", "%i|%T|%r"])
    if p.returncode != 0:
        raise SlurmError(f"squeue failed (exit {p.returncode}): {p.stderr.strip()}")
    for line in p.stdout.splitlines():
        jid, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if jid in ids:
            out[jid] = (state, reason)
    missing = sorted(ids - set(out))
    if missing:
        p = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(missing), "-o", "JobID,State"])
        if p.returncode == 0:  # clusters without slurmdbd have no sacct: those ids stay unknown
            for line in p.stdout.splitlines():
                jid, _, state = line.strip().partition("|")
                if jid in missing and state:
                    out[jid] = (state.split()[0], "")  # "CANCELLED by 0" -> CANCELLED
    return out


@dataclasses.dataclass(frozen=True)
class StageStatus:
    job: JobSpec
    state: str  # done | queued | running | blocked | failed | not submitted
    job_id: str | None = None
    slurm_state: str = ""
    detail: str = ""

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")


def _last_line(path: pathlib.Path) -> str:
    try:
        lines = [l for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except FileNotFoundError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"


def stage_status(job: JobSpec, states: Mapping[str, tuple[str, str]]) -> StageStatus:
    if job.done.exists():
        return StageStatus(job, "done", read_job_id(job.job_file), "COMPLETED")
    jid = read_job_id(job.job_file)
    if jid is None:
        return StageStatus(job, "not submitted")
    state, reason = states.get(jid, ("", ""))
    if state in ACTIVE_STATES:
        if reason == BLOCKED_REASON:
            return StageStatus(job, "blocked", jid, state, "an earlier stage failed")
        return StageStatus(job, "running" if state in ("RUNNING", "COMPLETING") else "queued", jid, state, reason)
    if state == "COMPLETED":
        detail = f"job completed but {job.done.name} is missing; see {job.log}"
    elif not state:
        detail = f"job {jid} is no longer known to SLURM and {job.done.name} is missing; see {job.log}"
    else:
        detail = f"see {job.log}: {_last_line(job.log)}"
    return StageStatus(job, "failed", jid, state or "UNKNOWN", detail)


def scancel(job_id: str) -> None:
    _run(["scancel", job_id])


def chain_statuses(jobs: Sequence[JobSpec], states: Mapping[str, tuple[str, str]]) -> list[StageStatus]:
    """Each stage's status, with every unfinished stage after a failed or blocked one marked blocked: SLURM only
    says DependencyNeverSatisfied for the direct dependant, the ones after it wait on a job that never runs."""
    out: list[StageStatus] = []
    for job in jobs:
        st = stage_status(job, states)
        prev = out[-1] if out else None
        if prev is not None and prev.state in ("failed", "blocked") and st.state in ("queued", "blocked"):
            st = StageStatus(job, "blocked", st.job_id, st.slurm_state, f"after {prev.state} {prev.job.stage}")
        out.append(st)
    return out


def submit_chain(jobs: Sequence[JobSpec], states: Mapping[str, tuple[str, str]], workdir: str | os.PathLike,
                 log: Callable[[str], None] = print, dry_run: bool = False) -> list[StageStatus]:
    """Submit the stages of one run that are not done, queued or running, each after the one before it.

    A stage that failed, or is blocked behind a failed one, is submitted again (a blocked job is cancelled
    first: it could never start), and so is every stage after a resubmitted one, whose dependency must point at
    the new job. Returns each stage's status after submission."""
    after: str | None = None  # the job the next stage must wait for
    resubmitting = False
    out = []
    for st in chain_statuses(jobs, states):
        job = st.job
        if st.state == "done":
            after = None
        elif st.active and not resubmitting:
            after = st.job_id
        else:
            write_script(job, workdir)
            if dry_run:
                log(f"[{job.name}] would submit {job.script}" + (f" after job {after}" if after else ""))
                out.append(st)
                continue
            if st.job_id and st.state in ("blocked", "queued", "running"):
                scancel(st.job_id)
            resubmitting = True
            jid = sbatch(job.script, after_ok=[after] if after else [])
            record_job(job.job_file, jid, job.script)
            log(f"[{job.name}] submitted job {jid}" + (f" (after {after})" if after else "")
                + (f", replacing {st.state} job {st.job_id}" if st.job_id else ""))
            st = StageStatus(job, "queued", jid, "PENDING")
            after = jid
        out.append(st)
    return out


def recorded_ids(chains: Iterable[Sequence[JobSpec]]) -> list[str]:
    return [j for c in chains for job in c if (j := read_job_id(job.job_file))]


def chain_status(chains: Sequence[Sequence[JobSpec]]) -> list[StageStatus]:
    states = job_states(recorded_ids(chains))
    return [st for c in chains for st in chain_statuses(c, states)]


def format_status(statuses: Sequence[StageStatus]) -> str:
    """One line per stage: run/stage, state, SLURM job and state; failures name the job and its log."""
    width = max((len(s.job.name) for s in statuses), default=10)
    lines = []
    for s in statuses:
        job = f"job {s.job_id} {s.slurm_state}".strip() if s.job_id else ""
        lines.append(f"{s.job.name:<{width}}  {s.state:<13}  {job}" + (f"  {s.detail}" if s.detail else ""))
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return "\n".join(lines)


def wait(chains: Sequence[Sequence[JobSpec]], poll_s: float = 30.0,
         log: Callable[[str], None] = print) -> list[StageStatus]:
    """Poll until no stage is queued or running (blocked stages never start, so they do not count)."""
    last = ""
    while True:
        statuses = chain_status(chains)
        summary = format_status(statuses).splitlines()[-1]
        if summary != last:
            log(f"{time.strftime('%H:%M:%S')} {summary}")
            last = summary
        if not any(s.active for s in statuses):
            return statuses
        time.sleep(poll_s)


def submit_aggregation(script: pathlib.Path, argv: Sequence[str], after: Sequence[str],
                       workdir: str | os.PathLike) -> str:
    """A small job that rebuilds the sweep's tables once every submitted stage has ended (afterany: partial
    results are still worth a table). A still-pending aggregation job from an earlier submission is replaced."""
    job = JobSpec("aggregate", "aggregate", tuple(argv), script.with_suffix(".done"), script.with_suffix(".log"),
                  dataclasses.replace(resources_for("aggregate"), nodes=1, ntasks_per_node=1, gpus_per_node=0,
                                      requeue=False))
    old = read_job_id(job.job_file)
    if old and job_states([old]).get(old, ("", ""))[0] in ACTIVE_STATES:
        scancel(old)
    job.done.unlink(missing_ok=True)
    write_script(job, workdir)
    jid = sbatch(job.script, after_any=after)
    record_job(job.job_file, jid, job.script)
    return jid


# ---------------------------------------------------------------------------------------------- single train


def train_argv(args: argparse.Namespace) -> list[str]:
    """`gqa-uptrain train ...` as the job runs it: the same gin files and overrides, launcher local."""
    argv = [sys.executable, "-m", "gqa_uptrain", "train"]
    argv += [f"--gin_file={f}" for f in args.gin_file or []]
    argv += [f"--gin_search_paths={d}" for d in args.gin_search_paths]
    for b in args.gin_bindings:  # 'NAME = value' -> --gin.NAME=value
        name, _, value = b.partition("=")
        argv.append(f"--gin.{name.strip()}={value.strip()}")
    if args.cpu_devices:
        argv.append(f"--cpu_devices={args.cpu_devices}")
    argv.append("--no_progress")  # a progress bar in a log file is noise; metrics.jsonl has the numbers
    return argv


def submit_train(args: argparse.Namespace, model_dir: str, log: Callable[[str], None] = print) -> str | None:
    """Write MODEL_DIR/train.sbatch and submit it, unless MODEL_DIR's train job is already queued or running."""
    d = pathlib.Path(model_dir).absolute()
    d.mkdir(parents=True, exist_ok=True)
    job = JobSpec(d.name, "train", tuple(train_argv(args)), d / "train.done", d / "train.log", resources_for("train"))
    states = job_states(recorded_ids([[job]]))
    st = stage_status(job, states)
    if st.state == "done" or st.active:
        log(f"{d}: train {st.state}" + (f" (job {st.job_id} {st.slurm_state})" if st.job_id else "")
            + f"; not resubmitted (delete {job.done} to train further)" * (st.state == "done"))
        return st.job_id
    st = submit_chain([job], states, os.getcwd(), log=lambda m: None)[0]
    log(f"submitted job {st.job_id}: {job.script} (log {job.log})")
    return st.job_id

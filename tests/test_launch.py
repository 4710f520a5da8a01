"""The slurm launcher without SLURM: job scripts, resources from gin scopes, dependency chaining, and which stages a
re-run submits again. The scripts themselves are executed with stand-in srun/scontrol to check their exit-code
handling (requeue on the preemption exit code, done marker on success only). Live SLURM: tests/test_slurm.py."""
import os
import pathlib
import stat
import subprocess

import pytest

from gqa_uptrain import launch
from gqa_uptrain.launch import JobSpec, SlurmResources
from gqa_uptrain.preemption import PREEMPTED_EXIT_CODE

REPO = pathlib.Path(__file__).resolve().parent.parent


def _job(d: pathlib.Path, stage: str, res: SlurmResources = SlurmResources(), argv=("python", "-m", "x")) -> JobSpec:
    return JobSpec(f"run/{stage}", stage, tuple(argv), d / f"{stage}.done", d / f"{stage}.log", res)


def test_script_has_resources_srun_and_requeue_handling(tmp_path):
    res = SlurmResources(partition="gpu", nodes=4, ntasks_per_node=8, gpus_per_node=8, cpus_per_task=12, mem="0",
                         time="2-00:00:00", account="lab", extra=("--qos=high", "--exclusive"))
    text = launch.job_script(_job(tmp_path, "train", res, ("python", "-m", "gqa_uptrain", "train", "--gin.X='a b'")),
                             "/work dir")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --mem=0", "#SBATCH --time=2-00:00:00",
                 "#SBATCH --partition=gpu", "#SBATCH --account=lab", "#SBATCH --qos=high", "#SBATCH --exclusive",
                 "#SBATCH --requeue", "#SBATCH --signal=USR1@120", f"#SBATCH --output={tmp_path}/train.log",
                 "#SBATCH --open-mode=append", "cd '/work dir'"):
        assert line in text.splitlines(), line
    # train runs on every task of the allocation; other stages as one process; arguments stay quoted.
    assert "srun --kill-on-bad-exit=1 python -m gqa_uptrain train '--gin.X='\"'\"'a b'\"'\"''" in text
    single = launch.job_script(_job(tmp_path, "eval", SlurmResources(requeue=False)), "/w")
    assert "srun --kill-on-bad-exit=1 --nodes=1 --ntasks=1 python -m x" in single
    assert "#SBATCH --no-requeue" in single and "--signal" not in single
    with pytest.raises(ValueError, match="SlurmResources.nodes must be >= 1"):
        SlurmResources(nodes=0)
    with pytest.raises(ValueError, match="extra entries are sbatch options"):
        SlurmResources(extra=("qos=high",))


def _fake_bin(d: pathlib.Path, name: str, body: str) -> None:
    p = d / name
    p.write_text("#!/bin/bash\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("rc,requeued,done", [(0, False, True), (PREEMPTED_EXIT_CODE, True, False), (3, False, False)])
def test_script_requeues_on_preemption_code_and_marks_success(tmp_path, rc, requeued, done):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_bin(bin_dir, "srun", f'echo "srun $*"; exit {rc}')
    _fake_bin(bin_dir, "scontrol", f'echo "$*" > {tmp_path}/scontrol')
    job = _job(tmp_path, "train")
    script = launch.write_script(job, tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "n1"}
    p = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert p.returncode == (0 if rc in (0, PREEMPTED_EXIT_CODE) else rc), p.stdout + p.stderr
    assert "srun --kill-on-bad-exit=1 python -m x" in p.stdout
    assert ((tmp_path / "scontrol").exists() and (tmp_path / "scontrol").read_text().strip() == "requeue 42") \
        == requeued
    assert job.done.exists() == done


def test_resources_come_from_gin_scopes():
    import gin

    from gqa_uptrain.gin_utils import parse_gin
    launch.register_gin()
    gin.clear_config()
    try:
        parse_gin(["slurm/gpu_example.gin"], ["eval/SlurmResources.time = '0:10:00'"])
        train = launch.resources_for("train")
        assert (train.nodes, train.gpus_per_node, train.partition, train.extra) == (
            4, 8, "gpu", ("--qos=normal", "--exclusive"))
        ev, down = launch.resources_for("eval"), launch.resources_for("downstream")
        assert ev == down and ev.nodes == 1 and ev.gpus_per_node == 1 and ev.time == "0:10:00"
        assert ev.partition == "gpu"  # unscoped bindings reach every scope
        assert launch.resources_for("aggregate").gpus_per_node == 0
    finally:
        gin.clear_config()


class _FakeSlurm:
    """Records sbatch/scancel calls; job ids count up from 100."""

    def __init__(self, monkeypatch):
        self.submitted: list[tuple[str, list[str]]] = []
        self.cancelled: list[str] = []
        monkeypatch.setattr(launch, "sbatch", self.sbatch)
        monkeypatch.setattr(launch, "scancel", self.cancelled.append)

    def sbatch(self, script, after_ok=(), after_any=()):
        self.submitted.append((pathlib.Path(script).name, list(after_ok)))
        return str(100 + len(self.submitted) - 1)


def test_chain_submits_with_afterok_and_resubmits_nothing_queued_or_done(tmp_path, monkeypatch):
    fake = _FakeSlurm(monkeypatch)
    chain = [_job(tmp_path, s) for s in ("convert", "train", "eval")]
    out = launch.submit_chain(chain, {}, tmp_path, log=lambda m: None)
    assert fake.submitted == [("convert.sbatch", []), ("train.sbatch", ["100"]), ("eval.sbatch", ["101"])]
    assert [s.job_id for s in out] == ["100", "101", "102"] and all(s.state == "queued" for s in out)
    assert all(j.script.exists() and launch.read_job_id(j.job_file) for j in chain)
    # Re-run while convert runs and the others wait: nothing is submitted again.
    states = {"100": ("RUNNING", "None"), "101": ("PENDING", "Dependency"), "102": ("PENDING", "Dependency")}
    launch.submit_chain(chain, states, tmp_path, log=lambda m: None)
    assert len(fake.submitted) == 3 and not fake.cancelled
    # convert finished (its marker exists), train runs: still nothing.
    chain[0].done.write_text("x")
    states = {"100": ("COMPLETED", "None"), "101": ("RUNNING", "None"), "102": ("PENDING", "Dependency")}
    statuses = launch.submit_chain(chain, states, tmp_path, log=lambda m: None)
    assert [s.state for s in statuses] == ["done", "running", "queued"] and len(fake.submitted) == 3


def test_failed_stage_is_resubmitted_and_its_blocked_dependants_replaced(tmp_path, monkeypatch):
    fake = _FakeSlurm(monkeypatch)
    chain = [_job(tmp_path, s) for s in ("convert", "train", "eval", "downstream")]
    for j, jid in zip(chain, ("7", "8", "9", "10")):
        launch.record_job(j.job_file, jid, j.script)
    chain[1].log.write_text("step 1\nValueError: boom\n")
    chain[0].done.write_text("x")
    # SLURM marks only the direct dependant of the failed job; the one after it just waits ("Dependency").
    states = {"7": ("COMPLETED", "None"), "8": ("FAILED", "NonZeroExitCode"),
              "9": ("PENDING", launch.BLOCKED_REASON), "10": ("PENDING", "Dependency")}
    statuses = launch.chain_statuses(chain, states)
    assert [s.state for s in statuses] == ["done", "failed", "blocked", "blocked"]
    assert statuses[1].detail == f"see {chain[1].log}: ValueError: boom"
    assert statuses[3].detail == "after blocked eval"
    text = launch.format_status(statuses)
    assert f"run/train       failed         job 8 FAILED  see {chain[1].log}: ValueError: boom" in text
    assert text.splitlines()[-1] == "2 blocked, 1 done, 1 failed"
    launch.submit_chain(chain, states, tmp_path, log=lambda m: None)
    assert fake.submitted == [("train.sbatch", []), ("eval.sbatch", ["100"]), ("downstream.sbatch", ["101"])]
    assert fake.cancelled == ["9", "10"]
    assert '"previous": [\n  "8"\n ]' in chain[1].job_file.read_text()
    # A job SLURM forgot (no accounting) without its marker counts as failed, naming the log.
    gone = launch.stage_status(chain[3], {})
    assert gone.state == "failed" and "no longer known to SLURM" in gone.detail and str(chain[3].log) in gone.detail


def test_train_argv_replays_gin_files_and_bindings():
    import argparse
    args = argparse.Namespace(gin_file=["runs/uptrain.gin", "slurm/gpu_example.gin"], gin_search_paths=["/cfg"],
                              gin_bindings=["MODEL_DIR = '/runs/x'", "TRAIN_STEPS = 4"], cpu_devices=None)
    argv = launch.train_argv(args)
    assert argv[1:] == ["-m", "gqa_uptrain", "train", "--gin_file=runs/uptrain.gin",
                        "--gin_file=slurm/gpu_example.gin", "--gin_search_paths=/cfg", "--gin.MODEL_DIR='/runs/x'",
                        "--gin.TRAIN_STEPS=4", "--no_progress"]


def test_slurm_task_count_ignores_the_batch_shell(monkeypatch):
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")  # set in the batch script too, which must not join the cluster
    assert launch.slurm_task_count() == 0
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert launch.slurm_task_count() == 2


def test_sweep_dry_run_writes_every_stage_script_and_submits_nothing(tmp_path, monkeypatch):
    import json

    from gqa_uptrain import sweep
    from gqa_uptrain.checkpoint import write_config_files
    from gqa_uptrain.config import ModelConfig
    fake = _FakeSlurm(monkeypatch)
    src = tmp_path / "src"
    src.mkdir()
    write_config_files(src, ModelConfig(num_heads=4, d_model=32, head_dim=8, d_ff=32, vocab_size=64,
                                        num_encoder_layers=1, num_decoder_layers=1))
    (src / "manifest.json").write_text(json.dumps({"step": 200}))
    lines = []
    cfg = sweep.SweepConfig(source_checkpoint=str(src), num_kv_heads=(2,), alphas=(0.0, 0.05))
    sweep.run_sweep(cfg, tmp_path / "sw", dry_run=True, log=lines.append, launcher="slurm")
    assert not fake.submitted
    scripts = sorted(str(p.relative_to(tmp_path / "sw")) for p in (tmp_path / "sw").rglob("*.sbatch"))
    assert scripts == ["bench/kv2.sbatch", "runs/kv2-mean-a0-s0/convert.sbatch", "runs/kv2-mean-a0-s0/eval.sbatch",
                       "runs/kv2-mean-a0.05-s0/convert.sbatch", "runs/kv2-mean-a0.05-s0/eval.sbatch",
                       "runs/kv2-mean-a0.05-s0/train.sbatch"]
    assert sum("would submit" in l for l in lines) == 6
    train = (tmp_path / "sw" / "runs" / "kv2-mean-a0.05-s0" / "train.sbatch").read_text()
    assert "--gin.UPTRAIN_FRACTION=0.05" in train and "--gin.ORIGINAL_STEPS=200" in train

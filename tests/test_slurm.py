"""The slurm launcher against a live SLURM (scripts/slurm_local.sh start; .ci/run does it). Skipped, with the
reason, where `sinfo` is missing or cannot reach a controller.

Kept small: a 1-layer d_model=32 model, few steps, no train stage where a test does not need one. Each stage is a
fresh `python -m gqa_uptrain` process, which dominates the time."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _slurm_unavailable() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM client commands (sinfo, sbatch) not installed; scripts/slurm_local.sh start sets one up"
    try:
        p = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no SLURM controller reachable"
    states = p.stdout.split()
    if p.returncode != 0 or not any(s.rstrip("*") in ("idle", "mix", "alloc") for s in states):
        return f"no usable SLURM node (sinfo exit {p.returncode}: {(p.stderr or p.stdout).strip()[:200]})"
    return None


_UNAVAILABLE = _slurm_unavailable()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=str(_UNAVAILABLE))

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
TINY_GIN = ["--gin.ModelConfig.d_model=32", "--gin.ModelConfig.d_ff=48", "--gin.NUM_HEADS=4",
            "--gin.ModelConfig.head_dim=8", "--gin.ModelConfig.num_encoder_layers=1",
            "--gin.ModelConfig.num_decoder_layers=1"]
TINY_MODEL = ["--gin_file=models/t5_1_1/tiny.gin", *TINY_GIN]
# The decode benchmark of the sweep tests: the same tiny shape, one short timed run.
BENCH_ARGS = ("--batch", "1", "--input-len", "8", "--output-len", "2", "--repeats", "1", "--copy-mib", "1", *TINY_GIN)
SMALL_RUN = ["--gin_file=runs/pretrain.gin", "--gin.BATCH_SIZE=4", "--gin.INPUTS_LENGTH=32",
             "--gin.TARGETS_LENGTH=8", "--gin.EVAL_EVERY=0", "--gin.LOG_EVERY=1", "--gin.SAVE_EVERY=1000",
             "--gin.TrainConfig.tensorboard=False", "--gin.LEARNING_RATE=0.01", "--gin.WARMUP_STEPS=1"]


def _env() -> dict[str, str]:
    # sbatch exports the submitter's environment to the job: the jobs import this checkout and run on CPU.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    # One device per process; other flags (conftest's compile level) stay.
    env["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return env


def _cli(*args, check=True, timeout=600) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "gqa_uptrain", *map(str, args)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def _job_state(job_id: str) -> str:
    p = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return p.stdout.strip()


def _wait_job(job_id: str, timeout: float = 400) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout:
        state = _job_state(job_id)
        if state in TERMINAL:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {_job_state(job_id)} after {timeout} s")


@pytest.fixture
def cancel_jobs():
    """scancel every job a test submitted (blocked jobs would otherwise stay queued)."""
    ids: list[str] = []
    yield ids
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


def _job_ids_under(d: pathlib.Path) -> list[str]:
    from gqa_uptrain.launch import read_job_id
    return [j for f in d.rglob("*.job") if (j := read_job_id(f))]


def _source(tmp_path: pathlib.Path, params: bool = True) -> pathlib.Path:
    """A tiny MHA checkpoint (4 heads) that records pre-training step 100."""
    import jax
    import jax.numpy as jnp

    from gqa_uptrain.checkpoint import save_params, write_config_files
    from gqa_uptrain.config import ModelConfig
    cfg = ModelConfig(vocab_size=4224, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=1,
                      num_decoder_layers=1)
    src = tmp_path / "src"
    if not params:  # config only: `convert` fails on it
        src.mkdir()
        write_config_files(src, cfg)
        (src / "manifest.json").write_text(json.dumps({"step": 100}))
        return src
    import flax.linen as nn

    from gqa_uptrain.model import Transformer
    p = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32),
                                            jnp.ones((1, 8), jnp.int32))["params"])
    save_params(src, p, cfg, metadata={"step": 100})
    return src


def _sweep_gin(tmp_path: pathlib.Path, src: pathlib.Path, bench_args: tuple[str, ...], **over) -> pathlib.Path:
    cfg = {"num_kv_heads": "(2,)", "methods": "('random',)", "alphas": "(0.0,)", "seeds": "(0, 1)",
           "eval_args": "('--num_examples', '4')", **over}
    lines = [f"SweepConfig.source_checkpoint = '{src}'", "SweepConfig.model_gin_file = 'models/t5_1_1/tiny.gin'",
             f"SweepConfig.bench_args = {bench_args!r}"]
    lines += [f"SweepConfig.{k} = {v}" for k, v in cfg.items()]
    f = tmp_path / "sweep.gin"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_sweep_through_slurm_matches_local_launcher(tmp_path, cancel_jobs):
    from gqa_uptrain import launch
    src = _source(tmp_path)
    gin_file = _sweep_gin(tmp_path, src, BENCH_ARGS)
    slurm_root, local_root = tmp_path / "slurm", tmp_path / "local"
    p = _cli("sweep", f"--gin_file={gin_file}", "--root", slurm_root, "--launcher", "slurm")
    cancel_jobs += _job_ids_under(slurm_root)
    assert "submitted job" in p.stdout and "aggregation job" in p.stdout, p.stdout
    ids = {f: launch.read_job_id(f) for f in slurm_root.rglob("*.job")}
    assert len(ids) == 6  # bench, 2 x (convert, eval), aggregate
    # The eval jobs wait for their convert job.
    run = slurm_root / "runs" / "kv2-random-a0-s0"
    assert (run / "eval.sbatch").exists() and (run / "convert.sbatch").exists()
    # Re-running while the jobs are queued or running submits none of them again.
    p = _cli("sweep", f"--gin_file={gin_file}", "--root", slurm_root, "--launcher", "slurm")
    assert "submitted job" not in p.stdout, p.stdout
    assert {f: launch.read_job_id(f) for f in slurm_root.rglob("*.job") if f.name != "aggregate.job"} == {
        f: j for f, j in ids.items() if f.name != "aggregate.job"}
    # The same sweep with the local launcher, meanwhile.
    _cli("sweep", f"--gin_file={gin_file}", "--root", local_root, "--parallel", 2)
    p = _cli("sweep", "--root", slurm_root, "--wait", "--poll_s", "1")
    assert p.returncode == 0 and "5 done" in p.stdout, p.stdout
    assert _wait_job(launch.read_job_id(slurm_root / "aggregate.job")) == "COMPLETED"
    for run_id in ("kv2-random-a0-s0", "kv2-random-a0-s1"):
        a = json.loads((slurm_root / "runs" / run_id / "eval.json").read_text())
        b = json.loads((local_root / "runs" / run_id / "eval.json").read_text())
        assert a["metrics"] == b["metrics"], run_id
    slurm_rows = (slurm_root / "results.csv").read_text().splitlines()
    assert len(slurm_rows) == 3 and slurm_rows[0] == (local_root / "results.csv").read_text().splitlines()[0]
    # Finished: a re-run submits nothing and only rebuilds the tables.
    p = _cli("sweep", f"--gin_file={gin_file}", "--root", slurm_root, "--launcher", "slurm")
    assert "nothing to submit" in p.stdout and "submitted job" not in p.stdout, p.stdout


def _losses(model_dir: pathlib.Path) -> list[float]:
    rows = [json.loads(l) for l in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and r.get("split", "train") == "train"]


def test_two_task_srun_job_is_one_jax_distributed_cluster(tmp_path, cancel_jobs):
    res = tmp_path / "res.gin"
    res.write_text("train/SlurmResources.ntasks_per_node = 2\n")
    run = [*TINY_MODEL, *SMALL_RUN, "--gin.TRAIN_STEPS=3", "--gin.TrainConfig.num_data_shards=2"]
    p = _cli("train", *run, f"--gin_file={res}", f"--gin.MODEL_DIR={tmp_path / 'multi'}", "--launcher", "slurm")
    job_id = p.stdout.split("submitted job ")[1].split(":")[0]
    cancel_jobs.append(job_id)
    assert "#SBATCH --ntasks-per-node=2" in (tmp_path / "multi" / "train.sbatch").read_text()
    _cli("train", *run, f"--gin.MODEL_DIR={tmp_path / 'single'}", "--no_progress")  # reference, meanwhile
    state = _wait_job(job_id)
    log = (tmp_path / "multi" / "train.log").read_text()
    assert state == "COMPLETED", log[-3000:]
    # Two processes joined one cluster through the SLURM environment (gloo connects each rank to its peer).
    assert "Rank 0 is connected to 1 peer" in log and "Rank 1 is connected to 1 peer" in log, log[-3000:]
    np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "single"), rtol=2e-5)
    assert len(_losses(tmp_path / "multi")) == 3


def test_preempted_job_is_requeued_and_ends_like_an_uninterrupted_run(tmp_path, cancel_jobs):
    steps = 100
    run = [*TINY_MODEL, *SMALL_RUN, f"--gin.TRAIN_STEPS={steps}"]
    model_dir = tmp_path / "preempted"
    p = _cli("train", *run, f"--gin.MODEL_DIR={model_dir}", "--launcher", "slurm")
    job_id = p.stdout.split("submitted job ")[1].split(":")[0]
    cancel_jobs.append(job_id)
    t0 = time.time()
    while not ((model_dir / "metrics.jsonl").exists() and (model_dir / "metrics.jsonl").read_text().strip()):
        assert time.time() - t0 < 300 and _job_state(job_id) not in TERMINAL, (model_dir / "train.log").read_text()
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
    _cli("train", *run, f"--gin.MODEL_DIR={tmp_path / 'straight'}", "--no_progress")  # reference, meanwhile
    state = _wait_job(job_id)
    log = (model_dir / "train.log").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "stopped by SIGTERM" in log, f"training finished before SIGTERM arrived: raise steps ({steps})"
    assert "requeueing job" in log and "restart 1" in log and "resuming from step" in log, log[-3000:]
    stopped = int(log.split("stopped by SIGTERM at step ")[1].split()[0])
    assert 0 < stopped < steps
    from gqa_uptrain.checkpoint import load_params
    a, b = load_params(model_dir), load_params(tmp_path / "straight")
    assert a.step == b.step == steps
    import jax
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a.params, b.params)


def test_failed_stage_blocks_dependants_and_status_names_it(tmp_path, cancel_jobs):
    src = _source(tmp_path, params=False)  # convert fails: the source has no parameters
    gin_file = _sweep_gin(tmp_path, src, ("--no-such-flag",), methods="('mean',)", alphas="(0.05,)",
                          seeds="(0,)")
    root = tmp_path / "sw"
    _cli("sweep", f"--gin_file={gin_file}", "--root", root, "--launcher", "slurm")
    cancel_jobs += _job_ids_under(root)
    p = _cli("sweep", "--root", root, "--wait", "--poll_s", "1", check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    run = root / "runs" / "kv2-mean-a0.05-s0"
    from gqa_uptrain.launch import read_job_id
    lines = {l.split()[0]: l for l in p.stdout.splitlines() if l.startswith(("kv2-", "bench-"))}
    conv = lines["kv2-mean-a0.05-s0/convert"]
    assert f"failed         job {read_job_id(run / 'convert.job')} FAILED  see {run / 'convert.log'}:" in conv, conv
    assert " blocked " in lines["kv2-mean-a0.05-s0/train"] and " blocked " in lines["kv2-mean-a0.05-s0/eval"]
    # SLURM agrees (it re-evaluates dependencies on its scheduling pass, so give it a moment).
    t0, reason = time.time(), ""
    while time.time() - t0 < 60 and reason != "DependencyNeverSatisfied":
        reason = subprocess.run(["squeue", "-h", "-j", read_job_id(run / "train.job"), "-o", "%r"],
                                capture_output=True, text=True).stdout.strip()
        time.sleep(1)
    assert reason == "DependencyNeverSatisfied"
    assert not (run / "train.log").exists()  # never started
    assert lines["bench-kv2/bench"].split()[1] == "failed"
    # --status says the same without waiting.
    status = _cli("sweep", "--root", root, "--status").stdout
    assert conv in status

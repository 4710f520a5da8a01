"""Two processes on localhost (jax.distributed, CPU gloo collectives, 2 CPU devices each) train exactly like one
process with 4 devices: same losses, per-host data shards, one checkpoint written correctly (with one tf.data
iterator-state file per process)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np


def _worker(model_dir: str, coordinator: str, num_processes: int, process_id: int) -> None:
    from gqa_uptrain.cli.train_cmd import initialize_distributed
    if num_processes > 1:
        initialize_distributed(coordinator, num_processes, process_id, cpu_devices=2)
    else:
        initialize_distributed(None, None, None, cpu_devices=4)
    import jax
    from gqa_uptrain.config import ModelConfig
    from gqa_uptrain.optim import OptimizerConfig
    from gqa_uptrain.train import TrainConfig, train
    assert jax.device_count() == 4 and jax.process_count() == num_processes
    model = ModelConfig(vocab_size=4224, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=1,
                        num_decoder_layers=1)
    cfg = TrainConfig(model_dir=model_dir, inputs_length=32, targets_length=8, batch_size=8, train_steps=3,
                      num_data_shards=2, save_every=2, eval_every=3, eval_examples=8, log_every=1, progress=False,
                      tensorboard=False, mesh="data=2,fsdp=2",
                      optimizer=OptimizerConfig(schedule="constant", base_learning_rate=0.01))
    res = train(model, cfg)
    print("RESULT " + json.dumps({"losses": [m["loss"] for m in res.metrics], "eval": res.eval_metrics[-1]["loss"],
                                  "process": jax.process_index()}), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # One device per process; other flags (conftest's compile level) stay.
    env["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return subprocess.Popen([sys.executable, __file__, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _result(p):
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:])


def test_two_processes_match_one_process(tmp_path):
    coordinator = f"127.0.0.1:{_free_port()}"
    multi = tmp_path / "multi"
    procs = [_launch([multi, coordinator, 2, i]) for i in range(2)]
    single = _launch([tmp_path / "single", "", 1, 0])
    r0, r1 = _result(procs[0]), _result(procs[1])
    ref = _result(single)
    np.testing.assert_allclose(r0["losses"], ref["losses"], rtol=2e-5)
    assert r0["losses"] == r1["losses"]  # metrics are global values, identical on both hosts
    np.testing.assert_allclose(r0["eval"], ref["eval"], rtol=2e-5)
    # One run directory, written once: checkpoints 2 and 3, metrics only from process 0.
    from gqa_uptrain.checkpoint import load_params
    from gqa_uptrain.metrics import read_metrics
    assert sorted(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
    assert [r["step"] for r in read_metrics(multi)] == [1, 2, 3]
    assert sorted(p.name for p in (multi / "checkpoints" / "3" / "data_iterators").glob("*.index")) == [
        "process_0_of_2.index", "process_1_of_2.index"]
    a, b = load_params(multi), load_params(tmp_path / "single")
    assert a.step == b.step == 3
    import jax
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6),
                 a.params, b.params)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))

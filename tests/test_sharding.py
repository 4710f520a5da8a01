"""8 CPU devices (in a subprocess: XLA flags must precede the jax import): the trainer's losses on several meshes
match the 1-device run, and parameters / Adafactor statistics really are sharded."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

MESHES = ["data=8", "fsdp=4,model=2", "data=2,fsdp=2,model=2"]


def _worker(root: str) -> None:
    import jax
    from gqa_uptrain.config import ModelConfig
    from gqa_uptrain.optim import OptimizerConfig
    from gqa_uptrain.train import TrainConfig, train
    assert jax.device_count() == 8
    model = ModelConfig(vocab_size=4224, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=1,
                        num_decoder_layers=1)
    out = {}
    for name, mesh, devices in [("1dev", "", jax.devices()[:1])] + [(m, m, None) for m in MESHES]:
        cfg = TrainConfig(model_dir=f"{root}/{name}", inputs_length=32, targets_length=8, batch_size=8,
                          num_microbatches=1 if name != "data=2,fsdp=2,model=2" else 2, train_steps=3,
                          save_every=3, eval_every=3, eval_examples=8, log_every=1, progress=False,
                          tensorboard=False, mesh=mesh, optimizer=OptimizerConfig(schedule="constant",
                                                                                  base_learning_rate=0.01))
        res = train(model, cfg, devices=devices)
        wi = res.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]          # [embed 32, mlp 48]
        vcol = res.opt_state[0].v["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]  # unfactored (dims < 128)
        emb_row = res.opt_state[0].v_row["token_embedder"]["embedding"]           # factored: [vocab] -> drops embed
        out[name] = {"losses": [m["loss"] for m in res.metrics], "eval": res.eval_metrics[-1]["loss"],
                     "wi_shard": list(wi.addressable_shards[0].data.shape),
                     "v_shard": list(vcol.addressable_shards[0].data.shape),
                     "v_row_shape": list(emb_row.shape), "v_row_shard": list(emb_row.addressable_shards[0].data.shape),
                     "final": float(np.asarray(wi).sum())}
    print("RESULT " + json.dumps(out), flush=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()  # keeps conftest's
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    p = subprocess.run([sys.executable, __file__, str(tmp_path_factory.mktemp("mesh"))], capture_output=True,
                       text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("mesh", MESHES)
def test_losses_match_one_device(results, mesh):
    ref, got = results["1dev"], results[mesh]
    assert len(got["losses"]) == 3
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=2e-5)
    np.testing.assert_allclose(got["eval"], ref["eval"], rtol=2e-5)
    np.testing.assert_allclose(got["final"], ref["final"], rtol=1e-4, atol=1e-4)


def test_params_and_adafactor_state_are_sharded(results):
    assert results["1dev"]["wi_shard"] == [32, 48]
    assert results["data=8"]["wi_shard"] == [32, 48]                  # pure data parallel: replicated
    assert results["fsdp=4,model=2"]["wi_shard"] == [8, 24]            # embed over fsdp, mlp over model
    assert results["fsdp=4,model=2"]["v_shard"] == [8, 24]             # second moment follows the parameter
    assert results["data=2,fsdp=2,model=2"]["wi_shard"] == [16, 24]
    # The embedding [4224, 32] has only one dim >= 128, so it is not factored: v_row is a (1,) placeholder.
    assert results["fsdp=4,model=2"]["v_row_shape"] == [1]


# ---------------------------------------------------------------- the one mesh parser (fast: no subprocess, 1 device)

@pytest.mark.parametrize("spec,devices,want", [
    ("", 8, (8, 1, 1)),                       # all devices on data
    ("", None, (1, 1, 1)),                    # no device count (inspect --mesh alone): one device
    ("fsdp=4", 4, (1, 4, 1)),                 # missing axes are 1
    ("data=2, fsdp=2,model=2", 8, (2, 2, 2)),
    ("model=2,data=-1", 8, (4, 1, 2)),        # -1 takes the remaining devices, on any axis
    ("fsdp=-1", 6, (1, 6, 1)),
    ("data=2,fsdp=4", None, (2, 4, 1)),       # without a device count the shape is taken as written
])
def test_parse_mesh_one_meaning(spec, devices, want):
    from gqa_uptrain.sharding import MESH_AXES, parse_mesh
    assert parse_mesh(spec, devices) == dict(zip(MESH_AXES, want))


@pytest.mark.parametrize("spec,devices,message", [
    ("dat=2", 8, "mesh 'dat=2': unknown axis 'dat' (did you mean data?); axes are data, fsdp, model"),
    ("pipeline=2", 8, "mesh 'pipeline=2': unknown axis 'pipeline'; axes are data, fsdp, model"),
    ("data=two", 8, "mesh 'data=two': data='two' is not an integer"),
    ("data=1.5", 8, "mesh 'data=1.5': data='1.5' is not an integer"),
    ("data", 8, "mesh 'data': entry 'data' is not NAME=N"),
    ("data=0", 8, "mesh 'data=0': data=0 must be a positive integer or -1"),
    ("data=-2", 8, "mesh 'data=-2': data=-2 must be a positive integer or -1"),
    ("data=2,data=4", 8, "mesh 'data=2,data=4': axis data is given twice"),
    ("data=-1,model=-1", 8, "mesh 'data=-1,model=-1': at most one axis may be -1, got data and model"),
    ("data=-1,model=3", 8, "mesh 'data=-1,model=3': the fixed axes use 3 devices, which does not divide the 8"),
    ("data=3", 8, "mesh 'data=3': needs 3 devices, 8 available"),
    ("data=-1", None, "mesh 'data=-1': data=-1 needs a device count"),
])
def test_parse_mesh_errors_are_one_line(spec, devices, message):
    from gqa_uptrain.sharding import parse_mesh
    with pytest.raises(ValueError) as e:
        parse_mesh(spec, devices)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_make_mesh_reads_specs_and_shapes_as_parse_mesh_does():
    import jax
    from gqa_uptrain.sharding import make_mesh
    one = jax.devices()[:1]
    for shape in (None, "", "data=-1", "model=-1", {"fsdp": -1}, {"data": 1, "fsdp": 1, "model": 1}):
        assert dict(make_mesh(shape, one).shape) == {"data": 1, "fsdp": 1, "model": 1}, shape
    assert dict(make_mesh(devices=one).shape)["data"] == 1
    with pytest.raises(ValueError, match=r"^MESH 'data=2': needs 2 devices, 1 available$"):
        make_mesh("data=2", one, flag="MESH")
    with pytest.raises(ValueError, match=r"unknown axis 'pipe'"):
        make_mesh({"pipe": 1}, one)
    with pytest.raises(ValueError, match=r"at most one axis may be -1"):
        make_mesh({"data": -1, "model": -1}, one)


def test_train_and_inspect_use_the_one_parser(capsys):
    """train's MESH and inspect's --mesh reach sharding.parse_mesh (the old per-command parsers are gone)."""
    from gqa_uptrain import sharding, train
    from gqa_uptrain.cli import main
    assert not hasattr(train, "parse_mesh") and not hasattr(sharding, "parse_mesh_spec")
    assert main(["inspect", "--gin_file=models/t5_1_1/small.gin", "--mesh", "dtaa=2", "--summary"]) != 0
    err = capsys.readouterr().err
    assert "--mesh 'dtaa=2': unknown axis 'dtaa' (did you mean data?)" in err and "Traceback" not in err


if __name__ == "__main__":
    _worker(sys.argv[1])

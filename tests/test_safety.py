"""Data safety (issue #15): no command destroys its source, reads outside a checkpoint, trusts a malformed
safetensors header, passes NaN/Inf weights on silently, saves a diverged model, or fails to recover from a damaged
checkpoint or an interrupted run."""
import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from gqa_uptrain import checkpoint, readers
from gqa_uptrain.cli import main
from gqa_uptrain.model import init_params
from test_readers import _t5x_state, _write_t5x, write_hf_dir


@pytest.fixture
def params(tiny_config):
    return jax.tree.map(np.array, init_params(tiny_config, jax.random.PRNGKey(0)))


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _tree_digest(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ data loss: output vs source


@pytest.mark.parametrize("where", ["same", "parent", "inside", "symlink"])
def test_convert_refuses_output_overlapping_source(tmp_path, tiny_config, params, capsys, where):
    src = write_hf_dir(tmp_path / "runs" / "hf", tiny_config, params)
    (tmp_path / "runs" / "notes.txt").write_text("keep me")
    out = {"same": src, "parent": tmp_path / "runs", "inside": src / "gqa"}.get(where)
    if where == "symlink":
        out = tmp_path / "link"
        out.symlink_to(src)
    before = _tree_digest(tmp_path / "runs")
    rc, err = _run(capsys, "convert", "--source", src, "--num-kv-heads", 2, "--output", out, "--overwrite",
                   "--no-progress")
    assert rc == 1, err
    assert "the --source" in err and len(err.strip().splitlines()) == 1, err
    assert _tree_digest(tmp_path / "runs") == before


def test_export_refuses_output_equal_to_checkpoint_and_bad_steps(tmp_path, tiny_config, params, capsys):
    checkpoint.save_params(tmp_path / "conv", params, tiny_config)
    before = _tree_digest(tmp_path / "conv")
    rc, err = _run(capsys, "export", "--checkpoint", tmp_path / "conv", "--output", tmp_path / "conv",
                   "--overwrite", "--no-progress")
    assert rc == 1 and "is the --checkpoint" in err, err
    assert _tree_digest(tmp_path / "conv") == before
    rc, err = _run(capsys, "export", "--checkpoint", tmp_path / "conv", "--output", tmp_path / "e", "--step", 999,
                   "--no-progress")
    assert rc == 1 and "--step 999" in err and "without training steps" in err, err
    assert not (tmp_path / "e").exists()


def test_missing_step_lists_available_steps(tmp_path, tiny_config, params):
    import orbax.checkpoint as ocp
    run = tmp_path / "run"
    checkpoint.write_config_files(run.mkdir() or run, tiny_config)
    with ocp.CheckpointManager(run / "checkpoints", item_names=("params",)) as m:
        for s in (2, 4):
            m.save(s, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    with pytest.raises(FileNotFoundError, match=r"--step 3: .* \(available: 2, 4\)"):
        checkpoint.load_params(run, 3)
    assert checkpoint.load_params(run, 2).step == 2


def test_check_disjoint_cases(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    checkpoint.check_disjoint(tmp_path / "a" / "b", tmp_path / "a" / "c")  # siblings are fine
    checkpoint.check_disjoint(tmp_path / "a" / "b", tmp_path / "a" / "bb")  # a name prefix is not containment
    for out in (tmp_path / "a" / "b", tmp_path / "a", tmp_path / "a" / "b" / "x", tmp_path / "a" / "b" / "..",):
        with pytest.raises(ValueError, match="--output"):
            checkpoint.check_disjoint(tmp_path / "a" / "b", out, "--source", "--output")


# ------------------------------------------------------------------------------ NaN/Inf in source weights


def _poison(params, name="decoder/layers_0/mlp/wo/kernel", count=3):
    bad = jax.tree.map(np.copy, params)
    node = bad
    *path, leaf = name.split("/")
    for k in path:
        node = node[k]
    node[leaf].reshape(-1)[:count] = [np.nan, np.inf, -np.inf][:count]
    return bad


def test_convert_and_export_refuse_nonfinite_weights(tmp_path, tiny_config, params, capsys):
    checkpoint.save_params(tmp_path / "conv", _poison(params), tiny_config)
    rc, err = _run(capsys, "convert", "--source", tmp_path / "conv", "--num-kv-heads", 2, "--output",
                   tmp_path / "out", "--no-progress")
    assert rc == 1 and "'decoder/layers_0/mlp/wo/kernel' has 3 non-finite" in err and "--allow-nonfinite" in err
    assert not (tmp_path / "out").exists()
    # Data-aware methods read the whole model first (load_all): checked too.
    rc, err = _run(capsys, "convert", "--source", tmp_path / "conv", "--num-kv-heads", 2, "--output",
                   tmp_path / "out", "--no-progress", "--method", "align", "--calibration", "random")
    assert rc == 1 and "has 3 non-finite" in err and not (tmp_path / "out").exists(), err
    rc, err = _run(capsys, "export", "--checkpoint", tmp_path / "conv", "--output", tmp_path / "hf",
                   "--no-progress")
    assert rc == 1 and "has 3 non-finite" in err and not (tmp_path / "hf").exists(), err
    # The explicit flag proceeds (both spellings), still naming the tensor.
    rc, err = _run(capsys, "convert", "--source", tmp_path / "conv", "--num-kv-heads", 2, "--output",
                   tmp_path / "out", "--no-progress", "--allow_nonfinite")
    assert rc == 0 and "warning:" in err and "wo/kernel' has 3 non-finite" in err, err
    rc, err = _run(capsys, "export", "--checkpoint", tmp_path / "conv", "--output", tmp_path / "hf",
                   "--no-progress", "--allow-nonfinite")
    assert rc == 0 and "warning:" in err, err


@pytest.mark.parametrize("cmd", ["infer", "eval"])
def test_infer_and_eval_refuse_nonfinite_checkpoint(tmp_path, tiny_config, params, capsys, cmd):
    checkpoint.save_params(tmp_path / "conv", _poison(params), tiny_config)
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"inputs": "a b c", "targets": "d e"}) + "\n")
    extra = ["--input", data] if cmd == "infer" else ["--data", data, "--metrics", "loss"]
    rc, err = _run(capsys, cmd, "--checkpoint", tmp_path / "conv", *extra, "--quiet")
    assert rc == 1 and "'decoder/layers_0/mlp/wo/kernel' has 3 non-finite" in err, err
    assert "--allow-nonfinite" in err
    # Both spellings are accepted on every command that has the flag.
    rc, err = _run(capsys, cmd, "--checkpoint", tmp_path / "conv", *extra, "--quiet", "--allow_nonfinite",
                   "--output", tmp_path / "o.json")
    # (proceeds past the check; the tiny model then has no vocabulary to decode with, which is another error)
    assert "warning:" in err and "proceeding: --allow-nonfinite" in err and "refusing" not in err, err


def test_check_tree_finite_names_tensor_and_count(tiny_config, params):
    checkpoint.check_tree_finite(params, "ok")
    with pytest.raises(ValueError, match=r"ckpt: tensor 'decoder/layers_0/mlp/wo/kernel' has 2 non-finite .* of "
                                         r"1536 and 1 more tensor"):
        checkpoint.check_tree_finite(_poison(_poison(params, count=2), "encoder/encoder_norm/scale", 1), "ckpt")
    checkpoint.check_tree_finite(_poison(params), "ckpt", allow=True)


# ------------------------------------------------------------------------------ reading outside the checkpoint


def _sharded_with(tmp_path, tiny_config, params, shard_name):
    hf_dir = write_hf_dir(tmp_path / "hf", tiny_config, params, shards=2)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard_name
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    return hf_dir


@pytest.mark.parametrize("shard", ["absolute", "dotdot", "symlink"])
def test_hf_index_cannot_name_files_outside(tmp_path, tiny_config, params, capsys, shard):
    secret = tmp_path / "secret.safetensors"  # a valid file: today it would be converted and hashed
    save_file({"x": np.full((4,), 7.0, np.float32)}, str(secret))
    name = {"absolute": str(secret), "dotdot": "../secret.safetensors", "symlink": "link.safetensors"}[shard]
    hf_dir = _sharded_with(tmp_path, tiny_config, params, name)
    if shard == "symlink":
        (hf_dir / "link.safetensors").symlink_to(secret)
    rc, err = _run(capsys, "convert", "--source", hf_dir, "--num-kv-heads", 2, "--output", tmp_path / "out",
                   "--no-progress")
    assert rc == 1 and ("is an absolute path" in err or "resolves outside" in err), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_hf_index_naming_a_system_file_leaks_no_bytes(tmp_path, tiny_config, params, capsys):
    hf_dir = _sharded_with(tmp_path, tiny_config, params, "/etc/passwd")
    rc, err = _run(capsys, "convert", "--source", hf_dir, "--num-kv-heads", 2, "--output", tmp_path / "out",
                   "--no-progress")
    assert rc == 1 and "'/etc/passwd' is an absolute path" in err and "root:" not in err, err
    assert "header length" not in err


def test_hf_hub_cache_symlinks_still_load(tmp_path, tiny_config, params):
    """HF's cache stores snapshot files as symlinks into ../../blobs: that stays inside the cached repository."""
    repo = tmp_path / "models--org--t5"
    hf_dir = write_hf_dir(repo / "snapshots" / "abc", tiny_config, params, shards=2)
    (repo / "blobs").mkdir()
    for f in hf_dir.glob("*.safetensors"):
        blob = repo / "blobs" / f.name
        f.rename(blob)
        f.symlink_to(os.path.relpath(blob, f.parent))
    assert len(readers.open_source(hf_dir).load_all()) == len(readers.open_source(hf_dir).tensors)


@pytest.mark.parametrize("kind", ["absolute", "dotdot"])
def test_t5x_tensorstore_path_outside_refused(tmp_path, tiny_config, params, kind):
    from flax import serialization
    name = "encoder/layers_0/mlp/wi_0/kernel"
    ckpt = _write_t5x(tmp_path / "model" / "checkpoint_5", _t5x_state(params, "new", 5), [name])
    outside = tmp_path / "elsewhere"
    (outside / "big").mkdir(parents=True)
    (outside / "big" / "file").write_bytes(b"x" * 10)
    state = serialization.msgpack_restore((ckpt / "checkpoint").read_bytes())
    node = state["target"]
    for k in name.split("/"):
        node = node[k]
    node["kvstore"]["path"] = str(outside) if kind == "absolute" else "../../elsewhere"
    (ckpt / "checkpoint").write_bytes(serialization.msgpack_serialize(state))
    with pytest.raises(ValueError, match="tensorstore path: .*(absolute path|resolves outside)"):
        readers.open_source(ckpt)


# ------------------------------------------------------------------------------ trust the format library


def _write_raw(path, header, data):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("case", ["overlap", "negative", "metadata_list"])
def test_malformed_safetensors_headers_rejected(tmp_path, case):
    f32 = lambda a, b: {"dtype": "F32", "shape": [(b - a) // 4], "data_offsets": [a, b]}  # noqa: E731
    header = {"overlap": {"a": f32(0, 8), "b": f32(0, 8)},
              "negative": {"a": f32(0, 8), "b": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
              "metadata_list": {"__metadata__": ["x"], "a": f32(0, 8), "b": f32(8, 16)}}[case]
    _write_raw(tmp_path / "m.safetensors", header, b"\0" * 16)
    with pytest.raises(ValueError, match=r"m.safetensors: not a valid safetensors file \(.+\)$") as e:
        readers.SafetensorsFile(tmp_path / "m.safetensors")
    assert "\n" not in str(e.value)


def test_export_shards_load_with_library_and_our_reader(tmp_path, tiny_config, params):
    from safetensors import safe_open

    from gqa_uptrain import export, hf
    checkpoint.save_params(tmp_path / "conv", params, tiny_config)
    export.export_hf(tmp_path / "conv", tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", "model.safetensors"]
    export.export_hf(tmp_path / "conv", tmp_path / "many", max_shard_mib=0.02)  # ~20 KiB shards
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    want = hf.hf_from_params(params, tiny_config)
    assert sorted(index["weight_map"]) == sorted(want)
    total = 0
    for s in shards:
        assert (tmp_path / "many" / s).stat().st_size <= 0.02 * 2 ** 20 + 4096 or len(
            [n for n, f in index["weight_map"].items() if f == s]) == 1
        with safe_open(str(tmp_path / "many" / s), framework="np") as f:
            for n in f.keys():
                assert index["weight_map"][n] == s
                np.testing.assert_array_equal(f.get_tensor(n), want[n])
                total += want[n].nbytes
    assert index["metadata"]["total_size"] == total
    back = readers.open_source(tmp_path / "many")
    assert back.config == tiny_config
    single = readers.open_source(tmp_path / "one")
    for n in back.tensors:
        np.testing.assert_array_equal(back.tensors[n], single.tensors[n])


def test_exported_shards_load_in_transformers(tmp_path, tiny_config, params):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from gqa_uptrain import export
    checkpoint.save_params(tmp_path / "conv", params, tiny_config)
    export.export_hf(tmp_path / "conv", tmp_path / "many", max_shard_mib=0.02)
    model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "many")
    sd = model.state_dict()
    want = readers.open_source(tmp_path / "many")
    w = sd["decoder.block.0.layer.2.DenseReluDense.wo.weight"].numpy()
    np.testing.assert_array_equal(w, np.asarray(params["decoder"]["layers_0"]["mlp"]["wo"]["kernel"]).T)
    assert want.config == tiny_config


# ------------------------------------------------------------------------------ recovery: temporaries


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path, tiny_config, params, capsys):
    write_hf_dir(tmp_path / "hf", tiny_config, params)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a PID that has exited
    stale_dir = tmp_path / f".out.tmp-{dead}-abc123"
    (stale_dir / "params").mkdir(parents=True)
    stale_old = tmp_path / f".out.old-{dead}"
    stale_old.write_text("x")
    alive = tmp_path / f".out.tmp-{os.getpid()}-live"  # a writer that is still running: left alone
    alive.mkdir()
    other = tmp_path / f".other.tmp-{dead}-zz"  # another output's temporary: left alone
    other.mkdir()
    rc, err = _run(capsys, "convert", "--source", tmp_path / "hf", "--num-kv-heads", 2, "--output",
                   tmp_path / "out", "--no-progress")
    assert rc == 0, err
    assert not stale_dir.exists() and not stale_old.exists()
    assert alive.exists() and other.exists()
    assert "removed 2 temporary file(s) left by an interrupted run" in err


def test_overwrite_onto_a_file_leaves_nothing_behind(tmp_path, tiny_config, params):
    (tmp_path / "out").write_text("old")
    checkpoint.save_params(tmp_path / "out", params, tiny_config, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------ training: divergence, recovery


def _train_cfg(model_dir, **kw):
    from gqa_uptrain.optim import OptimizerConfig
    from gqa_uptrain.train import TrainConfig
    base = dict(model_dir=str(model_dir), inputs_length=32, targets_length=8, batch_size=4, train_steps=4,
                save_every=2, eval_every=2, eval_examples=4, log_every=1, progress=False, tensorboard=False,
                async_checkpointing=False, optimizer=OptimizerConfig(schedule="constant", base_learning_rate=0.01))
    base.update(kw)
    return TrainConfig(**base)


def _data_model():
    from gqa_uptrain.config import ModelConfig
    return ModelConfig(vocab_size=4224, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=1,
                       num_decoder_layers=1)


def _steps(run):
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(run / "checkpoints") as m:
        return sorted(m.all_steps())


def test_train_refuses_model_dir_overlapping_initial_checkpoint(tmp_path, tiny_config, params):
    from gqa_uptrain.train import train
    checkpoint.save_params(tmp_path / "conv", params, tiny_config)
    for model_dir in (tmp_path / "conv", tmp_path / "conv" / "run"):
        with pytest.raises(ValueError, match="MODEL_DIR .* the INITIAL_CHECKPOINT"):
            train(tiny_config, _train_cfg(model_dir, initial_checkpoint=str(tmp_path / "conv")))
    assert sorted(p.name for p in (tmp_path / "conv").iterdir()) == ["config.json", "manifest.json", "model.gin",
                                                                      "params"]


@pytest.mark.parametrize("binding,msg,code", [
    ("--gin.LEARNING_RATE=1e39", "LEARNING_RATE (OptimizerConfig.base_learning_rate) must be finite and in (0, 1000]",
     1),
    # gin has no literal for NaN/Inf: the override check (exit 2, as for any bad --gin value) names them.
    ("--gin.LEARNING_RATE=nan", "LEARNING_RATE must be a finite number, got 'nan'", 2),
    ("--gin.Z_LOSS=inf", "Z_LOSS must be a finite number, got 'inf'", 2),
])
def test_absurd_hyperparameters_rejected_up_front(tmp_path, capsys, binding, msg, code):
    rc, err = _run(capsys, "train", "--gin_file=models/t5_1_1/tiny.gin", "--gin_file=runs/pretrain.gin",
                   f"--gin.MODEL_DIR={tmp_path / 'run'}", "--gin.TRAIN_STEPS=1", binding, "--no_progress")
    assert rc == code and msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def nan_after(after_train_step):
    """Make the training step return NaN parameters from step `n` on, with a finite loss (what a huge update
    does: the loss is computed before the update)."""
    import jax.numpy as jnp

    state = {"n": 10 ** 9}

    def poison(new_step, params, opt_state, metrics):
        nan = jnp.where(new_step >= state["n"], jnp.nan, 0.0)
        return jax.tree.map(lambda p: p + nan, params), opt_state, metrics
    after_train_step(poison)
    return state


def test_nonfinite_parameters_are_never_saved(tmp_path, nan_after):
    from gqa_uptrain.train import NonFiniteLossError, train
    nan_after["n"] = 1
    with pytest.raises(NonFiniteLossError, match="non-finite parameters .* after step 1; not saved. Last good "
                                                 "checkpoint: none"):
        train(_data_model(), _train_cfg(tmp_path / "one", train_steps=1, eval_every=0))
    assert _steps(tmp_path / "one") == []
    nan_after["n"] = 3
    with pytest.raises(NonFiniteLossError, match="after step 3; not saved. Last good checkpoint: step 2"):
        train(_data_model(), _train_cfg(tmp_path / "run", train_steps=4, save_every=1, eval_every=0))
    assert _steps(tmp_path / "run") == [1, 2]
    checkpoint.check_tree_finite(checkpoint.load_params(tmp_path / "run").params, "last good")


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, capsys, how):
    from gqa_uptrain.metrics import read_metrics
    from gqa_uptrain.train import train
    run = tmp_path / "run"
    train(_data_model(), _train_cfg(run, eval_every=0))
    assert _steps(run) == [2, 4]
    files = sorted(p for p in (run / "checkpoints" / "4" / "params").rglob("*") if p.is_file())
    victim = max(files, key=lambda p: p.stat().st_size)  # the largest data file
    if how == "truncate":
        victim.write_bytes(victim.read_bytes()[:100])
    else:
        victim.unlink()
    capsys.readouterr()
    res = train(_data_model(), _train_cfg(run, eval_every=0))
    err = capsys.readouterr().err
    assert res.resumed_from == 2 and res.step == 4
    assert "checkpoint step 4" in err and "does not restore" in err and "resuming from step 2" in err, err
    assert (run / "damaged_checkpoints" / "4" / "params").is_dir()  # moved aside, not deleted
    assert _steps(run) == [2, 4]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]  # steps 3, 4 once each


def test_resume_truncates_metrics_and_keeps_checkpoint_eval(tmp_path):
    from gqa_uptrain.metrics import METRICS_FILE, read_metrics
    from gqa_uptrain.train import train
    run = tmp_path / "run"
    train(_data_model(), _train_cfg(run))
    # As if the run had been killed after saving step 4 but before its eval record, having logged two more
    # steps of a longer run (and torn the last line).
    recs = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    recs = [r for r in recs if not (r["split"] == "eval" and r["step"] == 4)]
    recs += [{"step": 5, "split": "train", "loss": 1.0}, {"step": 6, "split": "train", "loss": 1.0}]
    (run / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 7, "spl')
    res = train(_data_model(), _train_cfg(run, train_steps=6))
    assert res.resumed_from == 4
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_metrics(run, "eval")] == [2, 4, 6]

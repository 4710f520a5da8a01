"""Readers (HF safetensors incl. sharded, T5X msgpack/tensorstore, ours) and the convert/export CLI on bad input.

No torch needed: HF-format directories are written with the safetensors library (numpy API)."""
import json
import pathlib

import jax
import numpy as np
import pytest
from flax import serialization, traverse_util

from gqa_uptrain import hf, readers
from gqa_uptrain.cli import main
from safetensors.numpy import save_file

from gqa_uptrain.model import init_params


@pytest.fixture
def params(tiny_config):
    return jax.tree.map(np.array, init_params(tiny_config, jax.random.PRNGKey(0)))


def _assert_same(a, b):
    fa, fb = traverse_util.flatten_dict(a, sep="/"), traverse_util.flatten_dict(b, sep="/")
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), rtol=1e-6, err_msg=k)


def _nested(flat):
    return traverse_util.unflatten_dict(flat, sep="/")


def write_hf_dir(path: pathlib.Path, cfg, params, shards: int = 1, drop=(), extra=None, reshape=None):
    path.mkdir(parents=True)
    tensors = dict(hf.iter_hf_tensors(params, cfg))
    for k in drop:
        tensors.pop(k)
    tensors.update(extra or {})
    for k, shape in (reshape or {}).items():
        tensors[k] = np.zeros(shape, np.float32)
    names = list(tensors)
    if shards == 1:
        save_file({n: tensors[n] for n in names}, str(path / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(path / fname))
            weight_map.update({n: fname for n in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    conf = hf.hf_config_from_config(cfg)
    (path / "config.json").write_text(json.dumps(conf))
    return path


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_safetensors_single_and_sharded(tmp_path, tiny_config, params, shards):
    write_hf_dir(tmp_path / "hf", tiny_config, params, shards=shards)
    seen = []
    src = readers.open_source(tmp_path / "hf")
    assert src.format == "hf" and src.config == tiny_config
    assert len(src.tensors) == len(hf.name_map(tiny_config)) + 1  # + the untied logits kernel
    _assert_same(_nested(src.load_all(progress=lambda it: (seen.append(x) or x for x in it))), params)
    assert len(seen) == len(src.tensors)
    assert len(src.files) == 1 + shards + (shards > 1)


def test_safetensors_reader_reads_library_files(tmp_path):
    """SafetensorsFile (the library's safe_open underneath) reads what the library writes, bf16 and row ranges too."""
    import ml_dtypes
    from safetensors.numpy import load_file
    arrs = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2,), np.int64),
            "c": np.linspace(0, 1, 6).astype(ml_dtypes.bfloat16).reshape(2, 3)}
    save_file(arrs, str(tmp_path / "ref.safetensors"))
    f = readers.SafetensorsFile(tmp_path / "ref.safetensors")
    ref = load_file(str(tmp_path / "ref.safetensors"))  # the safetensors package's own reader
    assert sorted(ref) == sorted(f) == ["a", "b", "c"] and ref["c"].dtype == ml_dtypes.bfloat16
    for k, v in arrs.items():
        assert f[k].dtype == v.dtype == ref[k].dtype == f.dtype(k) and f.shape(k) == v.shape
        # Bit for bit (bf16 included: compared as raw bytes, not through a float cast).
        assert f[k].tobytes() == ref[k].tobytes() == v.tobytes(), k
    np.testing.assert_array_equal(f.read_rows("a", 1, 3), arrs["a"][1:3])


def check_tensor_reader(reader, expected=None):
    """`reader` follows readers.TensorReader: names, and for each a numpy array whose shape and dtype are the ones
    announced; `expected` (name -> array) pins the values."""
    assert isinstance(reader, readers.TensorReader)
    names = list(reader)
    assert names and len(reader) == len(names) and list(reader.keys()) == names and names[0] in reader
    for n in names:
        shape, dtype = reader.shape(n), reader.dtype(n)
        a = reader[n]
        assert isinstance(a, np.ndarray) and a.shape == shape and a.dtype == dtype, (n, a.shape, shape, a.dtype, dtype)
        if expected is not None:
            assert a.tobytes() == np.asarray(expected[n]).astype(dtype).tobytes(), n
    with pytest.raises(KeyError):
        reader["no/such/tensor"]


def test_every_reader_is_a_lazy_tensor_reader(tmp_path, tiny_config, params):
    import ml_dtypes

    from gqa_uptrain import checkpoint
    arrs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "c": np.ones((3,), ml_dtypes.bfloat16)}
    save_file(arrs, str(tmp_path / "one.safetensors"))
    single = readers.SafetensorsFile(tmp_path / "one.safetensors")
    check_tensor_reader(single, arrs)
    (tmp_path / "one.safetensors").unlink()  # names, shapes and dtypes came from the header: no data was kept
    assert single.shape("c") == (3,) and single.dtype("c") == ml_dtypes.bfloat16
    flat = traverse_util.flatten_dict(params, sep="/")
    write_hf_dir(tmp_path / "hf", tiny_config, params, shards=3)
    hf_tensors = dict(hf.iter_hf_tensors(params, tiny_config))
    check_tensor_reader(readers.ShardedSafetensors(tmp_path / "hf" / "model.safetensors.index.json"), hf_tensors)
    check_tensor_reader(readers.open_source(tmp_path / "hf").tensors, flat)  # our names and layout
    ts_names = ["encoder/layers_0/mlp/wi_0/kernel"]
    _write_t5x(tmp_path / "t5x" / "checkpoint_3", _t5x_state(params, "new", 3), ts_names)
    t5x, _, _ = readers.read_t5x_state(tmp_path / "t5x")
    check_tensor_reader(t5x, flat)  # inline msgpack arrays and a tensorstore one
    check_tensor_reader(readers.open_source(tmp_path / "t5x").tensors, flat)
    checkpoint.save_params(tmp_path / "ours", params, tiny_config)
    check_tensor_reader(checkpoint.open_params(tmp_path / "ours").params, flat)  # orbax, one partial restore each
    check_tensor_reader(readers.open_source(tmp_path / "ours").tensors, flat)


def test_torch_bin_reader(tmp_path, tiny_config, params):
    torch = pytest.importorskip("torch")  # the optional 'hf' extra
    import ml_dtypes
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf.iter_hf_tensors(params, tiny_config)}
    state["extra_bf16"] = torch.arange(4, dtype=torch.float32).to(torch.bfloat16)
    torch.save(state, tmp_path / "pytorch_model.bin")
    reader = readers.TorchBinTensors(tmp_path / "pytorch_model.bin")
    want = {k: v.float().numpy() for k, v in state.items()}
    check_tensor_reader(reader, want)
    assert reader.dtype("extra_bf16") == ml_dtypes.bfloat16


# --------------------------------------------------------------------------------------------- T5X


def _t5x_state(params, layout, step):
    target = jax.tree.map(np.asarray, params)
    state = {"step": np.asarray(step, np.int32),
             "param_states": jax.tree.map(lambda x: np.zeros((1,), np.float32), target)}
    return {"target": target, "state": state} if layout == "new" else {"optimizer": {"target": target,
                                                                                     "state": state}}


def _write_t5x(directory: pathlib.Path, state, ts_params=()):
    """T5X checkpoint_N/checkpoint; names in ts_params are stored as tensorstore zarr arrays beside it."""
    import tensorstore as ts
    directory.mkdir(parents=True)
    root = state["optimizer"] if "optimizer" in state else state
    prefix = "optimizer.target" if "optimizer" in state else "target"
    flat = traverse_util.flatten_dict(root["target"], sep="/")
    for name in ts_params:
        arr = flat[name]
        rel = f"{prefix}.{name.replace('/', '.')}"
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": rel},
                "metadata": {"shape": list(arr.shape), "chunks": list(arr.shape), "dtype": "<f4",
                             "compressor": {"id": "gzip"}}}
        store = ts.open({**spec, "kvstore": {"driver": "file", "path": str(directory / rel)}}, create=True).result()
        store.write(arr).result()
        flat[name] = spec
    root["target"] = traverse_util.unflatten_dict(flat, sep="/")
    (directory / "checkpoint").write_bytes(serialization.msgpack_serialize(state))
    return directory


@pytest.mark.parametrize("layout", ["new", "old"])
def test_t5x_msgpack_both_layouts_with_tensorstore(tmp_path, tiny_config, params, layout):
    ts_names = ["encoder/layers_0/mlp/wi_0/kernel", "decoder/logits_dense/kernel"]
    _write_t5x(tmp_path / "model" / "checkpoint_1234", _t5x_state(params, layout, 1234), ts_names)
    _write_t5x(tmp_path / "model" / "checkpoint_10", _t5x_state(jax.tree.map(np.zeros_like, params), layout, 10))
    # A model dir resolves to the latest step.
    src = readers.open_source(tmp_path / "model")
    assert src.format == "t5x" and src.step == 1234
    assert src.config == tiny_config.replace(relative_attention_max_distance=128)
    _assert_same(_nested(src.load_all()), params)
    assert any("encoder.layers_0.mlp.wi_0.kernel" in f for f in src.files)


def test_t5x_3d_kernels_and_gqa_shapes_inferred(tmp_path, tiny_config, params):
    cfg = tiny_config.with_decoder_kv_heads(2)
    p = jax.tree.map(np.array, init_params(cfg, jax.random.PRNGKey(1)))
    state = _t5x_state(p, "new", 7)
    att = state["target"]["decoder"]["layers_1"]["self_attention"]
    att["query"]["kernel"] = att["query"]["kernel"].reshape(32, 4, 8)      # DenseGeneral [embed, heads, kv]
    att["out"]["kernel"] = att["out"]["kernel"].reshape(4, 8, 32)
    _write_t5x(tmp_path / "checkpoint_7", state)
    src = readers.open_source(tmp_path / "checkpoint_7" / "checkpoint")
    assert src.config == cfg and src.step == 7
    _assert_same(_nested(src.load_all()), p)


def test_t5x_inconsistent_shapes_refused(tmp_path, params):
    state = _t5x_state(params, "new", 1)
    state["target"]["encoder"]["layers_0"]["attention"]["query"]["kernel"] = np.zeros((32, 30), np.float32)
    _write_t5x(tmp_path / "checkpoint_1", state)
    with pytest.raises(ValueError, match="query width 30 is not a multiple of the 4 heads"):
        readers.open_source(tmp_path / "checkpoint_1")


# --------------------------------------------------------------------------------------------- CLI


def _run(capsys, *argv):
    rc = main(list(map(str, argv)))
    return rc, capsys.readouterr().err


def test_convert_cli_hf_to_gqa_then_further(tmp_path, tiny_config, params, capsys):
    write_hf_dir(tmp_path / "hf", tiny_config, params)
    rc, err = _run(capsys, "convert", "--source", tmp_path / "hf", "--num-kv-heads", 2, "--output", tmp_path / "g2",
                   "--no-progress")
    assert rc == 0, err
    conv = json.loads((tmp_path / "g2" / "conversion.json").read_text())
    assert conv["method"] == "mean" and conv["num_kv_heads"] == 2 and conv["source_format"] == "hf"
    assert conv["grouping"]["decoder/layers_0/self_attention"]["query_to_kv_head"] == [0, 0, 1, 1]
    assert "encoder/layers_0/attention" not in conv["grouping"]  # paper default: encoder stays MHA
    assert set(conv["source_sha256"]) == {str(tmp_path / "hf" / "config.json"),
                                          str(tmp_path / "hf" / "model.safetensors")}
    assert "jax" in conv["versions"]
    from gqa_uptrain.checkpoint import load_params
    from gqa_uptrain.convert import convert_params
    loaded = load_params(tmp_path / "g2")
    assert loaded.config == tiny_config.with_decoder_kv_heads(2)
    want = convert_params(params, tiny_config, 2).params
    _assert_same(loaded.params, traverse_util.unflatten_dict(want, sep="/"))
    # Our own dir converts further (GQA-2 -> MQA); G must divide the current 2.
    rc, err = _run(capsys, "convert", "--source", tmp_path / "g2", "--num-kv-heads", 1, "--output", tmp_path / "g1",
                   "--no-progress")
    assert rc == 0, err
    assert load_params(tmp_path / "g1").config.decoder_cross_kv_heads == 1
    rc, err = _run(capsys, "convert", "--source", tmp_path / "g1", "--num-kv-heads", 2, "--output", tmp_path / "x",
                   "--no-progress")
    assert rc == 1 and "current decoder_self key/value head count 1" in err


def test_convert_streams_one_module_at_a_time(tmp_path, tiny_config, params, capsys, monkeypatch):
    """The data-free methods read, convert and write tensor by tensor: never more than one attention module's
    four kernels are read but not yet handed to orbax (flushing after every tensor here)."""
    from gqa_uptrain import checkpoint
    write_hf_dir(tmp_path / "hf", tiny_config, params)
    log = []
    real_get, real_rows = readers.SafetensorsFile.__getitem__, readers.SafetensorsFile.read_rows
    real_flush = checkpoint.ParamsWriter.flush
    monkeypatch.setattr(readers.SafetensorsFile, "__getitem__", lambda self, n: log.append(1) or real_get(self, n))
    monkeypatch.setattr(readers.SafetensorsFile, "read_rows",  # the head is read in row blocks
                        lambda self, n, a, b: (a == 0 and log.append(1)) or real_rows(self, n, a, b))
    monkeypatch.setattr(checkpoint.ParamsWriter, "flush",
                        lambda self: log.append(-len(self._pending)) or real_flush(self))
    monkeypatch.setattr(checkpoint, "FLUSH_BYTES", 0)
    rc, err = _run(capsys, "convert", "--source", tmp_path / "hf", "--num-kv-heads", 1, "--output", tmp_path / "g1",
                   "--no-progress")
    assert rc == 0, err
    outstanding = np.cumsum(log)
    assert sum(x for x in log if x > 0) == len(hf.name_map(tiny_config)) + 1  # every tensor read exactly once
    assert outstanding.max() <= 4 and outstanding[-1] == 0
    loaded = checkpoint.load_params(tmp_path / "g1")
    from gqa_uptrain.convert import convert_params
    _assert_same(loaded.params, _nested(convert_params(params, tiny_config, 1).params))
    # Lazy reading of our own dir (orbax partial restore) gives the same tensors.
    lazy = checkpoint.open_params(tmp_path / "g1").params
    np.testing.assert_array_equal(lazy["decoder/layers_1/self_attention/key/kernel"],
                                  loaded.params["decoder"]["layers_1"]["self_attention"]["key"]["kernel"])


def _bad_case(tmp_path, tiny_config, params, case):
    hf_dir = tmp_path / "hf"
    if case == "missing_key":
        write_hf_dir(hf_dir, tiny_config, params, drop=["decoder.block.1.layer.2.DenseReluDense.wo.weight"])
        return hf_dir, "missing tensor 'decoder.block.1.layer.2.DenseReluDense.wo.weight'"
    if case == "extra_key":
        write_hf_dir(hf_dir, tiny_config, params, extra={"decoder.block.2.layer.0.layer_norm.weight": np.ones(32)})
        return hf_dir, "unexpected tensor 'decoder.block.2.layer.0.layer_norm.weight'"
    if case == "shape":
        write_hf_dir(hf_dir, tiny_config, params, reshape={"encoder.block.1.layer.0.SelfAttention.k.weight": (24, 32)})
        return hf_dir, "encoder.block.1.layer.0.SelfAttention.k.weight has shape (24, 32), expected (32, 32)"
    write_hf_dir(hf_dir, tiny_config, params)
    st = hf_dir / "model.safetensors"
    raw = bytearray(st.read_bytes())
    if case == "corrupt_header":
        raw[10:20] = b"\x00garbage!!"
        st.write_bytes(bytes(raw))
        return hf_dir, f"{st}: not a valid safetensors file"
    if case == "truncated":
        st.write_bytes(bytes(raw[:-100]))
        return hf_dir, f"{st}: not a valid safetensors file"
    if case == "relu":
        conf = json.loads((hf_dir / "config.json").read_text())
        conf["feed_forward_proj"] = "relu"
        (hf_dir / "config.json").write_text(json.dumps(conf))
        return hf_dir, "feed_forward_proj='relu' is not supported"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_key", "extra_key", "shape", "corrupt_header", "truncated", "relu"])
def test_convert_cli_bad_sources(tmp_path, tiny_config, params, capsys, case):
    source, msg = _bad_case(tmp_path, tiny_config, params, case)
    rc, err = _run(capsys, "convert", "--source", source, "--num-kv-heads", 2, "--output", tmp_path / "out",
                   "--no-progress")
    assert rc == 1
    assert msg in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left behind


@pytest.mark.parametrize("argv,msg", [
    (["--num-kv-heads", "3"], "--num-kv-heads 3 does not divide num_heads=4; valid values are [1, 2, 4]"),
    (["--num-kv-heads", "8"], "--num-kv-heads 8 exceeds num_heads=4"),
    (["--num-kv-heads", "2", "--source-format", "gguf"], "unknown --source-format 'gguf'"),
    (["--num-kv-heads", "2", "--source-format", "t5x"], "no T5X 'checkpoint' file"),
])
def test_convert_cli_bad_arguments(tmp_path, tiny_config, params, capsys, argv, msg):
    write_hf_dir(tmp_path / "hf", tiny_config, params)
    rc, err = _run(capsys, "convert", "--source", tmp_path / "hf", "--output", tmp_path / "out", "--no-progress", *argv)
    assert rc == 1 and msg in err, err
    assert not (tmp_path / "out").exists()


def test_output_exists_without_overwrite(tmp_path, tiny_config, params, capsys):
    write_hf_dir(tmp_path / "hf", tiny_config, params)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    rc, err = _run(capsys, "convert", "--source", tmp_path / "hf", "--num-kv-heads", 2, "--output", tmp_path / "out")
    assert rc == 1 and "already exists (pass --overwrite" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    rc, err = _run(capsys, "export", "--checkpoint", tmp_path / "hf", "--output", tmp_path / "out")
    assert rc == 1 and "already exists" in err
    rc, err = _run(capsys, "export", "--checkpoint", tmp_path / "hf", "--output", tmp_path / "e2", "--format", "onnx")
    assert rc == 1 and "unknown export --format 'onnx'" in err and not (tmp_path / "e2").exists()


def test_compare_prints_a_row_per_method(tmp_path, tiny_config, params, capsys):
    write_hf_dir(tmp_path / "hf", tiny_config, params)
    data = tmp_path / "val.jsonl"
    r = np.random.RandomState(0)
    data.write_text("".join(json.dumps({"inputs": r.randint(2, 96, 12).tolist(),
                                        "targets": r.randint(2, 96, 6).tolist()}) + "\n" for _ in range(8)))
    rc = main(["convert", "--source", str(tmp_path / "hf"), "--num-kv-heads", "1", "--compare", "--compare-data",
               str(data), "--calibration", str(data), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line and line.split()[0] in
             ("source", "mean", "first", "random", "align", "svd")}
    assert set(lines) == {"source", "mean", "first", "random", "align", "svd"}
    losses = {k: float(v[1] if k != "source" else v[2]) for k, v in lines.items()}
    assert all(np.isfinite(list(losses.values())))
    assert len(set(round(v, 6) for v in losses.values())) == 6  # methods differ
    assert float(lines["svd"][4]) < float(lines["mean"][4])  # K error column


def test_blockwise_transpose_reads_rows(tmp_path, tiny_config, params):
    """The vocab-sized head is transposed block by block from row reads; same result as a whole transpose."""
    write_hf_dir(tmp_path / "hf", tiny_config, params, shards=2)
    for f in (readers.SafetensorsFile(next((tmp_path / "hf").glob("*00001-of-*.safetensors"))),
              readers.ShardedSafetensors(tmp_path / "hf" / "model.safetensors.index.json")):
        name = next(n for n in f if f.shape(n)[0] == tiny_config.vocab_size or len(f.shape(n)) == 2)
        want = np.ascontiguousarray(f[name].T)
        got = hf._read_transposed(f, name, np.float32, block_bytes=7 * f.shape(name)[1] * 4)  # 7-row blocks
        np.testing.assert_array_equal(got, want)
        assert got.flags.c_contiguous


def test_directories_from_earlier_versions_still_load(tmp_path, tiny_config, params):
    """Converted dirs written before the streaming writer hold the pytree directly in DIR/params."""
    import orbax.checkpoint as ocp

    from gqa_uptrain import checkpoint
    d = tmp_path / "old"
    d.mkdir()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(d / checkpoint.PARAMS_DIR, params)
    checkpoint.write_config_files(d, tiny_config)
    _assert_same(checkpoint.load_params(d).params, params)
    lazy = checkpoint.open_params(d).params
    np.testing.assert_array_equal(lazy["encoder/layers_0/mlp/wo/kernel"],
                                  params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])


def test_incomplete_params_dir_is_a_clear_error(tmp_path, tiny_config):
    from gqa_uptrain import checkpoint
    (tmp_path / "bad" / checkpoint.PARAMS_DIR).mkdir(parents=True)
    checkpoint.write_config_files(tmp_path / "bad", tiny_config)
    with pytest.raises(FileNotFoundError, match="not a complete orbax checkpoint"):
        checkpoint.load_params(tmp_path / "bad")

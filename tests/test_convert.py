"""Conversion methods (pure functions) compared on logits and calibration errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gqa_uptrain import convert
from gqa_uptrain.model import Transformer, init_params
from gqa_uptrain.trees import nested_params


def _batch(vocab, seed=0, b=3, src=10, tgt=7):
    r = np.random.RandomState(seed)
    enc = r.randint(2, vocab, size=(b, src))
    enc[0, 8:] = 0
    dec_tgt = r.randint(2, vocab, size=(b, tgt))
    dec_in = np.concatenate([np.zeros((b, 1), int), dec_tgt[:, :-1]], axis=1)
    return enc, dec_in, dec_tgt


def _logits(cfg, flat, batch):
    params = nested_params(flat)
    enc, dec_in, dec_tgt = batch
    return np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec_in),
                                             jnp.asarray(dec_tgt)))


def _flat_params(cfg, seed=0):
    return {k: np.array(v) for k, v in
            traverse_util.flatten_dict(init_params(cfg, jax.random.PRNGKey(seed)), sep="/").items()}


def _random_orthogonal(r, d):
    q, _ = np.linalg.qr(r.randn(d, d))
    return q.astype(np.float32)


def _modules(cfg, layers):
    return [p for k in convert.kinds_for(layers) for p in convert.module_paths(cfg, k)]


def test_identity_when_num_kv_heads_equals_heads(tiny_config):
    flat = _flat_params(tiny_config)
    batch = _batch(tiny_config.vocab_size)
    for method in ("mean", "first", "align", "svd"):
        res = convert.convert_params(flat, tiny_config, tiny_config.num_heads, "all", method)
        assert res.config == tiny_config.replace(encoder_kv_heads=4, decoder_self_kv_heads=4,
                                                 decoder_cross_kv_heads=4)
        np.testing.assert_allclose(_logits(res.config, res.params, batch), _logits(tiny_config, flat, batch),
                                   atol=2e-5, err_msg=method)


@pytest.mark.parametrize("layers", ["decoder", "all"])
def test_mean_of_equal_heads_reproduces_source(tiny_config, layers):
    """Heads equal within each group of 2: mean (and first) pooling to G=2 is exact; the paper default leaves the
    encoder MHA."""
    cfg, g = tiny_config, 2
    flat = _flat_params(cfg, seed=1)
    d = cfg.head_dim
    for prefix in _modules(cfg, layers):
        for n in ("key", "value"):
            w = flat[f"{prefix}/{n}/kernel"].reshape(cfg.d_model, g, cfg.num_heads // g, d)
            flat[f"{prefix}/{n}/kernel"] = np.repeat(w[:, :, :1], cfg.num_heads // g, axis=2).reshape(cfg.d_model, -1)
    batch = _batch(cfg.vocab_size)
    want = _logits(cfg, flat, batch)
    for method in ("mean", "first"):
        res = convert.convert_params(flat, cfg, g, layers, method)
        assert res.config.decoder_self_kv_heads == 2 and res.config.decoder_cross_kv_heads == 2
        assert res.config.encoder_kv_heads == (2 if layers == "all" else 4)
        assert res.params["decoder/layers_0/self_attention/key/kernel"].shape == (cfg.d_model, g * d)
        np.testing.assert_allclose(_logits(res.config, res.params, batch), want, atol=2e-5)
    # And the result differs from the source when heads are NOT equal (the test can fail).
    plain = _flat_params(cfg, seed=1)
    res = convert.convert_params(plain, cfg, g, layers, "mean")
    assert np.abs(_logits(res.config, res.params, batch) - _logits(cfg, plain, batch)).max() > 1e-3


def test_mean_first_random_kernels(tiny_config):
    cfg, d = tiny_config, tiny_config.head_dim
    flat = _flat_params(cfg)
    k = flat["decoder/layers_1/self_attention/key/kernel"]
    res = convert.convert_params(flat, cfg, 2, "decoder", "mean")
    np.testing.assert_allclose(res.params["decoder/layers_1/self_attention/key/kernel"][:, d:2 * d],
                               (k[:, 2 * d:3 * d] + k[:, 3 * d:4 * d]) / 2, rtol=1e-6)
    res = convert.convert_params(flat, cfg, 1, "decoder", "first")
    np.testing.assert_array_equal(res.params["decoder/layers_1/self_attention/key/kernel"], k[:, :d])
    # Untouched tensors are shared, not copied; encoder stays MHA by default.
    assert res.params["encoder/layers_0/attention/key/kernel"] is flat["encoder/layers_0/attention/key/kernel"]
    r1 = convert.convert_params(flat, cfg, 2, "decoder", "random", seed=3).params
    r2 = convert.convert_params(flat, cfg, 2, "decoder", "random", seed=3).params
    r3 = convert.convert_params(flat, cfg, 2, "decoder", "random", seed=4).params
    name = "decoder/layers_0/encoder_decoder_attention/value/kernel"
    np.testing.assert_array_equal(r1[name], r2[name])
    assert not np.allclose(r1[name], r3[name])
    assert r1[name].shape == (cfg.d_model, 2 * d)
    # fan_in normal init: std ~ 1/sqrt(d_model)
    assert abs(r1[name].std() * np.sqrt(cfg.d_model) - 1) < 0.25


def test_rotation_before_merge_preserves_the_function(tiny_config):
    """The pre-merge transform of `align` (and any orthogonal per-head rotation) leaves the MHA model unchanged."""
    cfg = tiny_config
    flat = _flat_params(cfg, seed=2)
    batch = _batch(cfg.vocab_size)
    want = _logits(cfg, flat, batch)
    r = np.random.RandomState(0)
    rotated = dict(flat)
    for prefix in _modules(cfg, "all"):
        w = convert.AttentionWeights(*(flat[f"{prefix}/{n}/kernel"] for n in ("query", "key", "value", "out")))
        rk = np.stack([_random_orthogonal(r, cfg.head_dim) for _ in range(cfg.num_heads)])
        rv = np.stack([_random_orthogonal(r, cfg.head_dim) for _ in range(cfg.num_heads)])
        new = convert.rotate_heads(w, cfg.num_heads, cfg.num_heads, cfg.head_dim, rk, rv)
        assert not np.allclose(new.k, w.k)
        for n, a in zip(("query", "key", "value", "out"), (new.q, new.k, new.v, new.o)):
            rotated[f"{prefix}/{n}/kernel"] = a
    np.testing.assert_allclose(_logits(cfg, rotated, batch), want, atol=3e-5)


def _rotated_duplicate_heads(cfg, g, noise, seed=0):
    """A model whose heads in each group compute nearly the same function in rotated coordinates."""
    flat = _flat_params(cfg, seed=seed)
    r = np.random.RandomState(seed)
    per = cfg.num_heads // g
    for prefix in _modules(cfg, "decoder"):
        w = convert.AttentionWeights(*(flat[f"{prefix}/{n}/kernel"] for n in ("query", "key", "value", "out")))
        q, k, v = (convert._heads(a, cfg.num_heads, cfg.head_dim) for a in (w.q, w.k, w.v))
        o = convert._out_heads(w.o, cfg.num_heads, cfg.head_dim)
        for h in range(cfg.num_heads):
            base = (h // per) * per
            rk, rv = _random_orthogonal(r, cfg.head_dim), _random_orthogonal(r, cfg.head_dim)
            if h != base:
                q[h], k[h] = q[base] @ rk, k[base] @ rk + noise * r.randn(*k[h].shape) / np.sqrt(cfg.d_model)
                v[h], o[h] = v[base] @ rv + noise * r.randn(*v[h].shape) / np.sqrt(cfg.d_model), rv.T @ o[base]
        flat[f"{prefix}/query/kernel"], flat[f"{prefix}/key/kernel"] = convert._join(q), convert._join(k)
        flat[f"{prefix}/value/kernel"] = convert._join(v)
        flat[f"{prefix}/out/kernel"] = np.ascontiguousarray(o.reshape(-1, cfg.d_model))
    return flat


def test_align_beats_mean_on_rotated_near_duplicate_heads(tiny_config):
    cfg, g = tiny_config, 2
    flat = _rotated_duplicate_heads(cfg, g, noise=0.02)
    batch = _batch(cfg.vocab_size, seed=5)
    calib = convert.collect_calibration(flat, cfg, *_batch(cfg.vocab_size, seed=6, b=4, src=12, tgt=9))
    assert set(calib) == set(_modules(cfg, "decoder"))
    assert calib["decoder/layers_0/encoder_decoder_attention"].shape == (4 * 12 - 4, cfg.d_model)  # padding dropped
    want = _logits(cfg, flat, batch)
    errors = {}
    for method in ("mean", "align"):
        res = convert.convert_params(flat, cfg, g, "decoder", method, calibration=calib, measure_error=True)
        errors[method] = np.abs(_logits(res.config, res.params, batch) - want).max()
        errors[method + "_k"] = res.grouping["decoder/layers_0/self_attention"]["k_rel_error"]
    assert errors["align"] < 0.25 * errors["mean"], errors
    assert errors["align_k"] < 0.1 < errors["mean_k"], errors


def test_svd_has_lower_calibration_error_than_mean(tiny_config):
    cfg = tiny_config
    flat = _flat_params(cfg, seed=3)
    calib = convert.collect_calibration(flat, cfg, *_batch(cfg.vocab_size, seed=7, b=4, src=12, tgt=9))
    errs = {}
    for method in ("mean", "first", "svd"):
        res = convert.convert_params(flat, cfg, 1, "decoder", method, calibration=calib, measure_error=True)
        errs[method] = [(v["k_rel_error"], v["v_rel_error"]) for v in res.grouping.values()]
    for (mk, mv), (sk, sv) in zip(errs["mean"], errs["svd"]):
        assert sk < mk - 0.01 and sv < mv - 0.01, errs
    # Low-rank reconstruction is exact when the group's keys already span only head_dim directions.
    # (G=H: every group is one head, so svd must reproduce the model.)
    res = convert.convert_params(flat, cfg, cfg.num_heads, "decoder", "svd", calibration=calib, measure_error=True)
    assert max(v["k_rel_error"] for v in res.grouping.values()) < 1e-5
    batch = _batch(cfg.vocab_size)
    np.testing.assert_allclose(_logits(res.config, res.params, batch), _logits(cfg, flat, batch), atol=3e-5)


def test_converting_a_gqa_model_further(tiny_config):
    """GQA-2 -> MQA works; G must divide the current kv-head count."""
    cfg = tiny_config
    res = convert.convert_params(_flat_params(cfg), cfg, 2, "decoder", "mean")
    res1 = convert.convert_params(res.params, res.config, 1, "decoder", "mean")
    assert res1.config.decoder_self_kv_heads == 1
    direct = convert.convert_params(_flat_params(cfg), cfg, 1, "decoder", "mean")
    name = "decoder/layers_0/self_attention/key/kernel"
    np.testing.assert_allclose(res1.params[name], direct.params[name], rtol=1e-6, atol=1e-7)
    assert res1.grouping["decoder/layers_0/self_attention"]["source_kv_heads"] == 2
    with pytest.raises(ValueError, match="current decoder_self key/value head count 2"):
        convert.validate_target(res.config.replace(num_heads=8, head_dim=4), 4, "decoder")


@pytest.mark.parametrize("g,msg", [(3, "does not divide num_heads=4"), (8, "exceeds num_heads=4"),
                                   (0, "positive integer")])
def test_bad_num_kv_heads(tiny_config, g, msg):
    with pytest.raises(ValueError, match=msg):
        convert.convert_params(_flat_params(tiny_config), tiny_config, g)


def test_unknown_method_and_layers(tiny_config):
    with pytest.raises(ValueError, match="unknown conversion method 'median'"):
        convert.convert_params({}, tiny_config, 2, method="median")
    with pytest.raises(ValueError, match="--layers must be one of"):
        convert.convert_params({}, tiny_config, 2, layers="encoder")


# ------------------------------------------------------------------- manifest.json: one typed, versioned format

def _tiny_source(tmp_path, metadata):
    from gqa_uptrain import checkpoint
    from gqa_uptrain.config import ModelConfig
    cfg = ModelConfig(vocab_size=4224, d_model=16, num_heads=2, head_dim=8, d_ff=16, num_encoder_layers=1,
                      num_decoder_layers=1)
    params = {k: np.zeros(s, np.float32) for k, s in checkpoint.expected_shapes(cfg).items()}
    return checkpoint.save_params(tmp_path / "src", params, cfg, metadata=metadata)


def test_convert_writes_a_versioned_manifest_that_train_sweep_and_export_read(tmp_path, capsys):
    import json

    from gqa_uptrain import checkpoint, sweep
    from gqa_uptrain.cli import main
    from gqa_uptrain.train import TrainConfig, recorded_source_step, resolve_length
    src = _tiny_source(tmp_path, {"step": 300})
    out = tmp_path / "conv"
    assert main(["convert", "--source", str(src), "--num-kv-heads", "1", "--output", str(out), "--no-progress"]) == 0
    # The keys convert wrote before the manifest was a type, plus the version.
    assert json.loads((out / "manifest.json").read_text()) == {
        "version": 1, "step": 300, "source_step": 300, "converted_from": "orbax", "method": "mean"}
    manifest = checkpoint.Manifest.read(out)
    assert (manifest.version, manifest.pretrain_step, manifest.converted_from) == (1, 300, "orbax")
    assert recorded_source_step(str(out)) == 300                                   # train's INITIAL_CHECKPOINT
    assert resolve_length(TrainConfig(model_dir="x", uptrain_fraction=0.05), manifest) == (15, 300)
    assert sweep._source_info(str(out)) == (2, 300)                                # sweep's ORIGINAL_STEPS
    assert checkpoint.open_params(out).step == 300                                  # export's step
    assert checkpoint.open_params(out).manifest == manifest


def test_manifest_without_version_reads_as_version_1(tmp_path):
    import json

    from gqa_uptrain.checkpoint import Manifest
    from gqa_uptrain.train import recorded_source_step
    d = _tiny_source(tmp_path, None)
    # Exactly what convert wrote before the version field existed.
    (d / "manifest.json").write_text(json.dumps({"converted_from": "t5x", "method": "mean", "source_step": 250,
                                                 "step": 250}))
    m = Manifest.read(d)
    assert (m.version, m.step, m.source_step, m.converted_from, m.method) == (1, 250, 250, "t5x", "mean")
    assert recorded_source_step(str(d)) == 250
    (d / "manifest.json").write_text(json.dumps({"step": 200.0, "note": "mine"}))  # hand-written, own key kept
    m = Manifest.read(d)
    assert (m.version, m.pretrain_step, dict(m.extra)) == (1, 200, {"note": "mine"})
    assert json.loads(m.to_json()) == {"version": 1, "step": 200, "note": "mine"}
    (d / "manifest.json").write_text("{}")  # save_params without metadata, and step 0: nothing recorded
    assert recorded_source_step(str(d)) is None
    (d / "manifest.json").unlink()          # a training MODEL_DIR has no manifest
    assert Manifest.read(d) is None and recorded_source_step(str(d)) is None


@pytest.mark.parametrize("text,message", [
    ('{"version": 2, "step": 5}', "manifest.json: manifest version 2 is newer than this gqa_uptrain reads (version 1)"),
    ('{"version": "1"}', "manifest.json: version='1' is not a manifest version"),
    ('{"version": 0}', "manifest.json: version=0 is not a manifest version"),
    ('[1, 2]', "manifest.json: expected a JSON object, got list"),
    ('{"step": "300"}', "manifest.json: step='300' must be a non-negative integer or null"),
    ('{"source_step": 1.5}', "manifest.json: source_step=1.5 must be a non-negative integer or null"),
    ('{"method": 3}', "manifest.json: method=3 must be a string or null"),
    ('{"step": ', "manifest.json is not valid JSON"),
])
def test_bad_manifest_is_one_line_naming_file_key_and_value(tmp_path, capsys, text, message):
    from gqa_uptrain.checkpoint import Manifest
    from gqa_uptrain.cli import main
    d = _tiny_source(tmp_path, None)
    (d / "manifest.json").write_text(text)
    with pytest.raises(ValueError) as e:
        Manifest.read(d)
    assert message in str(e.value) and "\n" not in str(e.value)
    # The commands read it the same way: export reports it in one line, without a traceback.
    assert main(["export", "--checkpoint", str(d), "--output", str(tmp_path / "hf")]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_save_params_checks_its_manifest_before_writing(tmp_path):
    with pytest.raises(ValueError, match="manifest metadata: step='x' must be a non-negative integer"):
        _tiny_source(tmp_path, {"step": "x"})
    assert not (tmp_path / "src").exists()

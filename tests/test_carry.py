"""Carrying Adafactor's state through conversion (issue #16): the statistics' algebra, the moment-merging rule,
the converted directory, T5X sources, the restart warm-up, and train restoring the state (G = H gives the same
first update as continuing the MHA run)."""
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization, traverse_util

from gqa_uptrain import checkpoint, convert, optim
from gqa_uptrain import train as train_lib
from gqa_uptrain.cli import main
from gqa_uptrain.config import ModelConfig
from gqa_uptrain.optim import OptimizerConfig

# Smallest model that takes the bundled vocabulary's ids; min_dim_size_to_factor=16 makes its [32, 32] kernels
# factored, MQA's [32, 8] K/V kernels and the relative-position tables unfactored: both kinds are exercised.
DATA_MODEL = ModelConfig(vocab_size=4224, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=1,
                         num_decoder_layers=1)
MIN_DIM = 16
OPT = OptimizerConfig(schedule="rsqrt", warmup_steps=1, min_dim_size_to_factor=MIN_DIM)


def _tc(model_dir, **kw):
    base = dict(model_dir=str(model_dir), inputs_length=32, targets_length=8, batch_size=4, train_steps=3,
                save_every=100, eval_every=0, log_every=1, progress=False, tensorboard=False, optimizer=OPT)
    base.update(kw)
    return train_lib.TrainConfig(**base)


def _positive(shape, seed):
    return np.random.RandomState(seed).uniform(0.1, 2.0, size=shape).astype(np.float32)


# ------------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize("shape,min_dim", [((32, 48), 16), ((48, 32), 16), ((32, 32), 16), ((32, 8), 16),
                                           ((7,), 16), ((4, 32), 2)])
def test_factoring_rule_matches_optax_state_shapes(shape, min_dim):
    opt = optax.scale_by_factored_rms(min_dim_size_to_factor=min_dim)
    state = opt.init({"p": jnp.zeros(shape)})
    stats = optim.factor_second_moment(_positive(shape, 0), min_dim)
    if "v" in stats:
        assert state.v["p"].shape == shape and state.v_row["p"].shape == (1,)
    else:
        assert (stats["v_row"].shape, stats["v_col"].shape) == (state.v_row["p"].shape, state.v_col["p"].shape)


def test_second_moment_is_adafactors_own_estimate_and_refactoring_is_exact():
    """The reconstruction is what optax divides by: updates from (v_row, v_col) equal g / sqrt(second_moment)."""
    shape = (32, 48)
    opt = optax.scale_by_factored_rms(min_dim_size_to_factor=16, decay_rate=0.8)
    g = {"p": jnp.asarray(np.random.RandomState(1).normal(size=shape), jnp.float32)}
    state = opt.init(g)
    for i in range(3):
        gi = jax.tree.map(lambda x: x * (1 + i), g)
        u, state = opt.update(gi, state, gi)
    stats = {"v_row": np.asarray(state.v_row["p"]), "v_col": np.asarray(state.v_col["p"])}
    v = optim.second_moment(stats, shape)
    assert v.shape == shape and np.all(v > 0)
    np.testing.assert_allclose(np.asarray(u["p"]), np.asarray(gi["p"]) / np.sqrt(v), rtol=1e-4)
    # Rank one: refactoring gives the statistics back, and fit_statistics leaves matching ones untouched.
    again = optim.factor_second_moment(v, 16)
    np.testing.assert_allclose(again["v_row"], stats["v_row"], rtol=1e-5)
    np.testing.assert_allclose(again["v_col"], stats["v_col"], rtol=1e-5)
    assert optim.fit_statistics(stats, shape, 16)["v_row"] is not None
    np.testing.assert_array_equal(optim.fit_statistics(stats, shape, 16)["v_row"], stats["v_row"])
    # A larger threshold wants the full matrix: the reconstruction.
    np.testing.assert_allclose(optim.fit_statistics(stats, shape, 64)["v"], v)
    with pytest.raises(ValueError, match="do not fit a parameter of shape"):
        optim.second_moment(stats, (48, 33), "x/kernel")
    with pytest.raises(ValueError, match="x/kernel: second moment v has shape"):
        optim.second_moment({"v": np.ones((3,))}, (4,), "x/kernel")


def test_fresh_zero_statistics_reconstruct_to_zero_not_nan():
    v = optim.second_moment({"v_row": np.zeros(32), "v_col": np.zeros(48)}, (32, 48))
    assert np.all(v == 0)


def test_carried_opt_state_has_the_optimizers_structure_count_and_statistics():
    params = {"dense": {"kernel": jnp.zeros((32, 48))}, "norm": {"scale": jnp.zeros((32,))}}
    opt = optim.make_optimizer(OPT)
    moments = {"dense/kernel": {"v": _positive((32, 48), 2)}, "norm/scale": {"v": _positive((32,), 3)}}
    abstract = jax.eval_shape(opt.init, params)
    state = optim.carried_opt_state(abstract, params, moments, 1234, MIN_DIM)
    fresh = opt.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(fresh)
    assert [np.shape(x) for x in jax.tree.leaves(state)] == [np.shape(x) for x in jax.tree.leaves(fresh)]
    assert int(state[0].count) == 1234 and int(state[2].count) == 0  # Adafactor continues; the schedule restarts
    np.testing.assert_allclose(state[0].v_row["dense"]["kernel"], moments["dense/kernel"]["v"].mean(axis=1))
    np.testing.assert_array_equal(state[0].v["norm"]["scale"], moments["norm/scale"]["v"])
    with pytest.raises(ValueError, match="no statistics for 1 parameter"):
        optim.carried_opt_state(abstract, params, {"dense/kernel": moments["dense/kernel"]}, 1, MIN_DIM)


# ------------------------------------------------------------------------------------------------ merging rule


def _moments(cfg, seed=0, min_dim=1 << 30):
    """Positive random statistics for every parameter (unfactored unless min_dim allows)."""
    shapes = checkpoint.expected_shapes(cfg)
    return {n: optim.factor_second_moment(_positive(s, seed + i), min_dim) for i, (n, s) in
            enumerate(sorted(shapes.items()))}


def test_gqa_and_mqa_moment_shapes_and_the_sum_rule(tiny_config):
    m = _moments(tiny_config)
    d, r = tiny_config.head_dim, 2
    for g in (2, 1):
        out = convert.convert_moments(m, tiny_config, g, "decoder")
        shapes = checkpoint.expected_shapes(convert.target_config(tiny_config, g, "decoder"))
        assert sorted(out) == sorted(shapes)
        for name, stats in out.items():
            assert optim.second_moment(stats, shapes[name], name).shape == shapes[name]
    out = convert.convert_moments(m, tiny_config, 2, "decoder")
    key = "decoder/layers_0/self_attention/key/kernel"
    src = m[key]["v"]
    want = np.concatenate([src[:, :d] + src[:, d:2 * d], src[:, 2 * d:3 * d] + src[:, 3 * d:]], axis=1)
    np.testing.assert_allclose(out[key]["v"], want, rtol=1e-6)
    half = convert.convert_moments(m, tiny_config, 2, "decoder", rule="mean")
    np.testing.assert_allclose(half[key]["v"], want / r, rtol=1e-6)
    # Unconverted parameters (the encoder with layers=decoder, queries and outputs of mean) keep theirs.
    for name in ("encoder/layers_0/attention/key/kernel", "decoder/layers_0/self_attention/query/kernel",
                 "token_embedder/embedding"):
        assert out[name]["v"] is m[name]["v"]


def test_merging_in_stages_equals_merging_at_once(tiny_config):
    """Consistency: MHA -> GQA-2 -> MQA carries the same moments as MHA -> MQA (sums and equal-size means compose)."""
    m = _moments(tiny_config, seed=5)
    for rule in ("sum", "mean"):
        direct = convert.convert_moments(m, tiny_config, 1, "all", rule=rule)
        staged = convert.convert_moments(convert.convert_moments(m, tiny_config, 2, "all", rule=rule),
                                         convert.target_config(tiny_config, 2, "all"), 1, "all", rule=rule)
        for name in direct:
            np.testing.assert_allclose(staged[name]["v"], direct[name]["v"], rtol=1e-5, err_msg=name)


def test_equal_heads_and_identity_conversion(tiny_config):
    """G = H with identity transforms changes nothing; heads with equal moments merge to r (sum) or 1 (mean) x."""
    m = _moments(tiny_config, min_dim=16)
    same = convert.convert_moments(m, tiny_config, tiny_config.num_heads, "all")
    for name in m:
        for field in m[name]:
            assert same[name][field] is m[name][field]
    e, d = tiny_config.d_model, tiny_config.head_dim
    key = "decoder/layers_1/encoder_decoder_attention/value/kernel"
    m[key] = {"v": np.tile(_positive((e, d), 9), (1, 4))}
    out = convert.convert_moments(m, tiny_config, 1, "decoder")  # [32, 8]: unfactored at min_dim 128
    np.testing.assert_allclose(out[key]["v"], 4 * m[key]["v"][:, :d], rtol=1e-6)


def test_align_and_svd_transform_the_statistics_with_their_parameter_transforms(tiny_config):
    """A permutation as the align rotation permutes the statistics exactly (v (P o P) = v P); query columns and
    out rows follow; with svd's transforms the column weights of each merged head sum to one."""
    m = _moments(tiny_config, seed=3)
    d, h = tiny_config.head_dim, tiny_config.num_heads
    prefix = "decoder/layers_0/self_attention"
    perm = np.eye(d)[::-1]
    tk = np.stack([np.eye(d), perm, np.eye(d), perm])
    tv = np.broadcast_to(np.eye(d), (4, d, d))
    out = convert.convert_moments(m, tiny_config, 2, "decoder", transforms={prefix: (tk, tv)})
    k = m[f"{prefix}/key/kernel"]["v"]
    want = np.concatenate([k[:, :d] + k[:, d:2 * d] @ perm, k[:, 2 * d:3 * d] + k[:, 3 * d:] @ perm], axis=1)
    np.testing.assert_allclose(out[f"{prefix}/key/kernel"]["v"], want, rtol=1e-6)
    q = m[f"{prefix}/query/kernel"]["v"]
    np.testing.assert_allclose(out[f"{prefix}/query/kernel"]["v"][:, d:2 * d], q[:, d:2 * d] @ perm, rtol=1e-6)
    assert out[f"{prefix}/out/kernel"]["v"] is m[f"{prefix}/out/kernel"]["v"]  # tv = I: untouched
    # svd: transforms from a real conversion (blocks of an orthonormal basis).
    flat = {n: np.random.RandomState(0).normal(size=s).astype(np.float32)
            for n, s in checkpoint.expected_shapes(tiny_config).items()}
    transforms = {}
    dict(convert.iter_converted(flat, tiny_config, 1, "decoder", "svd", transforms=transforms))
    ones = {n: {"v": np.ones(s, np.float32)} for n, s in checkpoint.expected_shapes(tiny_config).items()}
    svd = convert.convert_moments(ones, tiny_config, 1, "decoder", transforms=transforms)
    # Unit statistics through sum_j (U_j o U_j): every column weight sums to one (U has orthonormal columns).
    np.testing.assert_allclose(svd[f"{prefix}/key/kernel"]["v"], 1.0, rtol=1e-5)
    assert svd[f"{prefix}/out/kernel"]["v"].shape == (h * d, tiny_config.d_model)


# ------------------------------------------------------------------------------------------------ manifest, T5X


def test_manifest_records_carried_state_and_reads_back():
    m = checkpoint.Manifest(step=3, optimizer_state="adafactor", optimizer_step=7)
    back = checkpoint.Manifest.from_json(json.loads(m.to_json()))
    assert back == m and back.version == 1
    with pytest.raises(ValueError, match="optimizer_step=-1 must be a non-negative integer"):
        checkpoint.Manifest.from_json({"optimizer_step": -1})
    assert "optimizer_state" not in checkpoint.Manifest(step=3).to_dict()  # unchanged for parameter-only dirs


def test_manifest_and_written_optimizer_state_must_agree(tmp_path, tiny_config):
    params = {n: np.zeros(s, np.float32) for n, s in checkpoint.expected_shapes(tiny_config).items()}
    with pytest.raises(ValueError, match="optimizer_state='adafactor' but no optimizer state to write"):
        checkpoint.save_params(tmp_path / "a", params, tiny_config,
                               metadata=checkpoint.Manifest(optimizer_state="adafactor", optimizer_step=1))
    with pytest.raises(ValueError, match="optimizer_state=None but an optimizer state"):
        checkpoint.write_checkpoint(tmp_path / "b", tiny_config, params.items(), checkpoint.Manifest(),
                                    optimizer_state=lambda: iter(()))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _t5x_checkpoint(tmp_path, cfg, step):
    params = {n: np.random.RandomState(1).normal(size=s).astype(np.float32)
              for n, s in checkpoint.expected_shapes(cfg).items()}
    moments = _moments(cfg, seed=2, min_dim=16)
    states = {}
    for name, stats in moments.items():
        states[name] = {f: stats.get(f, np.zeros((1,), np.float32)) for f in ("v_row", "v_col", "v", "m")}
    state = {"target": traverse_util.unflatten_dict(params, sep="/"),
             "state": {"step": np.asarray(step, np.int32),
                       "param_states": traverse_util.unflatten_dict(states, sep="/")}}
    d = tmp_path / "t5x" / f"checkpoint_{step}"
    d.mkdir(parents=True)
    (d / "checkpoint").write_bytes(serialization.msgpack_serialize(state))
    return d, moments


def test_t5x_optimizer_state_is_carried_and_hf_is_a_clear_error(tmp_path, tiny_config):
    cfg = tiny_config.replace(relative_attention_max_distance=128)
    ckpt, moments = _t5x_checkpoint(tmp_path, cfg, 500)
    out = tmp_path / "conv"
    assert main(["convert", "--source", str(ckpt), "--num-kv-heads", "2", "--output", str(out), "--no-progress",
                 "--carry-optimizer-state"]) == 0
    manifest = checkpoint.Manifest.read(out)
    assert (manifest.step, manifest.optimizer_state, manifest.optimizer_step) == (500, "adafactor", 500)
    carried = checkpoint.read_optimizer_moments(out)
    want = convert.convert_moments(moments, cfg, 2, "decoder")
    assert carried.step == 500 and sorted(carried.moments) == sorted(want)
    for name in want:
        for field in want[name]:
            np.testing.assert_allclose(carried.moments[name][field], want[name][field], rtol=1e-6, err_msg=name)
    assert json.loads((out / "conversion.json").read_text())["optimizer_state"]["moment_rule"] == "sum"
    from gqa_uptrain import readers
    with pytest.raises(ValueError, match="hf checkpoints hold no optimizer state"):
        readers.read_optimizer_moments(readers.Source(cfg, {}, "hf", str(tmp_path / "hf")))


def test_parameter_only_sources_are_refused_in_one_line(tmp_path, tiny_config, capsys):
    params = {n: np.zeros(s, np.float32) for n, s in checkpoint.expected_shapes(tiny_config).items()}
    src = checkpoint.save_params(tmp_path / "src", params, tiny_config)
    rc = main(["convert", "--source", str(src), "--num-kv-heads", "2", "--output", str(tmp_path / "o"),
               "--no-progress", "--carry-optimizer-state"])
    err = capsys.readouterr().err
    assert rc != 0 and "holds parameters only" in err and not (tmp_path / "o").exists()
    rc = main(["convert", "--source", str(src), "--num-kv-heads", "2", "--output", str(tmp_path / "o"),
               "--no-progress", "--moment-rule", "mean"])
    assert rc != 0 and "--moment-rule only applies with --carry-optimizer-state" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ warm-up


def test_restart_warmup_ramps_this_runs_first_steps():
    base = OptimizerConfig(schedule="rsqrt", warmup_steps=1, step_offset=100)
    ramp = OptimizerConfig(schedule="rsqrt", warmup_steps=1, step_offset=100, restart_warmup_steps=4)
    plain, warm = optim.learning_rate_schedule(base), optim.learning_rate_schedule(ramp)
    for count in range(7):
        want = float(plain(count)) * min(1.0, (count + 1) / 4)
        assert float(warm(count)) == pytest.approx(want, rel=1e-6)
    assert float(warm(0)) == pytest.approx(0.25 / math.sqrt(100), rel=1e-6)
    const = optim.learning_rate_schedule(OptimizerConfig(schedule="constant", base_learning_rate=1e-3,
                                                         restart_warmup_steps=2))
    assert [float(const(c)) for c in range(3)] == pytest.approx([5e-4, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="restart_warmup_steps must be >= 0"):
        OptimizerConfig(restart_warmup_steps=-1)


# ------------------------------------------------------------------------------------------------ train


class _FixedBatches:
    """Stand-in for train.train_batches: the same batch every step, so two runs can be fed identical data."""

    def __init__(self, batch):
        self.batch, self.iterators = batch, {}

    def __iter__(self):
        return self

    def __next__(self):
        return self.batch


@pytest.fixture(scope="module")
def mha_run(tmp_path_factory):
    """An MHA model pre-trained 3 steps on the bundled data (its Adafactor state is what gets carried)."""
    root = tmp_path_factory.mktemp("carry")
    run = root / "mha"
    train_lib.train(DATA_MODEL, _tc(run))
    batch = next(train_lib.train_batches(_tc(run, seed=11)))
    return root, run, batch


def test_converting_a_run_dir_keeps_the_step_and_g_equal_h_continues_the_mha_run(mha_run, monkeypatch, tmp_path):
    root, run, batch = mha_run
    conv = tmp_path / "conv"
    assert main(["convert", "--source", str(run), "--num-kv-heads", "4", "--output", str(conv), "--no-progress",
                 "--carry-optimizer-state"]) == 0
    manifest = checkpoint.Manifest.read(conv)
    assert (manifest.step, manifest.optimizer_state, manifest.optimizer_step) == (3, "adafactor", 3)
    assert checkpoint.read_optimizer_moments(conv).step == 3
    monkeypatch.setattr(train_lib, "train_batches", lambda cfg, start_batch=0, **kw: _FixedBatches(batch))
    # Continue the original run one step ...
    cont = tmp_path / "continued"
    shutil.copytree(run, cont)
    a = train_lib.train(DATA_MODEL, _tc(cont, train_steps=4, checkpoint_dataset=False))
    assert a.resumed_from == 3
    # ... and uptrain the G = H conversion one step with the carried state, schedule continued from step 3.
    up = _tc(tmp_path / "up", train_steps=1, initial_checkpoint=str(conv), continue_schedule=True,
             checkpoint_dataset=False)
    b = train_lib.train(DATA_MODEL, up)
    assert int(a.opt_state[0].count) == int(b.opt_state[0].count) == 4
    assert b.metrics[0]["learning_rate"] == pytest.approx(a.metrics[-1]["learning_rate"])
    moved = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a.params,
                         checkpoint.load_params(run).params)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the step really changed the parameters
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6),
                 a.params, b.params)
    # The switch ignores the carried state: a fresh Adafactor restart, a different first update.
    fresh = train_lib.train(DATA_MODEL, _tc(tmp_path / "fresh", train_steps=1, initial_checkpoint=str(conv),
                                            continue_schedule=True, checkpoint_dataset=False,
                                            restore_optimizer_state=False))
    assert int(fresh.opt_state[0].count) == 1
    diff = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), fresh.params, b.params)
    assert max(jax.tree.leaves(diff)) > 1e-5


@pytest.mark.parametrize("g,method", [(2, "mean"), (1, "svd")])
def test_uptraining_gqa_and_mqa_from_carried_state(mha_run, tmp_path, g, method):
    root, run, _ = mha_run
    conv = tmp_path / "conv"
    assert main(["convert", "--source", str(run), "--num-kv-heads", str(g), "--method", method, "--output",
                 str(conv), "--no-progress", "--carry-optimizer-state", "--calibration", "random",
                 "--calibration-examples", "2", "--calibration-length", "16"]) == 0
    carried = checkpoint.read_optimizer_moments(conv)
    cfg = checkpoint.read_config(conv)
    shapes = checkpoint.expected_shapes(cfg)
    assert sorted(carried.moments) == sorted(shapes) and carried.step == 3
    key = "decoder/layers_0/self_attention/key/kernel"
    assert ("v" in carried.moments[key]) == (g == 1)  # [32, 8] is below the factoring threshold, [32, 16] not
    res = train_lib.train(cfg, _tc(tmp_path / "up", train_steps=1, initial_checkpoint=str(conv),
                                   continue_schedule=True))
    assert int(res.opt_state[0].count) == 4 and np.isfinite(res.metrics[0]["loss"])

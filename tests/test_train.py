"""Trainer: schedules, optimiser-state shardings, loss, gradient accumulation, and short end-to-end runs."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from gqa_uptrain.checkpoint import Manifest
from gqa_uptrain.config import ModelConfig
from gqa_uptrain.model import init_params
from gqa_uptrain.optim import (OptimizerConfig, learning_rate_schedule, make_optimizer, opt_state_bytes_per_device,
                               opt_state_partition_specs)
from gqa_uptrain import train as train_lib
from gqa_uptrain.seq2seq import _argmax_last_axis
from gqa_uptrain.train import TrainConfig

# Smallest model that takes the bundled vocabulary's ids (4100 < 4224).
DATA_MODEL = ModelConfig(vocab_size=4224, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=1,
                         num_decoder_layers=1)


def _tc(model_dir, **kw):
    base = dict(model_dir=str(model_dir), inputs_length=32, targets_length=8, batch_size=4, train_steps=4,
                save_every=2, eval_every=2, eval_examples=4, log_every=1, progress=False, tensorboard=False,
                optimizer=OptimizerConfig(schedule="constant", base_learning_rate=0.01))
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------------ optimiser


def test_rsqrt_schedule_t5_values_and_offset():
    t5 = learning_rate_schedule(OptimizerConfig())
    assert float(t5(0)) == pytest.approx(0.01)          # 1/sqrt(10000) during warm-up
    assert float(t5(40_000)) == pytest.approx(0.005)    # 1/sqrt(40000)
    # Uptraining T5.1.1 (1M pre-training steps) continues at 1e-3 and decays from there.
    up = learning_rate_schedule(OptimizerConfig(step_offset=1_000_000))
    assert float(up(0)) == pytest.approx(1e-3)
    assert float(up(50_000)) == pytest.approx(1 / math.sqrt(1_050_000))
    const = learning_rate_schedule(OptimizerConfig(schedule="constant", base_learning_rate=1e-3))
    assert float(const(12345)) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="schedule"):
        OptimizerConfig(schedule="cosine")


def test_adafactor_matches_t5x_defaults_on_one_step():
    """One update of a [256, 128] matrix, recomputed by hand from the Adafactor equations (factored, no momentum,
    clip 1.0, parameter-scale, decay 0.8)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(256, 128)).astype(np.float32)
    g = rng.normal(size=(256, 128)).astype(np.float32)
    opt = make_optimizer(OptimizerConfig(schedule="constant", base_learning_rate=0.01))
    upd, _ = opt.update({"w": jnp.asarray(g)}, opt.init({"w": jnp.asarray(w)}), {"w": jnp.asarray(w)})
    g2 = g.astype(np.float64) ** 2 + 1e-30
    beta = 1 - 1.0 ** -0.8  # decay at step 0 is 0: the first estimate is the gradient's own statistics
    row, col = (1 - beta) * g2.mean(1), (1 - beta) * g2.mean(0)
    v = row[:, None] * col[None, :] / row.mean()
    u = g / np.sqrt(v)
    u /= max(1.0, np.sqrt(np.mean(u ** 2)))
    scale = max(1e-3, np.sqrt(np.mean(w.astype(np.float64) ** 2)))
    np.testing.assert_allclose(np.asarray(upd["w"]), -0.01 * scale * u, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9, "weight_decay_rate": 1e-3},
                                {"clipping_threshold": None, "multiply_by_parameter_scale": False}])
def test_make_optimizer_is_optax_adafactor(kw):
    """Same state tree and bit-identical updates as optax.adafactor (make_optimizer only swaps in a cheaper
    parameter-scale step), including a parameter whose RMS is below the 1e-3 floor."""
    cfg = OptimizerConfig(**kw)
    ref = optax.adafactor(learning_rate=learning_rate_schedule(cfg), min_dim_size_to_factor=cfg.min_dim_size_to_factor,
                          decay_rate=cfg.decay_rate, multiply_by_parameter_scale=cfg.multiply_by_parameter_scale,
                          clipping_threshold=cfg.clipping_threshold, momentum=cfg.momentum,
                          weight_decay_rate=cfg.weight_decay_rate, eps=cfg.eps, factored=True)
    opt = make_optimizer(cfg)
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w": jax.random.normal(k[0], (256, 128)), "tiny": jax.random.normal(k[1], (128,)) * 1e-4,
              "small": jax.random.normal(k[2], (4, 8))}
    grads = jax.tree.map(lambda x: 0.3 * x + 0.01, params)
    s_ref, s_new = ref.init(params), opt.init(params)
    assert jax.tree.structure(s_ref) == jax.tree.structure(s_new)
    for _ in range(3):
        u_ref, s_ref = ref.update(grads, s_ref, params)
        u_new, s_new = opt.update(grads, s_new, params)
        for a, b in zip(jax.tree.leaves((u_ref, s_ref)), jax.tree.leaves((u_new, s_new))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_opt_state_specs_follow_factored_axes():
    params = {"w": jax.ShapeDtypeStruct((256, 128), jnp.float32), "b": jax.ShapeDtypeStruct((128,), jnp.float32),
              "k": jax.ShapeDtypeStruct((64, 32), jnp.float32)}
    specs = {"w": P("fsdp", "model"), "b": P("fsdp"), "k": P("fsdp", "model")}
    opt = make_optimizer(OptimizerConfig())
    state = jax.eval_shape(opt.init, params)
    out = opt_state_partition_specs(state, specs, params)
    fact = out[0]  # FactoredState(count, v_row, v_col, v)
    # w: largest axis 0 (256) -> v_row drops it, v_col drops axis 1.
    assert state[0].v_row["w"].shape == (128,) and fact.v_row["w"] == P("model")
    assert state[0].v_col["w"].shape == (256,) and fact.v_col["w"] == P("fsdp")
    assert fact.v["w"] == P()  # (1,) placeholder
    # Small / 1-D params keep a full second moment with the parameter's spec.
    assert fact.v["k"] == P("fsdp", "model") and fact.v["b"] == P("fsdp")
    per_dev, total = opt_state_bytes_per_device(opt, specs, params, {"data": 1, "fsdp": 4, "model": 2})
    expect_total = 4 * (128 + 256 + 1 + 1 + 1 + 128 + 1 + 1 + 64 * 32) + 8  # + two int32 step counts
    assert total == expect_total
    assert per_dev == 4 * (64 + 64 + 1 + 1 + 1 + 32 + 1 + 1 + 16 * 16) + 8


# ------------------------------------------------------------------------------------------------ loss / step


def _synthetic_batch(cfg, b=4, src=6, tgt=5, seed=0):
    r = np.random.default_rng(seed)
    enc = r.integers(2, cfg.vocab_size, size=(b, src)).astype(np.int32)
    enc[:, -1] = 0
    tgt_tok = r.integers(2, cfg.vocab_size, size=(b, tgt)).astype(np.int32)
    tgt_tok[0, -2:] = 0
    dec_in = np.concatenate([np.zeros((b, 1), np.int32), tgt_tok[:, :-1]], 1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": tgt_tok,
            "decoder_loss_weights": (tgt_tok > 0).astype(np.int32)}


def test_eval_step_loss_sums_match_numpy(tiny_config, rng):
    from gqa_uptrain.model import Transformer
    params = init_params(tiny_config, rng)
    batch = _synthetic_batch(tiny_config)
    cfg = TrainConfig(model_dir="x", train_steps=1, batch_size=4, targets_length=5, z_loss=1e-4)
    sums = jax.jit(train_lib.make_eval_step(tiny_config, cfg))(params, batch)
    logits = np.asarray(Transformer(tiny_config).apply({"params": params}, batch["encoder_input_tokens"],
                                                       batch["decoder_input_tokens"], batch["decoder_target_tokens"]),
                        np.float64)
    m = logits.max(-1, keepdims=True)
    logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    t = batch["decoder_target_tokens"]
    w = batch["decoder_loss_weights"]
    ce = logz - np.take_along_axis(logits, t[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(sums["cross_entropy"]), (ce * w).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(sums["z_loss"]), (1e-4 * logz ** 2 * w).sum(), rtol=1e-5)
    assert float(sums["weight"]) == w.sum() == 18
    assert float(sums["correct"]) == ((logits.argmax(-1) == t) * w).sum()


def test_argmax_last_axis_matches_jnp_argmax_including_ties():
    r = np.random.RandomState(0)
    x = r.randint(0, 4, size=(3, 5, 17)).astype(np.float32)  # many ties: the first maximum must win
    x[0, 0] = 0.0
    x[1, 2, 16] = 9.0
    got = jax.jit(_argmax_last_axis)(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got), x.argmax(-1))


def test_loss_normalizing_factor_choices(tiny_config):
    batch = {"decoder_target_tokens": jnp.array([[3, 4, 0], [5, 0, 0]]),
             "decoder_loss_weights": jnp.array([[1, 1, 0], [1, 0, 0]])}
    mk = lambda lnf: TrainConfig(model_dir="x", train_steps=1, batch_size=2, targets_length=3,  # noqa: E731
                                 loss_normalizing_factor=lnf)
    norm = lambda lnf: float(train_lib.seq2seq_model(tiny_config, mk(lnf)).normalizer(batch))  # noqa: E731
    assert norm(None) == 6.0        # batch_size * targets_length
    assert norm(233472) == 233472.0
    assert norm("NUM_REAL_TARGET_TOKENS") == 3.0
    with pytest.raises(ValueError, match="loss_normalizing_factor"):
        mk("MEAN")


def test_gradient_accumulation_matches_one_batch(tiny_config, rng, tmp_path):
    lnf = "NUM_REAL_TARGET_TOKENS"
    params = init_params(tiny_config, rng)
    batch = {k: jnp.asarray(v) for k, v in _synthetic_batch(tiny_config, b=8, seed=1).items()}
    out = {}
    for m in (1, 4):
        cfg = TrainConfig(model_dir=str(tmp_path), batch_size=8, num_microbatches=m, train_steps=1,
                          targets_length=5, loss_normalizing_factor=lnf)
        ocfg = OptimizerConfig(schedule="constant", base_learning_rate=0.01)
        opt = make_optimizer(ocfg)
        fn = jax.jit(train_lib.make_train_step(tiny_config, cfg, opt, learning_rate_schedule(ocfg)))
        new_params, _, step, metrics = fn(params, opt.init(params), jnp.int32(0), batch)
        out[m] = (new_params, metrics)
        assert int(step) == 1
    (p1, m1), (p4, m4) = out[1], out[4]
    for k in ("loss", "objective", "grad_norm", "accuracy"):
        np.testing.assert_allclose(float(m1[k]), float(m4[k]), rtol=1e-5)
    norm = float(batch["decoder_loss_weights"].sum())
    np.testing.assert_allclose(float(m1["objective"]), float(m1["loss"] + m1["z_loss"]) * 38 / norm, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6), p1, p4)
    # The step moved the parameters.
    assert not np.allclose(np.asarray(p1["decoder"]["logits_dense"]["kernel"]),
                           np.asarray(params["decoder"]["logits_dense"]["kernel"]))


# ------------------------------------------------------------------------------------------------ data


def test_train_batches_shard_layout_and_skip(tmp_path):
    cfg = _tc(tmp_path, num_data_shards=2)
    one = train_lib.train_batches(cfg, 0, process_index=0, process_count=1)
    b0, b1, b2 = next(one), next(one), next(one)
    assert set(b0) == {"encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                       "decoder_loss_weights"}
    assert b0["encoder_input_tokens"].shape == (4, 32) and b0["decoder_target_tokens"].shape == (4, 8)
    assert not np.array_equal(b0["encoder_input_tokens"], b1["encoder_input_tokens"])
    # Two processes each hold half of the same global batch.
    h0 = next(train_lib.train_batches(cfg, 0, process_index=0, process_count=2))
    h1 = next(train_lib.train_batches(cfg, 0, process_index=1, process_count=2))
    np.testing.assert_array_equal(np.concatenate([h0["encoder_input_tokens"], h1["encoder_input_tokens"]]),
                                  b0["encoder_input_tokens"])
    # Resuming at batch 2 yields batch 2.
    skipped = next(train_lib.train_batches(cfg, 2, process_index=0, process_count=1))
    for k in b2:
        np.testing.assert_array_equal(skipped[k], b2[k])
    # Teacher forcing: decoder inputs are the targets shifted right.
    np.testing.assert_array_equal(b0["decoder_input_tokens"][:, 1:], b0["decoder_target_tokens"][:, :-1])


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'no_such_task' is not registered"):
        next(train_lib.train_batches(_tc(tmp_path, mixture_or_task_name="no_such_task"), 0))


def test_length_from_uptrain_fraction():
    cfg = TrainConfig(model_dir="x", uptrain_fraction=0.05)
    assert train_lib.resolve_length(cfg, Manifest(step=1_000_000, source_step=1_000_000)) == (50_000, 1_000_000)
    # A manifest with only `step` (save_params(metadata={"step": N})) records the same pre-training step.
    assert train_lib.resolve_length(cfg, Manifest(step=1_000_000)) == (50_000, 1_000_000)
    assert train_lib.resolve_length(TrainConfig(model_dir="x", uptrain_fraction=0.1, original_steps=400), None) \
        == (40, 400)
    with pytest.raises(ValueError, match="ORIGINAL_STEPS"):
        train_lib.resolve_length(cfg, Manifest())
    with pytest.raises(ValueError, match="TRAIN_STEPS"):
        TrainConfig(model_dir="x")


# ------------------------------------------------------------------------------------------------ end to end


def test_train_checkpoint_resume_and_uptrain_init(tmp_path):
    from gqa_uptrain.checkpoint import load_params
    from gqa_uptrain.metrics import read_metrics

    run = tmp_path / "pre"
    res = train_lib.train(DATA_MODEL, _tc(run))
    assert res.step == 4 and res.resumed_from is None
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["learning_rate"] == pytest.approx(0.01) for r in recs)
    for key in ("accuracy", "z_loss", "grad_norm", "tokens_per_second", "steps_per_second"):
        assert key in recs[0]
    evals = read_metrics(run, "eval")
    assert [r["step"] for r in evals] == [2, 4] and evals[1]["loss"] < evals[0]["loss"]
    # checkpoint.load_params understands the run dir and returns the final parameters.
    loaded = load_params(run)
    assert loaded.step == 4 and loaded.config == DATA_MODEL
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded.params, res.params)
    data_item = json.loads((run / "checkpoints" / "4" / "data" / "metadata").read_text()) \
        if (run / "checkpoints" / "4" / "data" / "metadata").exists() else None
    if data_item is not None:
        assert data_item["batches_consumed"] == 4

    # Extending the run resumes from step 4 (optimizer state restored, not re-initialised).
    res2 = train_lib.train(DATA_MODEL, _tc(run, train_steps=5, eval_every=0))
    assert res2.resumed_from == 4 and res2.step == 5
    assert int(res2.opt_state[0].count) == 5

    # Uptraining from the run: params restored, fresh optimizer, schedule continues from the source's 4 steps,
    # length = round(0.5 * 4) = 2.
    up = tmp_path / "up"
    ucfg = _tc(up, train_steps=None, uptrain_fraction=0.5, original_steps=None, initial_checkpoint=str(run),
               continue_schedule=True, eval_every=0, optimizer=OptimizerConfig(warmup_steps=1))
    with pytest.raises(ValueError, match="ORIGINAL_STEPS"):
        train_lib.train(DATA_MODEL, ucfg)  # a run dir has no manifest recording the source step
    ucfg = _tc(up, train_steps=None, uptrain_fraction=0.5, original_steps=4, initial_checkpoint=str(run),
               continue_schedule=True, eval_every=0, optimizer=OptimizerConfig(warmup_steps=1))
    res3 = train_lib.train(DATA_MODEL, ucfg)
    assert res3.step == 2 and int(res3.opt_state[0].count) == 2
    lrs = [r["learning_rate"] for r in res3.metrics]
    np.testing.assert_allclose(lrs, [1 / math.sqrt(4), 1 / math.sqrt(5)], rtol=1e-6)
    # The first step's loss is the loss of the restored (step-5) parameters on the first batch.
    first = next(train_lib.train_batches(ucfg, 0))
    sums = jax.jit(train_lib.make_eval_step(DATA_MODEL, ucfg))(load_params(run).params, first)
    assert res3.metrics[0]["loss"] == pytest.approx(float(sums["cross_entropy"] / sums["weight"]), rel=1e-5)


def test_keep_best_keeps_the_lowest_eval_loss_parameters(tmp_path):
    """keep_best: MODEL_DIR/best holds the parameters of the step with the lowest eval loss (a learning rate this
    high makes the eval loss go up and down), loadable like any run dir."""
    from gqa_uptrain.checkpoint import load_params
    run = tmp_path / "run"
    res = train_lib.train(DATA_MODEL, _tc(run, train_steps=6, save_every=1, eval_every=1, keep_checkpoints=None,
                                          keep_best=True,
                                          optimizer=OptimizerConfig(schedule="constant", base_learning_rate=1.0)))
    losses = [e["loss"] for e in res.eval_metrics]
    best_step = res.eval_metrics[int(np.argmin(losses))]["step"]
    assert best_step != res.step  # deterministic on CPU: the best is not simply the latest
    best = load_params(run / "best")
    assert best.step == best_step and best.config == DATA_MODEL
    assert sorted(int(p.name) for p in (run / "best" / "checkpoints").iterdir() if p.name.isdigit()) == [best_step]
    same_step = load_params(run, step=best_step)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), best.params,
                 same_step.params)
    with pytest.raises(ValueError, match="keep_best needs evaluation"):
        train_lib.train(DATA_MODEL, _tc(tmp_path / "noeval", keep_best=True, eval_every=0))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    import orbax.checkpoint as ocp
    cfg = _tc(tmp_path / "nan", train_steps=6, save_every=1, eval_every=0,
              optimizer=OptimizerConfig(schedule="constant", base_learning_rate=1000.0, clipping_threshold=None))
    with pytest.raises(train_lib.NonFiniteLossError, match=r"non-finite loss.*Last good checkpoint: step \d"):
        train_lib.train(DATA_MODEL, cfg)
    with ocp.CheckpointManager(tmp_path / "nan" / "checkpoints") as mngr:
        steps = mngr.all_steps()
    assert steps and max(steps) < 6


def test_inspect_reports_adafactor_state_and_activations(capsys):
    import re

    from gqa_uptrain.cli import main
    assert main(["inspect", "--gin_file=models/t5_1_1/small.gin", "--mesh", "data=2,fsdp=2,model=2", "--summary",
                 "--batch_size=64", "--inputs_length=128", "--targets_length=32"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"adafactor state per device [\d.]+ (KiB|MiB)", out), out
    assert "activations per device ~" in out and "training total per device ~" in out
    from gqa_uptrain.memory import activation_bytes_per_device
    small = ModelConfig(vocab_size=32128, d_model=512, num_heads=6, head_dim=64, d_ff=1024)
    a1 = activation_bytes_per_device(small, {"data": 2}, 64, 128, 32)
    assert activation_bytes_per_device(small, {"data": 4}, 64, 128, 32) == pytest.approx(a1 / 2)
    assert activation_bytes_per_device(small, {"data": 2}, 64, 128, 32, num_microbatches=4) == pytest.approx(a1 / 4)


def test_validation_set_does_not_depend_on_the_training_seed(tmp_path):
    """The eval examples (span-corruption noise included) are drawn from data.VALIDATION_SEED, not SEED."""
    a = train_lib.eval_batches(_tc(tmp_path, seed=0))
    b = train_lib.eval_batches(_tc(tmp_path, seed=7))
    assert a[0].keys() == b[0].keys()
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_trainer_eval_loss_equals_eval_command(tmp_path):
    """The loss the trainer logs at an eval step and the loss `gqa-uptrain eval` reports for the same parameters
    and the same validation examples agree: one validation set, one loss (training seed 7 != VALIDATION_SEED)."""
    from gqa_uptrain.cli import main
    run = tmp_path / "run"
    cfg = _tc(run, seed=7, train_steps=2, save_every=2, eval_every=2, eval_examples=6)
    res = train_lib.train(DATA_MODEL, cfg)
    logged = [r for r in res.eval_metrics if r["step"] == 2][0]
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run), "--task", "gqa_span_corruption", "--num_examples", "6",
                 "--max_input_length", str(cfg.inputs_length), "--max_target_length", str(cfg.targets_length),
                 "--batch_size", "4", "--output", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["step"] == 2 and report["num_examples"] == 6
    assert report["metrics"]["loss"] == pytest.approx(logged["loss"], rel=1e-5, abs=1e-6)
    assert report["metrics"]["token_accuracy"] == pytest.approx(100 * logged["accuracy"], abs=1e-4)

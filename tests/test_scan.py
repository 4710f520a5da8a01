"""Layer scanning (ModelConfig.scan_layers): the scanned model computes what the unrolled one does, takes and gives
the same per-layer (T5X) parameter tree, and compiles for a TPU topology."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gqa_uptrain import decode, sharding
from gqa_uptrain import train as train_lib
from gqa_uptrain.config import ConfigError
from gqa_uptrain.model import Transformer, abstract_params, init_params, stack_layers, unstack_layers
from gqa_uptrain.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from gqa_uptrain.seq2seq import EncoderDecoderModel

from test_remat import _batch


def _flat(tree) -> dict[str, np.ndarray]:
    return traverse_util.flatten_dict(tree, sep="/")


def _close(a, b, rtol=1e-5, atol=1e-6):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), rtol=rtol, atol=atol, err_msg=k)


@pytest.fixture
def gqa(tiny_config):
    return tiny_config.replace(decoder_self_kv_heads=2, decoder_cross_kv_heads=1, num_encoder_layers=3)


def test_parameter_tree_is_the_t5x_layout_either_way(gqa, rng):
    plain, scanned = init_params(gqa, rng), init_params(gqa.replace(scan_layers=True), rng)
    assert jax.tree.map(np.shape, plain) == jax.tree.map(np.shape, scanned)
    assert "layers_2" in scanned["encoder"] and "layers" not in scanned["encoder"]
    boxed = abstract_params(gqa.replace(scan_layers=True))
    assert boxed["decoder"]["layers_1"]["self_attention"]["key"]["kernel"].names == ("embed", "joined_grouped_kv")


def test_stack_unstack_round_trip_and_layers_axis(gqa, rng):
    params = init_params(gqa, rng)
    stacked = stack_layers(params)
    k = stacked["encoder"]["layers"]["layer"]["attention"]["query"]["kernel"]
    assert k.shape == (3, 32, 32)
    np.testing.assert_array_equal(k[2], params["encoder"]["layers_2"]["attention"]["query"]["kernel"])
    assert "layers_0" not in stacked["decoder"] and "token_embedder" in stacked
    back = unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    assert stack_layers(stacked) is not None and unstack_layers(params) == params  # idempotent on the other layout
    # Boxed params get a leading 'layers' logical axis, which the rules never shard.
    boxed = stack_layers(abstract_params(gqa))
    kernel = boxed["decoder"]["layers"]["layer"]["mlp"]["wi_0"]["kernel"]
    assert kernel.names == ("layers", "embed", "mlp") and kernel.value.shape == (2, 32, 48)
    specs = sharding.param_partition_specs(boxed, {"data": 1, "fsdp": 2, "model": 2})
    assert specs["decoder"]["layers"]["layer"]["mlp"]["wi_0"]["kernel"] == jax.sharding.PartitionSpec(None, "fsdp",
                                                                                                     "model")
    assert jax.tree.map(lambda x: x.names, unstack_layers(boxed), is_leaf=lambda x: hasattr(x, "names")) == \
        jax.tree.map(lambda x: x.names, abstract_params(gqa), is_leaf=lambda x: hasattr(x, "names"))


def test_stack_layers_names_a_missing_layer(gqa, rng):
    params = init_params(gqa, rng)
    del params["encoder"]["layers_1"]
    with pytest.raises(ValueError, match="missing layers_1"):
        stack_layers(params)


def test_scan_layers_must_be_bool(tiny_config):
    with pytest.raises(ConfigError, match="scan_layers"):
        tiny_config.replace(scan_layers="yes")


@pytest.mark.parametrize("policy", ["none", "full", "minimal"])
def test_outputs_and_gradients_equal_unrolled(gqa, rng, policy):
    """Same parameters in, same logits / loss and gradients out (float32 rounding apart), with remat inside the
    scan as well as without."""
    params = init_params(gqa, rng)
    batch = _batch(gqa.vocab_size)
    scfg = gqa.replace(scan_layers=True)

    def loss(cfg):
        def f(p):
            sums = EncoderDecoderModel(cfg, z_loss=1e-4, remat_policy=policy).loss_sums(p, batch)
            return sums["cross_entropy"] + sums["z_loss"]
        return jax.jit(jax.value_and_grad(f))

    (l0, g0), (l1, g1) = loss(gqa)(params), loss(scfg)(params)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    _close(g1, g0)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0)) > 1e-3  # gradients are not all ~0
    enc, dec = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    np.testing.assert_allclose(Transformer(scfg).apply({"params": params}, enc, dec),
                               Transformer(gqa).apply({"params": params}, enc, dec), rtol=1e-5, atol=1e-5)


def test_dropout_runs_under_scan(gqa, rng):
    """Each layer draws its own mask (the rng is split over layers): outputs differ from the deterministic run and
    between keys, and the gradients are finite."""
    cfg = gqa.replace(scan_layers=True, dropout_rate=0.3)
    params = init_params(cfg, rng)
    batch = _batch(cfg.vocab_size)
    enc, dec = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    model = Transformer(cfg, remat_policy="full")
    run = jax.jit(lambda k: model.apply({"params": params}, enc, dec, enable_dropout=True, rngs={"dropout": k}))
    a, b = run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2))
    c = model.apply({"params": params}, enc, dec)
    assert not np.allclose(a, b) and not np.allclose(a, c)
    grads = jax.grad(lambda p: EncoderDecoderModel(cfg, remat_policy="full").loss_sums(
        p, batch, jax.random.PRNGKey(3))["cross_entropy"])(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_train_step_equal_unrolled(gqa, rng):
    """Two steps of the trainer's step (2 microbatches, Adafactor): same parameters and optimiser state, since
    the optimiser sees the per-layer tree either way."""
    params = init_params(gqa, rng)
    batch = _batch(gqa.vocab_size, b=4)
    tc = train_lib.TrainConfig(model_dir="unused", train_steps=2, batch_size=4, num_microbatches=2,
                               remat_policy="minimal")
    opt = make_optimizer(OptimizerConfig(min_dim_size_to_factor=16))

    def two_steps(cfg):
        step = jax.jit(train_lib.make_train_step(cfg, tc, opt, learning_rate_schedule(OptimizerConfig())))
        p, s, i = params, opt.init(params), jnp.zeros((), jnp.int32)
        for _ in range(2):
            p, s, i, metrics = step(p, s, i, batch)
        return p, s, metrics

    p0, s0, m0 = two_steps(gqa)
    p1, s1, m1 = two_steps(gqa.replace(scan_layers=True))
    _close(p1, p0)
    assert jax.tree.structure(s1) == jax.tree.structure(s0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s1, s0)
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-5)
    assert not np.allclose(p0["encoder"]["layers_0"]["mlp"]["wo"]["kernel"],
                           params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])  # the steps did update


def test_decode_equal_unrolled(gqa, rng):
    """Greedy decoding and beam search (cache [layers, batch, G, length, head_dim], reordered per layer) give the
    unrolled model's tokens and scores."""
    params = init_params(gqa, rng)
    enc = _batch(gqa.vocab_size)["encoder_input_tokens"]
    scfg = gqa.replace(scan_layers=True)
    t0, l0 = decode.greedy_decode(gqa, params, enc, 7, eos_id=None, return_logits=True)
    t1, l1 = decode.greedy_decode(scfg, params, enc, 7, eos_id=None, return_logits=True)
    np.testing.assert_array_equal(t1, t0)
    np.testing.assert_allclose(l1, l0, rtol=1e-4, atol=1e-4)
    b0, b1 = decode.beam_search(gqa, params, enc, 6, num_beams=3), decode.beam_search(scfg, params, enc, 6, num_beams=3)
    np.testing.assert_array_equal(b1.sequences, b0.sequences)
    np.testing.assert_allclose(b1.scores, b0.scores, rtol=1e-4)
    # The stacked cache: one array per kind with a leading layer axis, sharded like the unrolled one per layer.
    _, _, cache = decode.encode_and_prefill(scfg, 7)(params, enc)
    key = cache["decoder"]["layers"]["layer"]["self_attention"]["cached_key"]
    assert key.shape == (2, 3, 2, 7, 8)
    specs = sharding.cache_partition_specs(cache, {"data": 3, "fsdp": 1, "model": 2})
    assert specs["decoder"]["layers"]["layer"]["self_attention"]["cached_key"] == \
        jax.sharding.PartitionSpec(None, ("data",), "model", None, None)
    assert decode.cache_bytes(cache) == decode.cache_bytes(decode.encode_and_prefill(gqa, 7)(params, enc)[2])


def test_scanned_train_and_decode_compile_for_v5e(aot, tiny_config):
    """The scanned tiny model's train step and decode step compile on v5e:2x2 with the state the unrolled one has
    (same arguments per device: the per-layer tree and its shardings)."""
    cfg = tiny_config.replace(dtype="bfloat16", decoder_self_kv_heads=1, decoder_cross_kv_heads=1)
    chip = aot.chip_for("v5e:2x2")
    mesh = aot.topology_mesh("v5e:2x2", "data=1,fsdp=2,model=2")
    tc = train_lib.TrainConfig(model_dir="unused", train_steps=1, batch_size=8, inputs_length=32, targets_length=16,
                               num_microbatches=2, remat_policy="full")
    scanned = aot.compile_train(cfg.replace(scan_layers=True), tc, mesh, chip)
    plain = aot.compile_train(cfg, tc, mesh, chip)
    assert scanned["fits"] and scanned["flops_per_device"] > 0
    assert scanned["per_device_bytes"]["arguments"] == plain["per_device_bytes"]["arguments"]
    assert scanned["expected_argument_bytes"] == plain["expected_argument_bytes"]
    dec = aot.compile_decode(cfg.replace(scan_layers=True), mesh, chip, 4, 32, 16)
    assert dec["step"]["fits"] and dec["step"]["cache_bytes_per_device"] == \
        aot.compile_decode(cfg, mesh, chip, 4, 32, 16, programs=("step",))["step"]["cache_bytes_per_device"]


def test_gin_binds_scan_layers():
    from gqa_uptrain import gin_utils
    gin_utils.parse_gin(["models/t5_1_1/tiny.gin"], ["SCAN_LAYERS = True"])
    assert gin_utils.model_config_from_gin().scan_layers is True
    gin_utils.parse_gin(["models/t5_1_1/tiny.gin"], [])
    assert gin_utils.model_config_from_gin().scan_layers is False


@pytest.mark.parametrize("stem,bindings", [("xxl_gqa8", ["NUM_KV_HEADS = 8"]), ("tiny_mqa", ["NUM_KV_HEADS = 1"])])
def test_scanned_parameter_tree_is_the_golden_one(stem, bindings):
    """With SCAN_LAYERS the model's parameter tree (names, shapes, dtypes, logical axes) is the golden T5X one."""
    from test_golden_params import GOLDEN_DIR, param_table
    size = stem.split("_")[0]
    table = param_table(f"models/t5_1_1/{size}.gin", bindings + ["SCAN_LAYERS = True"])
    golden = json.loads((GOLDEN_DIR / f"{stem}.json").read_text())
    assert table["config"] == {**golden["config"], "scan_layers": True}
    assert table["params"] == golden["params"]

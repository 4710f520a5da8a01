"""Activation rematerialisation (TrainConfig.remat_policy -> Transformer(remat_policy=...)): same loss, gradients
and parameter tree as without remat; a different compiled program."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from gqa_uptrain import train as train_lib
from gqa_uptrain.cli import main
from gqa_uptrain.memory import activation_bytes_per_device
from gqa_uptrain.config import ModelConfig
from gqa_uptrain.model import REMAT_POLICIES, Transformer, check_remat_policy, init_params
from gqa_uptrain.seq2seq import EncoderDecoderModel

POLICIES = [p for p in REMAT_POLICIES if p != "none"]


def _batch(vocab: int, b: int = 3, src: int = 9, tgt: int = 6) -> dict[str, jax.Array]:
    """Padded int32 batch: encoder [b, src], decoder [b, tgt]."""
    r = np.random.RandomState(0)
    enc = r.randint(2, vocab, size=(b, src))
    enc[0, 6:] = 0
    tgt_tokens = r.randint(2, vocab, size=(b, tgt))
    tgt_tokens[1, 4:] = 0
    dec_in = np.concatenate([np.zeros((b, 1), int), tgt_tokens[:, :-1]], axis=1)
    return {"encoder_input_tokens": jnp.asarray(enc, jnp.int32), "decoder_input_tokens": jnp.asarray(dec_in, jnp.int32),
            "decoder_target_tokens": jnp.asarray(tgt_tokens, jnp.int32)}


def _loss_fn(cfg: ModelConfig, batch, policy: str, dropout_rng):
    model = EncoderDecoderModel(cfg, z_loss=1e-4, remat_policy=policy)

    def loss(params):
        sums = model.loss_sums(params, batch, dropout_rng)
        return sums["cross_entropy"] + sums["z_loss"]
    return loss


def _values_and_grads(cfg: ModelConfig, batch, policies: list[str]):
    """Jitted (params, dropout_rng) -> [(loss, grads) per policy]: one compile for all (dropout compiles take ~25 s
    each on CPU); the rng is an argument so other keys reuse it."""
    def run(params, dropout_rng):
        rng = dropout_rng if cfg.dropout_rate else None
        return [jax.value_and_grad(_loss_fn(cfg, batch, p, rng))(params) for p in policies]
    return jax.jit(run)


def _flat(tree) -> dict[str, np.ndarray]:
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_loss_and_gradients_equal_without_remat(tiny_config, rng, dropout):
    """Dropout on exercises the rng lifted into the checkpointed layers: forward and recomputation must draw the
    masks the plain model draws. The loss is bitwise equal; gradients differ by float32 rounding only (XLA fuses
    the recomputed backward differently): < 4e-7 of each tensor's largest entry here."""
    cfg = tiny_config.replace(dropout_rate=dropout)
    params = init_params(cfg, rng)
    batch = _batch(cfg.vocab_size)
    fn = _values_and_grads(cfg, batch, ["none", *POLICIES])
    (ref_loss, ref_grads), *results = fn(params, jax.random.PRNGKey(7))
    if dropout:  # the masks matter, so equal losses below mean equal masks
        assert float(ref_loss) != float(fn(params, jax.random.PRNGKey(8))[0][0])
    for policy, (loss, grads) in zip(POLICIES, results):
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-7, err_msg=policy)
        ref, got = _flat(ref_grads), _flat(grads)
        assert got.keys() == ref.keys()
        for name in ref:
            scale = float(np.max(np.abs(ref[name])))
            np.testing.assert_allclose(np.asarray(got[name]), np.asarray(ref[name]), rtol=1e-5, atol=2e-6 * scale,
                                       err_msg=f"{policy}: {name}")


def test_parameter_tree_unchanged(tiny_config, rng):
    def params(policy: str) -> dict:
        init = Transformer(tiny_config, remat_policy=policy).init  # eager, as init_params: same rounding
        return _flat(nn.meta.unbox(init(rng, jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32))["params"]))

    ref = _flat(init_params(tiny_config, rng))
    assert "encoder/layers_0/attention/query/kernel" in ref
    assert "decoder/layers_1/encoder_decoder_attention/key/kernel" in ref
    for policy in POLICIES:
        got = params(policy)
        assert got.keys() == ref.keys(), policy
        for name in ref:  # same initialiser keys too: a checkpointed layer is a drop-in replacement
            np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(ref[name]), err_msg=name)


def test_unknown_policy_is_one_clear_error(tiny_config):
    with pytest.raises(ValueError, match=r"^unknown remat_policy 'dot' \(REMAT_POLICY\); valid: none, full, "
                                         r"minimal, dots$"):
        check_remat_policy("dot")
    with pytest.raises(ValueError, match="unknown remat_policy 'everything'"):
        train_lib.TrainConfig(model_dir="/tmp/unused", train_steps=1, remat_policy="everything")
    with pytest.raises(ValueError, match="unknown remat_policy 'dot'"):
        init = Transformer(tiny_config, remat_policy="dot").init
        init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))


def _residual_bytes(loss, params) -> int:
    """Bytes the forward keeps for the backward: the leaves of jax.vjp's closure (abstractly, nothing runs)."""
    leaves = jax.eval_shape(lambda p: jax.tree.leaves(jax.vjp(loss, p)[1]), params)
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)


def test_remat_changes_the_program(tiny_config, rng):
    """The grad's jaxpr has one checkpoint per layer; jax keeps fewer residuals (full < minimal < dots < none);
    XLA compiles the recomputation (more flops) and, on CPU, a smaller temp buffer for "full"."""
    params = init_params(tiny_config, rng)
    batch = _batch(tiny_config.vocab_size, b=4, src=16, tgt=8)
    layers = tiny_config.num_encoder_layers + tiny_config.num_decoder_layers
    residuals, flops, temp = {}, {}, {}
    for policy in REMAT_POLICIES:
        loss = _loss_fn(tiny_config, batch, policy, None)
        eqns = jax.make_jaxpr(jax.grad(loss))(params).jaxpr.eqns
        n_remat = sum(e.primitive.name in ("checkpoint", "remat2") for e in eqns)
        assert n_remat == (0 if policy == "none" else layers), (policy, n_remat)
        residuals[policy] = _residual_bytes(loss, params)
        if policy in ("none", "full"):
            compiled = jax.jit(jax.grad(loss)).lower(params).compile()
            flops[policy] = compiled.cost_analysis()["flops"]
            temp[policy] = compiled.memory_analysis().temp_size_in_bytes
    assert residuals["full"] < residuals["minimal"] < residuals["dots"] < residuals["none"], residuals
    assert flops["full"] > flops["none"], flops
    assert temp["full"] < temp["none"], temp


def test_train_config_reaches_the_train_step_only(tiny_config, rng):
    """TrainConfig.remat_policy checkpoints the layers in make_train_step's program (inside the microbatch scan),
    not in the eval step, which has no backward pass."""
    from gqa_uptrain.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
    params = init_params(tiny_config, rng)
    batch = _batch(tiny_config.vocab_size, b=4)
    ocfg = OptimizerConfig(schedule="constant", base_learning_rate=1e-2)
    opt = make_optimizer(ocfg)
    base = train_lib.TrainConfig(model_dir="/tmp/unused", train_steps=1, batch_size=4, targets_length=6,
                                 num_microbatches=2)
    for policy in ("none", "full"):
        cfg = dataclasses.replace(base, remat_policy=policy)
        step = train_lib.make_train_step(tiny_config, cfg, opt, learning_rate_schedule(ocfg))
        text = str(jax.make_jaxpr(step)(params, opt.init(params), jnp.int32(0), batch))
        assert ("remat" in text) == (policy != "none"), policy
        assert "remat" not in str(jax.make_jaxpr(train_lib.make_eval_step(tiny_config, cfg))(params, batch))


def test_inspect_estimate_takes_the_policy(capsys):
    xxl = dict(d_model=4096, num_heads=64, head_dim=64, d_ff=10240, num_encoder_layers=24, num_decoder_layers=24,
               vocab_size=32128, dtype="bfloat16")
    cfg = ModelConfig(**xxl)
    mesh = {"data": 16, "fsdp": 4, "model": 2}
    act = {p: activation_bytes_per_device(cfg, mesh, 2048, 512, 114, 1, p) for p in REMAT_POLICIES}
    assert round(act["none"] / 2**30, 1) == 85.4  # the default is docs/scaling.md's table, unchanged
    assert act["full"] < act["minimal"] < act["dots"] < act["none"], act
    assert main(["inspect", "--gin_file=models/t5_1_1/tiny.gin", "--summary", "--mesh", "data=2",
                 "--remat_policy=full"]) == 0
    assert "remat_policy=full;" in capsys.readouterr().out
    assert main(["inspect", "--gin_file=models/t5_1_1/tiny.gin", "--summary", "--mesh", "data=2",
                 "--gin.REMAT_POLICY='minimal'"]) == 0
    assert "remat_policy=minimal;" in capsys.readouterr().out
    assert main(["inspect", "--gin_file=models/t5_1_1/tiny.gin", "--summary", "--mesh", "data=2"]) == 0
    assert "remat_policy=none (no remat)" in capsys.readouterr().out
    assert main(["inspect", "--summary", "--remat_policy=bogus"]) == 1
    assert "unknown remat_policy 'bogus'" in capsys.readouterr().err

"""Ahead-of-time compilation for a TPU topology (libtpu, the `tpu` extra): the trainer's step and the decoder's
programs compile for v5e:2x2, XLA's argument bytes are the sharded params + Adafactor state + batch, and key/value
heads stay whole on the `model` axis. Head atomicity itself is checked without libtpu."""
import dataclasses
import json

import pytest
from jax.sharding import PartitionSpec as P

from gqa_uptrain import sharding
from gqa_uptrain.config import ModelConfig
from gqa_uptrain.model import abstract_params

# Dimensions are multiples of 128 so TPU tile padding does not blur the byte comparisons.
MQA = ModelConfig(vocab_size=512, d_model=128, num_heads=4, head_dim=128, d_ff=256, num_encoder_layers=1,
                  num_decoder_layers=1, decoder_self_kv_heads=1, decoder_cross_kv_heads=1, dtype="bfloat16")
GQA4 = MQA.with_decoder_kv_heads(4)


def _kernel_spec(cfg, mesh_shape, attn="self_attention", name="key"):
    specs = sharding.param_partition_specs(abstract_params(cfg), mesh_shape, head_dim=cfg.head_dim)
    return specs["decoder"]["layers_0"][attn][name]["kernel"]


def test_single_kv_head_is_never_split_inside_head_dim():
    mesh = {"data": 1, "fsdp": 1, "model": 4}
    # Without head_dim the 128-wide single head would be cut into four 32-wide slices.
    assert sharding.logical_to_mesh_spec(("embed", "joined_grouped_kv"), (128, 128), mesh) == P(None, "model")
    assert sharding.logical_to_mesh_spec(("embed", "joined_grouped_kv"), (128, 128), mesh, head_dim=128) == P(None, None)
    assert _kernel_spec(MQA, mesh) == P(None, None)
    assert _kernel_spec(MQA, mesh, "encoder_decoder_attention", "value") == P(None, None)
    assert _kernel_spec(MQA, mesh, name="query") == P(None, "model")  # 4 query heads: one per device
    assert _kernel_spec(GQA4, mesh) == P(None, "model")
    # 2 heads on model=4 do not divide: replicated, not split into half-heads.
    assert _kernel_spec(MQA.with_decoder_kv_heads(2), mesh) == P(None, None)


def test_cache_specs_follow_kv_heads():
    import jax
    import jax.numpy as jnp
    sds = lambda g: {"layers_0": {"self_attention": {  # noqa: E731
        "cached_key": jax.ShapeDtypeStruct((8, g, 16, 128), jnp.bfloat16),
        "cached_value": jax.ShapeDtypeStruct((8, g, 16, 128), jnp.bfloat16)}}, "step": jax.ShapeDtypeStruct((), jnp.int32)}
    mesh = {"data": 2, "fsdp": 1, "model": 4}
    s1 = sharding.cache_partition_specs(sds(1), mesh)
    assert s1["layers_0"]["self_attention"]["cached_key"] == P(("data",), None, None, None)
    assert s1["step"] == P()
    s4 = sharding.cache_partition_specs(sds(4), mesh)
    assert s4["layers_0"]["self_attention"]["cached_value"] == P(("data",), "model", None, None)


def _train_step_dot_flops(cfg, num_microbatches=1, remat="full"):
    import jax
    import jax.numpy as jnp
    import flax.linen as nn

    from gqa_uptrain.aot import dot_flops
    from gqa_uptrain.optim import learning_rate_schedule, make_optimizer
    from gqa_uptrain.train import TrainConfig, make_train_step
    tc = TrainConfig(model_dir="unused", train_steps=1, batch_size=4, inputs_length=16, targets_length=8,
                     num_microbatches=num_microbatches, remat_policy=remat)
    opt = make_optimizer(tc.optimizer)
    params = nn.meta.unbox(abstract_params(cfg))
    batch = {k: jax.ShapeDtypeStruct((4, 16 if k.startswith("encoder") else 8), jnp.int32) for k in
             ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")}
    step = make_train_step(cfg, tc, opt, learning_rate_schedule(tc.optimizer))
    jaxpr = jax.make_jaxpr(step)(params, jax.eval_shape(opt.init, params), jax.ShapeDtypeStruct((), jnp.int32), batch)
    return dot_flops(jaxpr.jaxpr)


def test_dot_flops_count_loops_as_often_as_they_run(tiny_config):
    import jax
    import jax.numpy as jnp

    from gqa_uptrain.aot import dot_flops, hlo_op_count
    a, b = jax.ShapeDtypeStruct((3, 5), jnp.float32), jax.ShapeDtypeStruct((5, 7), jnp.float32)
    assert dot_flops(jax.make_jaxpr(lambda a, b: a @ b)(a, b).jaxpr) == 2 * 3 * 5 * 7
    looped = jax.make_jaxpr(lambda a, b: jax.lax.scan(lambda c, _: (c, c @ b), a, None, length=4)[1])(a, b)
    assert dot_flops(looped.jaxpr) == 4 * 2 * 3 * 5 * 7
    # XLA's cost analysis counts a loop body once; this count must not depend on scanning or microbatching.
    plain = _train_step_dot_flops(tiny_config)
    assert _train_step_dot_flops(tiny_config.replace(scan_layers=True)) == plain
    assert _train_step_dot_flops(tiny_config, num_microbatches=2) == plain
    assert _train_step_dot_flops(tiny_config.replace(num_encoder_layers=4)) > plain
    assert _train_step_dot_flops(tiny_config, remat="none") < plain  # full remat recomputes the forward's matmuls
    assert hlo_op_count("%0 = stablehlo.add %a, %b : tensor<f32>\n  ROOT %t.1 = (f32[]) tuple(%x)\n"
                        "  return %0\n") == 2


def test_topologies_count_devices_as_jax_does(aot):
    assert len(aot.topology_devices("v5e:2x2")) == 4
    assert len(aot.topology_devices("v4:2x2x2")) == 8  # megacore: one device per chip, not two
    with pytest.raises(ValueError, match="v9x"):
        aot.chip_for("v9x:2x2")


def test_train_step_compiles_and_arguments_are_the_sharded_state(aot):
    from gqa_uptrain.memory import activation_bytes_per_device
    from gqa_uptrain.train import TrainConfig
    mesh = aot.topology_mesh("v5e:2x2", "data=1,fsdp=2,model=2")
    tc = TrainConfig(model_dir="unused", train_steps=1, batch_size=16, inputs_length=128, targets_length=128,
                     num_microbatches=2)
    r = aot.compile_train(MQA, tc, mesh, aot.chip_for("v5e:2x2"))
    b = r["per_device_bytes"]
    # params (f32) + factored Adafactor state + 4 int32 [16, 128] batch arrays, as sharded on this mesh.
    assert r["expected_argument_bytes"] > 0
    assert b["arguments"] == pytest.approx(r["expected_argument_bytes"], rel=0.02)
    # params and optimizer state are donated: their buffers are the outputs'.
    assert b["alias"] >= 0.9 * (b["arguments"] - 4 * 16 * 128 * 4 // 2)
    assert r["fits"] and r["flops_per_device"] > 0 and r["bytes_accessed_per_device"] > 0
    assert r["roofline_seconds"] > 0
    # XLA counts the microbatch loop's body once; scaled back, 2 microbatches cost what 1 does for the same batch.
    one = aot.compile_train(MQA, dataclasses.replace(tc, num_microbatches=1), mesh, aot.chip_for("v5e:2x2"))
    assert r["cost_loop_factor"] == 2 and "cost_loop_factor" not in one
    assert r["flops_per_device"] == pytest.approx(one["flops_per_device"], rel=0.03)
    assert r["xla_cost_per_device"]["flops"] < 0.6 * one["flops_per_device"]
    assert r["dot_flops_global"] == one["dot_flops_global"]
    # Matmuls are most of the step: the jaxpr's count over the 4 devices is close to XLA's per-device FLOPs.
    assert 0.6 < one["dot_flops_global"] / 4 / one["flops_per_device"] < 1.1, (one["dot_flops_global"], one)
    assert one["lower_seconds"] < one["compile_seconds"] and 0 < one["hlo_ops"]["lowered"]
    # The hand formula (inspect's fast fallback) is within a factor of 3 of XLA's temporaries for this step.
    act = activation_bytes_per_device(MQA, dict(mesh.shape), 16, 128, 128, 2, "none")
    assert b["temp"] / 3 < act < 3 * b["temp"], (act, b["temp"])


def test_decode_programs_compile_and_mqa_cache_is_replicated_over_model(aot):
    chip = aot.chip_for("v5e:2x2")
    mesh = aot.topology_mesh("v5e:2x2", "data=1,fsdp=1,model=4")
    batch, src, length = 8, 128, 32
    mqa = aot.compile_decode(MQA, mesh, chip, batch, src, length)
    gqa = aot.compile_decode(GQA4, mesh, chip, batch, src, length, programs=("step",))
    # Self cache [b, G, length, 128] + cross K/V [b, G, src, 128], K and V, bf16, one decoder layer.
    full_mqa = 2 * 2 * batch * 1 * (length + src) * 128
    assert mqa["step"]["cache_bytes_per_device"] == full_mqa + 4  # whole head on every device (+ step counter)
    assert gqa["step"]["cache_bytes_per_device"] == 4 * full_mqa // 4 + 4  # 4 heads, one per device
    for r in (mqa["prefill"], mqa["step"], gqa["step"]):
        assert r["fits"] and r["flops_per_device"] > 0
    assert mqa["step"]["per_device_bytes"]["alias"] >= full_mqa  # the cache is updated in place


def test_inspect_compile_cli_writes_the_report(aot, tmp_path, capsys):
    from gqa_uptrain.cli import main
    out = tmp_path / "plan.json"
    assert main(["inspect", "--gin_file=models/t5_1_1/tiny.gin", "--gin.NUM_KV_HEADS=1", "--topology", "v5e:2x2",
                 "--mesh", "data=2,fsdp=1,model=2", "--compile", "decode", "--batch_size", "4",
                 "--inputs_length", "32", "--targets_length", "8", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["devices"] == 4 and set(rep["programs"]) == {"decode_prefill", "decode_step"}
    for r in rep["programs"].values():
        assert set(r["per_device_bytes"]) >= {"arguments", "temp", "output", "total"}
        for key in ("hbm_bytes", "fits", "flops_per_device", "bytes_accessed_per_device", "roofline_seconds",
                    "compile_seconds"):
            assert key in r
    text = capsys.readouterr()
    assert "roofline estimate" in text.out and "replicated over `model`" in text.err
    assert main(["inspect", "--gin_file=models/t5_1_1/tiny.gin", "--topology", "v5e:2x2", "--compile", "train"]) == 1
    assert "go together" in capsys.readouterr().err


def test_cpu_host_with_libtpu_prints_no_libtpu_trace(aot, monkeypatch):
    import os
    import subprocess
    import sys
    if any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio", "/dev/nvidia0")):
        pytest.skip("this host has an accelerator: libtpu / CUDA are meant to initialise")
    code = ("from gqa_uptrain.tpu_env import default_to_cpu_without_tpu as f; import sys; on = f(); import jax; "
            "print(on, jax.devices()[0].platform)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.split() == ["True", "cpu"], p.stderr[-2000:]
    assert "TPU_WORKER" not in p.stderr and "libtpu" not in p.stderr.lower(), p.stderr[-2000:]
    # The CLI applies it before anything imports JAX; an explicit JAX_PLATFORMS is left alone.
    from gqa_uptrain.cli import main
    monkeypatch.delenv("JAX_PLATFORMS")
    assert main(["inspect", "--summary"]) == 0 and os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu,tpu")
    assert main(["inspect", "--summary"]) == 0 and os.environ["JAX_PLATFORMS"] == "cpu,tpu"

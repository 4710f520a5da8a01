"""gqa_uptrain.memory: the parameter table, and the hand activation formula (inspect's fast fallback) held against
XLA's memory analysis of the trainer's compiled step on this CPU (tests/test_aot.py does the same for a TPU
topology when libtpu is installed)."""
import numpy as np
import pytest

from gqa_uptrain import memory
from gqa_uptrain.config import ModelConfig

TINY = ModelConfig(vocab_size=4224, d_model=128, num_heads=8, head_dim=16, d_ff=256, num_encoder_layers=2,
                   num_decoder_layers=2)


def test_parameter_table_counts_and_shards():
    plain = memory.parameter_table(TINY)
    assert plain.per_device_bytes == 0 and all(r.spec is None for r in plain.rows)
    assert plain.total == sum(r.count for r in plain.rows) == sum(plain.groups.values())
    assert plain.groups["token_embedder"] == 4224 * 128
    split = memory.parameter_table(TINY, {"data": 1, "fsdp": 1, "model": 2})
    # float32 parameters: every kernel with a heads / d_ff / vocab axis is halved, norms and biases are not.
    assert plain.total * 4 / 2 < split.per_device_bytes < plain.total * 4
    q = next(r for r in split.rows if r.name == "decoder/layers_0/self_attention/query/kernel")
    assert q.shape == (128, 128) and q.bytes_per_device == 128 * 128 * 4 // 2


def test_activation_formula_is_close_to_xla_memory_analysis_of_the_train_step():
    import jax
    from jax.sharding import Mesh

    from gqa_uptrain import aot
    from gqa_uptrain.train import TrainConfig
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model"))
    cpu = aot.Chip("this CPU", 1 << 40, 1e12, 1e11)  # only `fits` reads it
    tc = TrainConfig(model_dir="unused", train_steps=1, batch_size=16, inputs_length=128, targets_length=32)
    temp = aot.compile_train(TINY, tc, mesh, cpu)["per_device_bytes"]["temp"]
    act = memory.activation_bytes_per_device(TINY, dict(mesh.shape), 16, 128, 32, 1, "none")
    # Measured here: the formula is 1.07x XLA:CPU's temporaries for this step (0.84x at batch 8, lengths 64/16).
    assert 0.5 < act / temp < 2, (act, temp)


def test_activation_formula_rejects_unknown_policy():
    with pytest.raises(ValueError, match="remat"):
        memory.activation_bytes_per_device(TINY, {}, 8, 64, 16, 1, "sometimes")

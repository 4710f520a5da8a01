"""How `gqa-uptrain train` picks the model config (no training here: the trainer has its own tests)."""

import pytest

from gqa_uptrain import checkpoint, gin_utils
from gqa_uptrain.cli import train_cmd
from gqa_uptrain.config import ModelConfig

@pytest.fixture
def converted(tmp_path):
    d = tmp_path / "gqa2"
    d.mkdir()
    cfg = ModelConfig(vocab_size=4224, d_model=128, num_heads=8, head_dim=16, d_ff=256, num_encoder_layers=2,
                      num_decoder_layers=2, decoder_self_kv_heads=2, decoder_cross_kv_heads=2, dtype="float32")
    checkpoint.write_config_files(d, cfg)
    return d, cfg

def test_architecture_comes_from_initial_checkpoint_without_model_file(converted):
    d, cfg = converted
    train_cmd.register_gin()
    gin_utils.parse_gin(["runs/finetune.gin"], [f"INITIAL_CHECKPOINT = '{d}'", "MODEL_DIR = '/tmp/x'"])
    got = gin_utils.resolve_model_config(None, str(d))
    # finetune.gin's DROPOUT_RATE = 0.1 applies; the architecture is the checkpoint's.
    assert got == cfg.replace(dropout_rate=0.1)

def test_model_file_must_match_checkpoint(converted):
    d, cfg = converted
    train_cmd.register_gin()
    gin_utils.parse_gin(["models/t5_1_1/tiny.gin", "runs/uptrain.gin"], [f"INITIAL_CHECKPOINT = '{d}'"])
    with pytest.raises(ValueError, match="has decoder_self_kv_heads=2 but the gin model config has 8"):
        gin_utils.resolve_model_config(None, str(d))
    gin_utils.parse_gin(["models/t5_1_1/tiny.gin", "runs/uptrain.gin"],
                        [f"INITIAL_CHECKPOINT = '{d}'", "NUM_KV_HEADS = 2"])
    assert gin_utils.resolve_model_config(None, str(d)) == cfg

def test_no_model_anywhere_is_a_clear_error():
    train_cmd.register_gin()
    gin_utils.parse_gin(["runs/pretrain.gin"], ["MODEL_DIR = '/tmp/x'"])
    with pytest.raises(ValueError, match="no model config: pass a model gin file"):
        gin_utils.resolve_model_config('/nonexistent/run', None)


def test_checkpoint_dataset_macro():
    train_cmd.register_gin()
    gin_utils.parse_gin(["runs/pretrain.gin"], ["MODEL_DIR = '/tmp/x'", "TRAIN_STEPS = 10"])
    assert train_cmd.train_config_from_gin().checkpoint_dataset is True
    gin_utils.parse_gin(["runs/uptrain.gin"], ["MODEL_DIR = '/tmp/x'", "INITIAL_CHECKPOINT = '/tmp/c'",
                                               "CHECKPOINT_DATASET = False"])
    assert train_cmd.train_config_from_gin().checkpoint_dataset is False

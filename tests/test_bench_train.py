"""`bench train`: both sides train the same model from the same weights, and the CLI writes its JSON."""
import json

import jax
import numpy as np
import pytest

from gqa_uptrain.benchmarks import train as bench
from gqa_uptrain.model import init_params


def test_hf_side_starts_from_our_weights(tiny_config):
    """Same parameters and batch -> the same first-step loss on both sides. This fails if the HF model keeps its own
    init, or if transformers re-ties lm_head to the embedding (which it does for every constructed T5)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    cfg = tiny_config.replace(dropout_rate=0.0, num_encoder_layers=1, num_decoder_layers=1)  # compile time
    batch = bench._batch(cfg, 2, 16, 8)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(1)))
    ours, hf = bench.ours_step(cfg, batch, params), bench.hf_step(cfg, batch, params)
    first_ours, first_hf = ours(), hf()
    assert first_hf == pytest.approx(first_ours, rel=1e-5)
    # Each side then trains: its loss moves from the shared starting point.
    assert ours() != first_ours and hf() != first_hf


def test_bench_train_cli_writes_json(tmp_path, capsys):
    from gqa_uptrain.cli import main
    out = tmp_path / "sub" / "train.json"
    small = ["bench", "train", "--gin.ModelConfig.num_encoder_layers=1", "--gin.ModelConfig.num_decoder_layers=1",
             "--batch_size", "2", "--inputs_length", "16", "--targets_length", "8", "--warmup", "0", "--no_hf"]
    assert main([*small, "--steps", "2", "--rounds", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [len(r) for r in result["times_s"]["ours"]] == [2, 2]
    assert result["ours_ms_per_step"] > 0 and result["tokens_per_step"] == 2 * (16 + 8)
    assert "hf" not in result["times_s"] and not list(out.parent.glob(".*tmp*"))
    assert "ms/step" in capsys.readouterr().out
    assert main([*small, "--rounds", "0"]) == 1
    assert "--rounds must be >= 1" in capsys.readouterr().err

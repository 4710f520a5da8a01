"""HF T5 <-> our model through the name table (issue #3 cross-check, issue #4 export)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from gqa_uptrain import hf
from gqa_uptrain.model import Transformer, init_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_DIMS = dict(vocab_size=96, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=2,
               feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=8,
               relative_attention_max_distance=20)


def _batch(vocab, seed=0):
    r = np.random.RandomState(seed)
    enc = r.randint(2, vocab, size=(2, 11))
    enc[1, 7:] = 0  # padding in the second example
    dec = r.randint(2, vocab, size=(2, 9))
    dec_in = np.concatenate([np.zeros((2, 1), int), dec[:, :-1]], axis=1)
    return enc, dec_in


def _random_hf(tie: bool | None, untied_head: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    kw = {} if tie is None else {"tie_word_embeddings": tie}
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**HF_DIMS, **kw)).eval()
    with torch.no_grad():
        # Non-trivial layer norms and a distinct lm_head so every tensor matters.
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    if untied_head:
        model.lm_head.weight = torch.nn.Parameter(torch.randn(HF_DIMS["vocab_size"], HF_DIMS["d_model"]))
    return model


def _hf_logits(model, enc, dec_in):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                    decoder_input_ids=torch.tensor(dec_in))
    return out.logits.numpy()


def _nested(flat):
    from flax import traverse_util
    return traverse_util.unflatten_dict(flat, sep="/")


def _our_logits(config, params, enc, dec_in):
    return np.asarray(Transformer(config).apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec_in)))


def test_name_table_is_a_bijection_covering_every_parameter(tiny_config):
    from gqa_uptrain.checkpoint import expected_shapes
    m = hf.name_map(tiny_config)
    ours = [x.ours for x in m] + [hf.LOGITS_KERNEL]
    assert sorted(ours) == sorted(expected_shapes(tiny_config))
    assert len({x.hf for x in m}) == len(m)
    # relpos only in block 0; transposes where layouts differ.
    rel = [x for x in m if "relative_attention_bias" in x.hf]
    assert [x.hf.split(".")[2] for x in rel] == ["0", "0"]
    assert {x.hook for x in m if x.hf.endswith("q.weight")} == {"linear"}


@pytest.mark.parametrize("variant", ["untied_head", "tie_false", "tied_default"])
def test_random_hf_t5_loads_with_equal_logits(tmp_path, variant):
    """Issue #3: a save_pretrained'd random HF T5.1.1 loads through the name table with the same logits."""
    from gqa_uptrain.readers import open_source
    model = _random_hf(tie={"untied_head": False, "tie_false": False, "tied_default": None}[variant],
                       untied_head=variant == "untied_head")
    model.save_pretrained(tmp_path / "hf")
    enc, dec_in = _batch(HF_DIMS["vocab_size"])
    want = _hf_logits(model, enc, dec_in)
    src = open_source(tmp_path / "hf")  # streaming safetensors reader
    got = _our_logits(src.config, _nested(src.load_all()), enc, dec_in)
    assert src.config.num_heads == 4 and src.config.head_dim == 8 and src.config.relative_attention_max_distance == 20
    assert np.abs(got - want).max() < 1e-4
    # Same through the in-memory API another engineer's tests use.
    cfg2, params2 = hf.params_from_hf(model.state_dict(), model.config)
    assert np.abs(_our_logits(cfg2, params2, enc, dec_in) - want).max() < 1e-4


def test_tied_scale_is_folded_into_logits_dense(tmp_path):
    """Tied HF T5 scales the decoder output by d_model**-0.5; untied does not. The difference must show."""
    tied = _random_hf(tie=None)
    cfg, p_tied = hf.params_from_hf(tied.state_dict(), tied.config)
    emb = tied.shared.weight.detach().numpy()
    np.testing.assert_allclose(p_tied["decoder"]["logits_dense"]["kernel"], emb.T * cfg.d_model ** -0.5, rtol=1e-6)
    untied = _random_hf(tie=False)
    _, p_untied = hf.params_from_hf(untied.state_dict(), untied.config)
    np.testing.assert_allclose(p_untied["decoder"]["logits_dense"]["kernel"],
                               untied.shared.weight.detach().numpy().T, rtol=1e-6)


def test_export_roundtrip_our_model_loads_in_hf(tmp_path, tiny_config, rng):
    """Our random model -> HF safetensors -> T5ForConditionalGeneration gives our logits."""
    from gqa_uptrain.export import export_hf
    from gqa_uptrain.checkpoint import save_params
    cfg = tiny_config
    params = init_params(cfg, rng)
    save_params(tmp_path / "ours", params, cfg)
    export_hf(tmp_path / "ours", tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["tie_word_embeddings"] is False and conf["feed_forward_proj"] == "gated-gelu"
    model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    enc, dec_in = _batch(cfg.vocab_size, seed=1)
    want = _our_logits(cfg, params, enc, dec_in)
    assert np.abs(_hf_logits(model, enc, dec_in) - want).max() < 1e-4


def test_export_gqa_writes_narrow_kv_and_expand_kv_loads_in_hf(tmp_path, tiny_config, rng):
    from gqa_uptrain.checkpoint import save_params
    from gqa_uptrain.export import export_hf
    from gqa_uptrain.readers import open_source
    cfg = tiny_config.with_decoder_kv_heads(2)
    params = init_params(cfg, rng)
    save_params(tmp_path / "ours", params, cfg)
    export_hf(tmp_path / "ours", tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["gqa_decoder_self_kv_heads"] == 2 and conf["gqa_decoder_cross_kv_heads"] == 2
    assert "gqa_encoder_kv_heads" not in conf
    from gqa_uptrain.readers import SafetensorsFile
    st = SafetensorsFile(tmp_path / "hf" / "model.safetensors")
    assert st.shape("decoder.block.0.layer.0.SelfAttention.k.weight") == (2 * 8, 32)
    assert st.shape("encoder.block.0.layer.0.SelfAttention.k.weight") == (4 * 8, 32)
    # Our reader takes the GQA fields back: same params.
    back = open_source(tmp_path / "hf")
    assert back.config == cfg
    enc, dec_in = _batch(cfg.vocab_size, seed=2)
    want = _our_logits(cfg, params, enc, dec_in)
    assert np.abs(_our_logits(back.config, _nested(back.load_all()), enc, dec_in) - want).max() < 1e-5
    # --expand-kv: repeated K/V, stock HF T5 loads it and computes the same function.
    export_hf(tmp_path / "ours", tmp_path / "hf_mha", expand_kv=True)
    model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf_mha").eval()
    assert np.abs(_hf_logits(model, enc, dec_in) - want).max() < 1e-4


def test_cli_hf_convert_identity_export_loads_in_hf(tmp_path, capsys):
    """HF safetensors -> convert (G=H) -> export -> HF loads it with the source's logits."""
    from gqa_uptrain.cli import main
    model = _random_hf(tie=None, seed=3)  # tied + scaled: exercises the folded lm_head scale end to end
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # sharded index
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert main(["convert", "--source", str(tmp_path / "hf"), "--num-kv-heads", "4", "--layers", "all",
                 "--output", str(tmp_path / "ours"), "--no-progress"]) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "ours"), "--output", str(tmp_path / "back"),
                 "--no-progress"]) == 0
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    enc, dec_in = _batch(HF_DIMS["vocab_size"], seed=4)
    assert np.abs(_hf_logits(back, enc, dec_in) - _hf_logits(model, enc, dec_in)).max() < 1e-4

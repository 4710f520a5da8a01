import json

import numpy as np
import pytest

from gqa_uptrain import evaluate
from gqa_uptrain.cli import main
from gqa_uptrain.config import ModelConfig


# ------------------------------------------------------------------------------------- hand-computed metrics


def test_normalize_and_em_f1_hand_values():
    assert evaluate.normalize_answer("  The Cat,  sat!  ") == "cat sat"
    assert evaluate.exact_match("A  Cat!", "cat") == 1.0
    # pred {cat, sat} vs ref {cat, sat, on, mat}: P = 1, R = 1/2 -> F1 = 2/3.
    assert evaluate.token_f1("The cat sat.", "cat sat on the mat") == pytest.approx(2 / 3)
    # Multiset overlap: "x x y" vs "x y y" share one x and one y -> P = R = 2/3.
    assert evaluate.token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert evaluate.token_f1("", "") == 1.0 and evaluate.token_f1("x", "") == 0.0
    res = evaluate.em_f1(["A  Cat!", "The cat sat.", "dog"], ["cat", ["nope", "cat sat on the mat"], "cat"])
    assert res["exact_match"] == pytest.approx(100 / 3)
    assert res["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)


def test_rouge_hand_values():
    # pred "the cat sat" vs ref "the cat sat on the mat": unigram overlap 3 -> P = 1, R = 1/2, F = 2/3;
    # bigrams (the cat, cat sat) both in ref: P = 1, R = 2/5 -> F = 4/7; LCS 3 -> F = 2/3.
    r = evaluate.rouge(["the cat sat"], ["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(200 / 3, abs=1e-6)
    assert r["rouge2"] == pytest.approx(400 / 7, abs=1e-6)
    assert r["rougeL"] == pytest.approx(200 / 3, abs=1e-6)
    # Porter stemming: cats -> cat, running / runs -> run.
    assert evaluate.rouge(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(100.0)
    # Mean over examples, best of several references.
    r = evaluate.rouge(["a b", "c d"], [["x y", "a b"], "c z"])
    assert r["rouge1"] == pytest.approx((100 + 50) / 2)


def test_bleu_hand_value():
    # Precisions 5/6, 3/5, 2/4, 1/3 (clipped n-gram matches), equal lengths so BP = 1:
    # BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = 0.5373 -> 53.73.
    got = evaluate.bleu(["the cat sat on the mat"], ["the cat sat on a mat"])["bleu"]
    assert got == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25, abs=1e-3)
    assert evaluate.bleu(["one two three four five"], ["one two three four five"])["bleu"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="same number of references"):
        evaluate.bleu(["a", "b"], [["a", "x"], "b"])


def test_compute_metrics_table_and_errors():
    res = evaluate.compute_metrics(["rouge", "em_f1"], ["the cat"], ["the cat"])
    assert res == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "exact_match": 100.0, "f1": 100.0}
    table = evaluate.format_table(res, "demo")
    assert table.splitlines()[0] == "demo" and "exact_match  100.00" in table
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate.parse_metric_names("rouge,meteor")
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        evaluate.em_f1(["a", "b"], ["a"])
    lm = evaluate.loss_metrics(-6.0, 3, 2)
    assert lm["loss"] == 2.0 and lm["perplexity"] == pytest.approx(np.exp(2.0))
    assert lm["token_accuracy"] == pytest.approx(200 / 3)


def test_read_seq2seq_files(tmp_path):
    tsv = tmp_path / "d.tsv"
    tsv.write_text("in one\tout one\n\nin two\tref a\tref b\n")
    assert evaluate.read_seq2seq_file(tsv) == [("in one", "out one"), ("in two", ["ref a", "ref b"])]
    jl = tmp_path / "d.jsonl"
    jl.write_text(json.dumps({"inputs": "x", "targets": ["y", "z"]}) + "\n")
    assert evaluate.read_seq2seq_file(jl) == [("x", ["y", "z"])]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"inputs": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: record lacks field\(s\) \['targets'\]"):
        evaluate.read_seq2seq_file(bad)


# ------------------------------------------------------------------------------------------ CLI end to end


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny GQA model over the bundled vocabulary (4100 ids -> vocab 4224), saved with save_params."""
    import jax

    from gqa_uptrain.checkpoint import save_params
    from gqa_uptrain.model import init_params
    cfg = ModelConfig(vocab_size=4224, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=2,
                      num_decoder_layers=2, decoder_self_kv_heads=2, decoder_cross_kv_heads=2)
    params = init_params(cfg, jax.random.PRNGKey(0))
    # Sharper output layer so the random model emits EOS and varied pieces, not one repeated token.
    params["decoder"]["logits_dense"]["kernel"] = params["decoder"]["logits_dense"]["kernel"] * 3.0
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_params(d, params, cfg)
    return d, cfg, params


TEXTS = ["define: harbor: the ship reached the harbor", "define: run: he runs every morning before work",
         "define: light: turn on the light in the hall"]  # all three bucket to 16 input tokens: few compiles


def test_infer_cli_end_to_end(tiny_checkpoint, tmp_path, capsys):
    from gqa_uptrain.data import bundled_vocabulary
    from gqa_uptrain.decode import Generator
    ckpt, cfg, params = tiny_checkpoint
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["infer", "--checkpoint", str(ckpt), "--input", str(src), "--output", str(out), "--batch_size",
                 "2", "--max_decode_length", "12", "--quiet"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["input"] for r in records] == TEXTS
    # Same strings as decoding each input alone with the library (batching/sorting must not change outputs).
    gen = Generator(cfg, params, bundled_vocabulary(), max_decode_length=12)
    want = [gen.generate([t])[0] for t in TEXTS]
    assert [r["output"] for r in records] == want
    assert any(w.strip() for w in want)


def test_eval_cli_scores_own_predictions(tiny_checkpoint, tmp_path, capsys):
    """Evaluate on a file whose references are the model's own greedy outputs: EM = F1 = ROUGE = 100, and the
    reported loss equals the teacher-forced loss computed here."""
    from gqa_uptrain.data import bundled_vocabulary
    from gqa_uptrain.decode import EOS_ID, Generator, pad_batch
    from gqa_uptrain.seq2seq import score_sequences
    ckpt, cfg, params = tiny_checkpoint
    vocab = bundled_vocabulary()
    gen = Generator(cfg, params, vocab, max_decode_length=12)
    preds = [gen.generate([t])[0] for t in TEXTS]
    keep = [i for i, p in enumerate(preds) if p.strip()]
    assert keep
    data = tmp_path / "own.tsv"
    data.write_text("".join(f"{TEXTS[i]}\t{preds[i]}\n" for i in keep))
    res_path = tmp_path / "results.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--metrics", "em_f1,rouge,loss",
                 "--max_decode_length", "12", "--output", str(res_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "exact_match" in out and "100.00" in out
    m = json.loads(res_path.read_text())["metrics"]
    assert m["exact_match"] == 100.0 and m["f1"] == 100.0 and m["rouge1"] == pytest.approx(100.0)
    enc = pad_batch([list(vocab.encode(TEXTS[i])) + [EOS_ID] for i in keep])
    tgt = pad_batch([list(vocab.encode(preds[i])) + [EOS_ID] for i in keep])
    logp = np.asarray(score_sequences(cfg, params, enc, tgt))
    assert m["loss"] == pytest.approx(-logp[tgt > 0].sum() / (tgt > 0).sum(), rel=1e-5)


def test_eval_cli_errors(tiny_checkpoint, tmp_path, capsys):
    ckpt, _, _ = tiny_checkpoint
    assert main(["eval", "--checkpoint", str(ckpt)]) == 1
    assert "exactly one of --task NAME or --data FILE" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / "none.tsv")]) == 1
    assert "none.tsv does not exist" in capsys.readouterr().err
    src = tmp_path / "in.txt"
    src.write_text("x\n")
    assert main(["infer", "--checkpoint", str(tmp_path / "nockpt"), "--input", str(src)]) == 1
    assert "nockpt does not exist" in capsys.readouterr().err

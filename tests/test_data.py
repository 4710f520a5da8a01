"""Tests for gqa_uptrain.data: span corruption statistics and invertibility, tasks, vocab."""

import gzip
import json
import math

import numpy as np
import pytest

# Required dependencies: imported plainly, so a broken install fails here instead of skipping.
import seqio
import tensorflow as tf

from gqa_uptrain import data

VOCAB = data.bundled_vocabulary()
V = VOCAB.vocab_size
FEATURES = data.default_output_features(VOCAB)
SEG = 568  # T5's raw segment length for inputs 512 / targets 114


def _docs(num_docs, doc_len, seed=0):
    """Random non-special, non-sentinel token documents, int32 [num_docs, doc_len]."""
    rng = np.random.default_rng(seed)
    return rng.integers(3, 4000, size=(num_docs, doc_len), dtype=np.int32)


def _corrupt(docs, seed, inputs_length=512, targets_length=114):
    ds = tf.data.Dataset.from_tensor_slices({"targets": docs})
    ds = data.span_corruption(ds, {"inputs": inputs_length, "targets": targets_length}, FEATURES, seed=seed)
    return list(ds.as_numpy_iterator())


def _reconstruct(inputs, targets):
    """Puts each noise span from targets back in place of its sentinel in inputs."""
    spans, key = {}, None
    for t in targets:
        if t >= V - VOCAB.extra_ids:
            key = int(t)
            spans[key] = []
        else:
            spans[key].append(int(t))
    out = []
    for t in inputs:
        out.extend(spans[int(t)] if t >= V - VOCAB.extra_ids else [int(t)])
    return np.array(out, np.int32)


@pytest.fixture(scope="module")
def corrupted():
    docs = _docs(256, SEG)  # 2 x 128-doc concatenations -> 256 full segments
    return docs, _corrupt(docs, seed=7)


def test_lengths_match_t5():
    assert data.span_corruption_lengths(512, 114) == (568, 512, 114)
    assert data.span_corruption_lengths(512) == (568, 512, 114)
    # A tighter targets budget shrinks the raw segment rather than truncating.
    n, i, t = data.span_corruption_lengths(512, 64)
    assert t <= 64 and i <= 512 and n < 568
    assert data.noise_counts(568, 0.15, 3.0) == (85, 28)


def test_noise_density_and_span_length(corrupted):
    _, examples = corrupted
    assert len(examples) == 256
    noise_total, spans_total, span_lengths, first_half = 0, 0, [], 0
    for ex in examples:
        recon = _reconstruct(ex["inputs"], ex["targets"])
        assert len(recon) == SEG
        is_sentinel_t = ex["targets"] >= V - VOCAB.extra_ids
        num_spans = int(is_sentinel_t.sum())
        noise = len(ex["targets"]) - num_spans
        # Exact T5 counts for every segment.
        assert (noise, num_spans) == data.noise_counts(SEG, 0.15, 3.0)
        noise_total += noise
        spans_total += num_spans
        span_lengths += [len(s) for s in np.split(ex["targets"], np.flatnonzero(is_sentinel_t))[1:]]
        # Noise positions: map inputs back to original positions.
        pos, mask = 0, np.zeros(SEG, bool)
        for t in ex["inputs"]:
            if t >= V - VOCAB.extra_ids:
                k = V - 1 - int(t)
                L = span_lengths[len(span_lengths) - num_spans + k] - 1
                mask[pos : pos + L] = True
                pos += L
            else:
                pos += 1
        first_half += mask[: SEG // 2].sum()
    assert abs(noise_total / (SEG * len(examples)) - 0.15) < 0.002
    assert abs(noise_total / spans_total - 3.0) < 0.05
    # Span lengths are a uniform random composition of 85 into 28 parts, so
    # P(len == 1) = 27/84; a fixed-length or biased segmentation fails this.
    lengths = np.array(span_lengths) - 1  # minus the sentinel
    p1, n = 27 / 84, len(lengths)
    assert abs((lengths == 1).mean() - p1) < 4 * math.sqrt(p1 * (1 - p1) / n)
    assert lengths.max() > 6
    # Noise is spread evenly over the segment.
    assert abs(first_half / noise_total - 0.5) < 0.03


def test_sentinels_in_order_and_reconstruction(corrupted):
    docs, examples = corrupted
    stream = docs.reshape(-1)
    for i, ex in enumerate(examples):
        inp, tgt = ex["inputs"], ex["targets"]
        s_in = inp[inp >= V - VOCAB.extra_ids]
        s_tg = tgt[tgt >= V - VOCAB.extra_ids]
        expected = V - 1 - np.arange(len(s_in))  # <extra_id_0>, <extra_id_1>, ...
        np.testing.assert_array_equal(s_in, expected)
        np.testing.assert_array_equal(s_tg, expected)
        assert tgt[0] == V - 1  # targets start with the first sentinel
        assert inp[0] < V - VOCAB.extra_ids  # inputs start with a non-noise token
        assert len(inp) <= 511 and len(tgt) <= 113  # room for EOS
        np.testing.assert_array_equal(_reconstruct(inp, tgt), stream[i * SEG : (i + 1) * SEG])


def test_short_and_ragged_documents_reconstruct():
    rng = np.random.default_rng(1)
    docs = [rng.integers(3, 4000, size=n, dtype=np.int32) for n in [1, 2, 3, 5, 7, 40, 0, 90]]
    ds = tf.data.Dataset.from_generator(
        lambda: ({"targets": d} for d in docs), output_signature={"targets": tf.TensorSpec([None], tf.int32)}
    )
    ds = data.span_corruption(ds, {"inputs": 32, "targets": 16}, FEATURES, seed=0)
    examples = list(ds.as_numpy_iterator())
    stream = np.concatenate(docs)
    seg, _, _ = data.span_corruption_lengths(32, 16)
    got = np.concatenate([_reconstruct(e["inputs"], e["targets"]) for e in examples])
    np.testing.assert_array_equal(got, stream)
    assert all(len(e["inputs"]) <= 31 and len(e["targets"]) <= 15 for e in examples)
    assert len(examples) == math.ceil(len(stream) / seg)
    for n in range(1, 12):  # mask itself on tiny lengths: starts non-noise, T5 counts
        m = data.random_spans_noise_mask(n, 0.15, 3.0, [[1, 2], [3, 4]]).numpy()
        assert m.shape == (n,) and not m[0]
        if n >= 2:
            assert m.sum() == data.noise_counts(n, 0.15, 3.0)[0]


def test_deterministic_given_seed():
    docs = _docs(8, 300, seed=3)
    a, b, c = _corrupt(docs, seed=5), _corrupt(docs, seed=5), _corrupt(docs, seed=6)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])
    assert any(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c, strict=True))


def test_span_corruption_task_lengths_eos_and_fixed_examples():
    lengths = {"inputs": 64, "targets": 12}
    ex1 = data.fixed_validation_examples(data.SPAN_CORRUPTION_TASK, lengths, 16, seed=0)
    ex2 = data.fixed_validation_examples(data.SPAN_CORRUPTION_TASK, lengths, 16, seed=0)
    assert len(ex1) == 16
    for a, b in zip(ex1, ex2, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["targets"], b["targets"])
    for ex in ex1:
        for key in ("inputs", "targets"):
            x = ex[key]
            assert x.dtype == np.int32 and len(x) <= lengths[key]
            assert x[-1] == 1 and (x[:-1] != 1).all() and (x != 0).all()
    # Full segments reach the budget exactly (the split length is not overly conservative);
    # here targets=12 is the binding constraint.
    _, inputs_len, targets_len = data.span_corruption_lengths(64, 12)
    assert targets_len == 12 and inputs_len < 64
    assert max(len(ex["inputs"]) for ex in ex1) == inputs_len
    assert max(len(ex["targets"]) for ex in ex1) == targets_len
    text = VOCAB.decode(ex1[0]["inputs"].tolist())
    assert "<extra_id_0>" in text


def test_wordnet_gloss_task():
    exs = data.fixed_validation_examples(data.WORDNET_GLOSS_TASK, {"inputs": 64, "targets": 64}, 4, seed=0)
    assert len(exs) == 4
    for ex in exs:
        assert ex["inputs_pretokenized"].startswith("define: ")
        assert ex["inputs"][-1] == 1 and ex["targets"][-1] == 1
        assert VOCAB.decode(ex["targets"][:-1].tolist()) == ex["targets_pretokenized"]


def test_gloss_words_disjoint_between_splits():
    words = {}
    for split, path in data.WORDNET_GLOSS_FILES.items():
        with gzip.open(path, "rt") as f:
            words[split] = {json.loads(line)["inputs"].split(": ")[1] for line in f}
    assert len(words["train"]) > 1000 and len(words["validation"]) > 100
    assert not words["train"] & words["validation"]


def test_vocabulary():
    assert VOCAB.extra_ids == 100
    assert V == data.bundled_vocab_size() == 4100
    assert (VOCAB.pad_id, VOCAB.eos_id, VOCAB.unk_id) == (0, 1, 2)
    assert VOCAB.decode([V - 1]) == "<extra_id_0>"
    assert VOCAB.encode("<extra_id_99>") == [V - 100]
    with gzip.open(data.CORPUS_FILES["validation"], "rt") as f:
        lines = [next(f).strip() for _ in range(50)]
    for line in lines:
        ids = VOCAB.encode(line)
        assert VOCAB.unk_id not in ids
        assert VOCAB.decode(ids) == line


def test_user_text_files(tmp_path):
    txt = tmp_path / "train.txt"
    txt.write_text("the quick brown fox jumps over the lazy dog\n\n" * 30)
    jsonl = tmp_path / "valid.jsonl.gz"
    with gzip.open(jsonl, "wt") as f:
        for i in range(10):
            f.write(json.dumps({"text": f"document number {i} about foxes and dogs", "id": i}) + "\n")
    task = data.register_text_file_task("test_user_text", str(txt), str(jsonl), overwrite=True)
    for split in ("train", "validation"):
        ds = task.get_dataset({"inputs": 32, "targets": 8}, split=split, shuffle=False, seed=0)
        exs = list(ds.as_numpy_iterator())
        assert exs and all(len(e["inputs"]) <= 32 and e["inputs"][-1] == 1 for e in exs)
    with pytest.raises(ValueError, match="already registered"):
        data.register_text_file_task("test_user_text", str(txt))


def test_missing_files_raise_clear_errors(tmp_path):
    missing = tmp_path / "nope" / "train.txt"
    with pytest.raises(ValueError, match=str(missing)):
        data.register_text_file_task("test_missing", str(missing))
    assert "test_missing" not in seqio.TaskRegistry.names()
    with pytest.raises(ValueError, match="data_dir not found"):
        data.register_tfds_span_corruption("test_tfds", data_dir=str(tmp_path / "no_tfds"))


def test_register_tasks_idempotent():
    data.register_tasks()
    data.register_tasks()
    assert {data.SPAN_CORRUPTION_TASK, data.WORDNET_GLOSS_TASK} <= set(seqio.TaskRegistry.names())


def test_second_heldout_set_is_a_split_of_span_corruption(tmp_path):
    """python_docs (assets/heldout): evaluation-only text outside the corpus, as a split of the bundled task."""
    data.register_tasks()
    lengths = {"inputs": 32, "targets": 8}
    docs = data.fixed_validation_examples(data.SPAN_CORRUPTION_TASK, lengths, 4, split="python_docs")
    val = data.fixed_validation_examples(data.SPAN_CORRUPTION_TASK, lengths, 4)
    assert len(docs) == 4 and all(len(e["inputs"]) > 0 for e in docs)
    assert [e["inputs"].tolist() for e in docs] != [e["inputs"].tolist() for e in val]
    with gzip.open(data.HELDOUT_FILES["python_docs"], "rt") as f:
        held = set(f)
    for split in ("train", "validation"):  # outside the corpus: no document shared with either split
        with gzip.open(data.CORPUS_FILES[split], "rt") as f:
            assert not held & set(f)
    (tmp_path / "a.txt").write_text("x\n")
    with pytest.raises(ValueError, match="clashes with a standard split"):
        data.register_text_file_task("clash_task", tmp_path / "a.txt", extra_splits={"train": tmp_path / "a.txt"})

"""gqa_uptrain.jsonl: the one reader of users' line files (infer, eval, convert's calibration, seqio data sources)."""
import gzip

import pytest

from gqa_uptrain import jsonl


def test_records_lines_and_gzip(tmp_path):
    f = tmp_path / "d.jsonl.gz"
    with gzip.open(f, "wt") as g:
        g.write('{"inputs": "a", "targets": "b"}\r\n\n  \n{"inputs": "c", "targets": "d", "x": 1}\n')
    got = list(jsonl.read_jsonl(f, ("inputs", "targets")))
    assert [w for w, _ in got] == [f"{f}:1", f"{f}:4"]
    assert got[1][1] == {"inputs": "c", "targets": "d", "x": 1}
    t = tmp_path / "t.txt"
    t.write_text("one\n\ntwo\tthree\n")
    assert list(jsonl.read_lines(t)) == [(1, "one"), (3, "two\tthree")]
    assert jsonl.is_jsonl("x.json.gz") and jsonl.is_jsonl("x.jsonl") and not jsonl.is_jsonl("x.tsv.gz")


@pytest.mark.parametrize("line, expect", [
    ("{not json", "d.jsonl:2: invalid JSON"),
    ("[1, 2]", r"d.jsonl:2: expected a JSON object with 'inputs' and 'targets', got \[1, 2\]"),
    ('{"inputs": "a"}', r"d.jsonl:2: record lacks field\(s\) \['targets'\]"),
])
def test_errors_name_file_line_and_key(tmp_path, line, expect):
    f = tmp_path / "d.jsonl"
    f.write_text('{"inputs": "x", "targets": "y"}\n' + line + "\n")
    with pytest.raises(ValueError, match=expect):
        list(jsonl.read_jsonl(f, ("inputs", "targets")))


def test_missing_file_and_bad_bytes(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file .*nope.jsonl does not exist"):
        list(jsonl.read_jsonl(tmp_path / "nope.jsonl", what="data file"))
    f = tmp_path / "b.jsonl"
    f.write_bytes(b'{"inputs": "ok"}\n{"inputs": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2: not UTF-8 text"):
        list(jsonl.read_jsonl(f, ("inputs",)))


def test_seqio_jsonl_source_names_file_line_and_key(tmp_path):
    import tensorflow as tf

    from gqa_uptrain import data
    f = tmp_path / "train.jsonl"
    f.write_text('{"text": "fine"}\n\n{"txt": "typo"}\n')
    source = data.LineFileDataSource({"train": [str(f)]})
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"train.jsonl:3: record lacks field\(s\) \['text'\]"):
        list(source.get_dataset("train", shuffle=False).as_numpy_iterator())

"""Data: bundled corpus and vocabulary, T5 span corruption, seqio task registration.

Everything here produces ``tf.data`` pipelines of dicts of 1-D ``tf.int32`` token ids
(``"inputs"``, ``"targets"``), as seqio Tasks do; batching and feature conversion are the
trainer's job.

Bundled assets (see ``assets/corpus/README.md`` for provenance and licences):
  * ``assets/corpus/{train,validation}.txt.gz``: KJV chapters + WordNet synsets, one per line.
  * ``assets/wordnet_gloss/{train,validation}.jsonl.gz``: define-the-word seq2seq task.
  * ``assets/heldout/python_docs.txt.gz``: a second held-out set (Python reference-manual prose; never
    trained on), split ``python_docs`` of ``gqa_span_corruption``.
  * ``assets/vocab/spm.model``: 4000-piece SentencePiece unigram model (pad=0, eos=1,
    unk=2, no bos); ``bundled_vocabulary()`` adds 100 sentinel extra ids on top.

Tasks registered by ``register_tasks()`` (run at import): ``gqa_span_corruption`` and
``gqa_wordnet_gloss``.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import pathlib
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from gqa_uptrain.jsonl import is_jsonl
from gqa_uptrain.tf_quiet import seqio, tf  # noqa: E402  (TF/seqio imported without start-up noise)

ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
VOCAB_PATH = ASSETS_DIR / "vocab" / "spm.model"
CORPUS_FILES = {split: ASSETS_DIR / "corpus" / f"{split}.txt.gz" for split in ("train", "validation")}
WORDNET_GLOSS_FILES = {
    split: ASSETS_DIR / "wordnet_gloss" / f"{split}.jsonl.gz" for split in ("train", "validation")
}
# Second held-out set (scripts/build_heldout_docs.py): Python reference-manual prose, another register than the
# corpus, registered as extra splits of the span-corruption task so that every eval can be repeated on it.
HELDOUT_FILES = {"python_docs": ASSETS_DIR / "heldout" / "python_docs.txt.gz"}
DEFAULT_EXTRA_IDS = 100
PAD_ID, EOS_ID = 0, 1  # the bundled vocabulary's (and T5's) padding and end-of-sequence ids

SPAN_CORRUPTION_TASK = "gqa_span_corruption"
WORDNET_GLOSS_TASK = "gqa_wordnet_gloss"
# Seed of the validation set's preprocessing noise (span corruption's random spans and chunks). Fixed and
# independent of any training seed, so the trainer's periodic eval, `gqa-uptrain eval` and `convert --compare`
# score the same corrupted examples for every run.
VALIDATION_SEED = 0

PathLike = Union[str, os.PathLike]
Files = Union[PathLike, Sequence[PathLike]]


# ================================================================== vocabulary


@functools.lru_cache(maxsize=None)
def bundled_vocabulary(extra_ids: int = DEFAULT_EXTRA_IDS) -> seqio.SentencePieceVocabulary:
    """The bundled SentencePiece vocabulary with ``extra_ids`` sentinels appended.

    Ids: 0 pad, 1 eos, 2 unk, 3..3999 pieces, then the extra ids; T5 numbering puts
    ``<extra_id_0>`` at ``vocab_size - 1``.
    """
    if not VOCAB_PATH.exists():
        raise ValueError(f"bundled vocabulary not found: {VOCAB_PATH} (rebuild with scripts/build_vocab.py)")
    return seqio.SentencePieceVocabulary(str(VOCAB_PATH), extra_ids=extra_ids)


def bundled_vocab_size(extra_ids: int = DEFAULT_EXTRA_IDS) -> int:
    """Size of the bundled vocabulary including extra ids (4100 for the defaults).

    Models may round their embedding table up (e.g. to a multiple of 128); ids at or
    above this size are never produced by the data pipeline.
    """
    return bundled_vocabulary(extra_ids).vocab_size


def fits_bundled_vocabulary(vocab_size: int) -> bool:
    """Whether a model with `vocab_size` embedding rows can read the bundled data (every piece and sentinel)."""
    return vocab_size >= bundled_vocab_size()


def default_output_features(vocabulary: Optional[seqio.Vocabulary] = None) -> dict[str, seqio.Feature]:
    """Encoder-decoder features: both sides get EOS; ``inputs`` is optional (T5 style)."""
    vocabulary = vocabulary or bundled_vocabulary()
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }


# ================================================================ span corruption


def _round_half_even_f32(x: float) -> int:
    # Same arithmetic as tf.round(tf.cast(., tf.float32)) in the noise mask, so the
    # length bookkeeping below agrees exactly with what the mask realises.
    return int(np.round(np.float32(x)))


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) that ``random_spans_noise_mask`` uses.

    T5's computation: noise = round(length * density) clipped to [1, length - 1]
    (length taken as at least 2), spans = round(noise / mean_span_length), at least 1.
    Additionally spans <= number of non-noise tokens, so that no span is empty; this only
    differs from T5 in degenerate cases (density > 0.5 with short spans).
    """
    length = max(length, 2)
    num_noise = min(max(_round_half_even_f32(np.float32(length) * np.float32(noise_density)), 1), length - 1)
    num_spans = _round_half_even_f32(np.float32(num_noise) / np.float32(mean_noise_span_length))
    num_spans = max(1, min(num_spans, num_noise, length - num_noise))
    return num_noise, num_spans


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Uniformly random composition of ``num_items`` into ``num_segments`` positive parts.

    Picks ``num_segments - 1`` distinct cut points among the ``num_items - 1`` gaps.
    Returns int32 [num_segments] lengths summing to ``num_items``.
    """
    gaps = tf.random.stateless_uniform([num_items - 1], seed=seed)
    cuts = tf.sort(tf.argsort(gaps)[: num_segments - 1] + 1)
    bounds = tf.concat([[0], tf.cast(cuts, tf.int32), [num_items]], axis=0)
    return bounds[1:] - bounds[:-1]


def random_spans_noise_mask(
    length: tf.Tensor, noise_density: float, mean_noise_span_length: float, seeds: Sequence[tf.Tensor]
) -> tf.Tensor:
    """T5 noise mask: alternating non-noise / noise spans, starting with non-noise.

    Args:
      length: int32 scalar, number of tokens.
      noise_density: fraction of tokens to corrupt.
      mean_noise_span_length: average noise span length.
      seeds: two stateless seeds (each int32/int64 [2]): noise / non-noise segmentation.

    Returns:
      bool [length], True where the token is noise. Exactly ``noise_counts(length)``
      noise tokens in that many spans (for ``length >= 2``).
    """
    length = tf.convert_to_tensor(length, tf.int32)
    orig_length = length
    length = tf.maximum(length, 2)  # a 1-token sequence still needs 1 noise + 1 non-noise
    lf = tf.cast(length, tf.float32)
    num_noise = tf.cast(tf.round(lf * noise_density), tf.int32)
    num_noise = tf.clip_by_value(num_noise, 1, length - 1)
    num_nonnoise = length - num_noise
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
    num_spans = tf.maximum(1, tf.minimum(num_spans, tf.minimum(num_noise, num_nonnoise)))
    noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
    nonnoise_lengths = _random_segmentation(num_nonnoise, num_spans, seeds[1])
    # [nonnoise_0, noise_0, nonnoise_1, noise_1, ...]; span index of each position via
    # the span end offsets; odd span index = noise.
    interleaved = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [-1])
    span_ends = tf.cumsum(interleaved)
    span_of_position = tf.searchsorted(span_ends, tf.range(length), side="right")
    is_noise = tf.equal(span_of_position % 2, 1)
    return is_noise[:orig_length]


def noise_span_to_unique_sentinel(tokens: tf.Tensor, noise_mask: tf.Tensor, vocab_size: int) -> tf.Tensor:
    """Replaces each run of masked tokens by one sentinel; k-th run -> vocab_size - 1 - k.

    Args: tokens int32 [n]; noise_mask bool [n]. Returns int32 [m], m <= n.
    """
    prev_noise = tf.pad(noise_mask[:-1], [[1, 0]])
    first_noise = tf.logical_and(noise_mask, tf.logical_not(prev_noise))
    later_noise = tf.logical_and(noise_mask, prev_noise)
    span_number = tf.cumsum(tf.cast(first_noise, tokens.dtype))  # 1 for the first span
    with_sentinels = tf.where(first_noise, tf.cast(vocab_size, tokens.dtype) - span_number, tokens)
    return tf.boolean_mask(with_sentinels, tf.logical_not(later_noise))


def nonnoise_span_to_unique_sentinel(tokens: tf.Tensor, noise_mask: tf.Tensor, vocab_size: int) -> tf.Tensor:
    """Targets side: the noise spans kept, each preceded by its sentinel."""
    return noise_span_to_unique_sentinel(tokens, tf.logical_not(noise_mask), vocab_size)


def span_corruption_lengths(
    inputs_length: int,
    targets_length: Optional[int] = None,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> tuple[int, int, int]:
    """Longest raw token segment whose corruption (+ EOS) fits the requested lengths.

    Like T5's ``random_spans_helper`` (one sentinel per span on each side, one EOS on
    each side), but also honours ``targets_length`` when given, so that neither side is
    ever truncated. Both corrupted lengths are non-decreasing in the raw length, so
    shorter segments (the tail of a split) fit too.

    Returns:
      (tokens_length, inputs_length_with_eos, targets_length_with_eos) for that segment.
      For inputs 512 and targets >= 114 this is T5's (568, 512, 114).
    """

    def corrupted(n):
        noise, spans = noise_counts(n, noise_density, mean_noise_span_length)
        return n - noise + spans + 1, noise + spans + 1

    def fits(n):
        i, t = corrupted(n)
        return i <= inputs_length and (targets_length is None or t <= targets_length)

    if not fits(1):
        raise ValueError(
            f"span corruption cannot fit even one token into inputs_length="
            f"{inputs_length}, targets_length={targets_length}"
        )
    n = 1
    while fits(n + 1):
        n += 1
    return (n, *corrupted(n))


@seqio.map_over_dataset(num_seeds=1)
def _random_chunk(features, seed, feature_key: str, max_length: int):
    tokens = features[feature_key]
    n = tf.size(tokens)
    num_chunks = (n + max_length - 1) // max_length
    start = max_length * tf.random.stateless_uniform(
        [], seed=seed, minval=0, maxval=num_chunks, dtype=tf.int32
    )
    return {feature_key: tokens[start : tf.minimum(start + max_length, n)]}


def select_random_chunk(
    dataset: tf.data.Dataset, feature_key: str = "targets", max_length: int = 65536
) -> tf.data.Dataset:
    """Drops empty documents; keeps one random ``max_length``-aligned chunk of long ones.

    Output: {feature_key: int32 [<= max_length]} (other features are dropped).
    """
    dataset = dataset.filter(lambda ex: tf.size(ex[feature_key]) > 0)
    return _random_chunk(dataset, feature_key=feature_key, max_length=max_length)


def reduce_concat_tokens(
    dataset: tf.data.Dataset, feature_key: str = "targets", batch_size: int = 128
) -> tf.data.Dataset:
    """Concatenates every ``batch_size`` consecutive documents into one token sequence.

    Short documents (e.g. WordNet glosses) then fill whole training segments.
    """
    dataset = dataset.map(lambda ex: {feature_key: ex[feature_key]})
    dataset = dataset.ragged_batch(batch_size)
    return dataset.map(lambda ex: {feature_key: ex[feature_key].flat_values})


def split_tokens(
    dataset: tf.data.Dataset, max_tokens_per_segment: int, feature_key: str = "targets"
) -> tf.data.Dataset:
    """Cuts each sequence into consecutive segments of ``max_tokens_per_segment``.

    Only the last segment of a sequence may be shorter. Output: int32 [<= max].
    """
    seg = max_tokens_per_segment

    def to_segments(ex):
        tokens = ex[feature_key]
        n = tf.size(tokens)
        num_segments = (n + seg - 1) // seg
        padded = tf.pad(tokens, [[0, num_segments * seg - n]])
        rows = tf.reshape(padded, [num_segments, seg])
        lengths = tf.minimum(seg, n - tf.range(num_segments) * seg)
        return tf.data.Dataset.from_tensor_slices((rows, lengths))

    return dataset.flat_map(to_segments).map(lambda row, n: {feature_key: row[:n]})


@seqio.map_over_dataset(num_seeds=2)
def _corrupt_spans(features, seeds, noise_density: float, mean_noise_span_length: float, vocab_size: int):
    tokens = features["targets"]
    mask = random_spans_noise_mask(tf.size(tokens), noise_density, mean_noise_span_length, seeds)
    return {
        "inputs": noise_span_to_unique_sentinel(tokens, mask, vocab_size),
        "targets": nonnoise_span_to_unique_sentinel(tokens, mask, vocab_size),
    }


def span_corruption(
    dataset: tf.data.Dataset,
    sequence_length: Mapping[str, int],
    output_features: Mapping[str, seqio.Feature],
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    seed: Optional[int] = None,
) -> tf.data.Dataset:
    """T5 span-corruption preprocessor (seqio post-tokenisation, pre-EOS).

    Pipeline: select_random_chunk -> reduce_concat_tokens(128) -> split_tokens(L) ->
    noise mask + sentinels, with L from ``span_corruption_lengths`` so that, after
    ``seqio.preprocessors.append_eos_after_trim``, inputs/targets fit the requested lengths.

    Args:
      dataset: examples with ``"targets"``: int32 [n] token ids (no EOS).
      sequence_length: needs ``"inputs"``; ``"targets"`` is honoured when present.
      output_features: ``output_features["targets"].vocabulary`` supplies the sentinels
        (sentinel k = vocab_size - 1 - k, i.e. ``<extra_id_k>``).
      seed: if given, fixes the random seeds here (otherwise seqio's ``seed`` argument of
        ``Task.get_dataset`` does, via ``seqio.map_over_dataset`` seeds).

    Returns:
      examples {"inputs": int32 [<= inputs_length - 1], "targets": int32
      [<= targets_length - 1]}.
    """
    if not sequence_length or sequence_length.get("inputs") is None:
        raise ValueError(f"span_corruption needs sequence_length['inputs'], got {sequence_length!r}")
    vocabulary = output_features["targets"].vocabulary
    tokens_length, _, _ = span_corruption_lengths(
        sequence_length["inputs"], sequence_length.get("targets"), noise_density, mean_noise_span_length
    )
    _, max_spans = noise_counts(tokens_length, noise_density, mean_noise_span_length)
    extra_ids = getattr(vocabulary, "extra_ids", None)
    if extra_ids is not None and max_spans > extra_ids:
        raise ValueError(
            f"segments of {tokens_length} tokens get up to {max_spans} noise spans"
            f" but the vocabulary has only {extra_ids} extra ids for sentinels"
        )
    ctx = seqio.utils.map_seed_manager(seed) if seed is not None else contextlib.nullcontext()
    with ctx:
        dataset = select_random_chunk(dataset, feature_key="targets", max_length=65536)
        dataset = reduce_concat_tokens(dataset, feature_key="targets", batch_size=128)
        dataset = split_tokens(dataset, tokens_length, feature_key="targets")
        dataset = _corrupt_spans(
            dataset,
            noise_density=noise_density,
            mean_noise_span_length=mean_noise_span_length,
            vocab_size=vocabulary.vocab_size,
        )
    return dataset


# ==================================================================== sources


def _resolve_files(files: Files, what: str) -> list[str]:
    """Expands paths/globs; ValueError naming the path when nothing matches."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    out = []
    for pattern in files:
        pattern = os.fspath(pattern)
        matches = (
            sorted(glob.glob(pattern))
            if glob.has_magic(pattern)
            else ([pattern] if os.path.isfile(pattern) else [])
        )
        if not matches:
            raise ValueError(f"{what}: file not found: {pattern}")
        out.extend(matches)
    if not out:
        raise ValueError(f"{what}: no files given")
    kinds = {is_jsonl(f) for f in out}
    if len(kinds) > 1:
        raise ValueError(f"{what}: mixes JSONL and plain-text files: {out}")
    return out


class LineFileDataSource(seqio.FileDataSource):
    """Plain-text (``{"text": line}``) or JSONL (selected string fields) files, gz or not.

    Compression is picked per file from the ``.gz`` suffix. Each split is a list of
    files, so seqio can shard by file (or by example when there are fewer files than
    shards).
    """

    def __init__(
        self,
        split_to_files: Mapping[str, Sequence[str]],
        fields: Optional[Sequence[str]] = None,
        text_field: str = "text",
    ):
        """``fields``: JSONL keys to keep (all strings); ``text_field``: plain-text key."""
        self._fields = tuple(fields or (text_field,))
        self._text_field = text_field
        jsonl = {is_jsonl(f) for files in split_to_files.values() for f in files}
        self._jsonl = jsonl == {True}

        def read_file_fn(path):
            compression = tf.where(tf.strings.regex_full_match(path, r".*\.gz"), "GZIP", "")
            lines = tf.data.TextLineDataset(path, compression_type=compression).enumerate(start=1)
            lines = lines.filter(lambda _, s: tf.strings.length(tf.strings.strip(s)) > 0)
            if self._jsonl:
                return lines.map(lambda lineno, s: self._parse_jsonl(path, lineno, s))
            return lines.map(lambda _, s: {self._text_field: s})

        super().__init__(
            read_file_fn=read_file_fn, split_to_filepattern={k: list(v) for k, v in split_to_files.items()}
        )

    def list_shards(self, split: str) -> Sequence[str]:
        # Paths are already resolved; avoid re-globbing names that contain glob characters.
        return list(self._split_to_filepattern[split])

    def _parse_jsonl(self, path, lineno, line):
        fields = self._fields

        def parse(path, lineno, raw):
            from gqa_uptrain.jsonl import parse_record
            where = f"{path.numpy().decode()}:{int(lineno)}"
            obj = parse_record(raw.numpy().decode("utf-8"), where, fields)
            return [str(obj[f]) for f in fields]

        values = tf.py_function(parse, [path, lineno, line], [tf.string] * len(fields))
        return {f: tf.ensure_shape(v, []) for f, v in zip(fields, values, strict=True)}


# ====================================================================== tasks


def _span_corruption_preprocessors(text_field: str = "text"):
    return [
        functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_field}),
        seqio.preprocessors.tokenize,
        seqio.CacheDatasetPlaceholder(),
        span_corruption,
        seqio.preprocessors.append_eos_after_trim,
    ]


def register_text_file_task(
    name: str,
    train_files: Files,
    validation_files: Optional[Files] = None,
    *,
    vocabulary: Optional[seqio.Vocabulary] = None,
    text_field: str = "text",
    overwrite: bool = False,
    extra_splits: Optional[Mapping[str, Files]] = None,
) -> seqio.Task:
    """Registers a span-corruption Task over your own text files.

    Files (paths or globs; ``.gz`` allowed): plain text, one document per line, or JSONL
    (``.jsonl``/``.json``) with the document in ``text_field``. Splits ``train`` and, if
    given, ``validation`` and each of ``extra_splits`` (name -> files; e.g. more held-out sets).

    Raises:
      ValueError: a file is missing (the message names it), or ``name`` is taken and
        ``overwrite`` is False.
    """
    splits = {"train": _resolve_files(train_files, f"task {name!r} train")}
    if validation_files is not None:
        splits["validation"] = _resolve_files(validation_files, f"task {name!r} validation")
    for split, files in (extra_splits or {}).items():
        if split in splits:
            raise ValueError(f"task {name!r}: extra split {split!r} clashes with a standard split")
        splits[split] = _resolve_files(files, f"task {name!r} {split}")
    return _add_span_corruption_task(name, LineFileDataSource(splits, text_field=text_field), vocabulary,
                                     text_field, overwrite)


def _add_span_corruption_task(name: str, source: seqio.DataSource, vocabulary: Optional[seqio.Vocabulary],
                              text_field: str, overwrite: bool) -> seqio.Task:
    if name in seqio.TaskRegistry.names():
        if not overwrite:
            raise ValueError(f"task {name!r} is already registered (pass overwrite=True)")
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=_span_corruption_preprocessors(text_field),
        output_features=default_output_features(vocabulary),
        metric_fns=[],
    )


def register_tfds_span_corruption(
    name: str,
    tfds_name: str = "c4/en:3.1.0",
    data_dir: Optional[str] = None,
    *,
    vocabulary: Optional[seqio.Vocabulary] = None,
    text_field: str = "text",
    overwrite: bool = False,
) -> seqio.Task:
    """Registers span corruption over a TFDS dataset already prepared under ``data_dir``.

    Never downloads or prepares data (``read_only``); reading fails if it is not there.
    """
    try:
        import tensorflow_datasets  # noqa: F401  (seqio.TfdsDataSource needs it at read time)
    except ImportError as e:
        raise ImportError(
            "register_tfds_span_corruption needs tensorflow-datasets (pip install tensorflow-datasets)"
        ) from e
    if data_dir is not None and not os.path.isdir(data_dir):
        raise ValueError(f"TFDS data_dir not found: {data_dir}")
    source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=data_dir, read_only=True)
    return _add_span_corruption_task(name, source, vocabulary, text_field, overwrite)


def register_tasks() -> None:
    """Registers the bundled tasks (idempotent: already-registered names are kept)."""
    names = seqio.TaskRegistry.names()
    if SPAN_CORRUPTION_TASK not in names:
        register_text_file_task(SPAN_CORRUPTION_TASK, CORPUS_FILES["train"], CORPUS_FILES["validation"],
                                extra_splits=HELDOUT_FILES)
    if WORDNET_GLOSS_TASK not in names:
        splits = {
            split: _resolve_files(path, f"task {WORDNET_GLOSS_TASK!r} {split}")
            for split, path in WORDNET_GLOSS_FILES.items()
        }
        vocabulary = bundled_vocabulary()
        seqio.TaskRegistry.add(
            WORDNET_GLOSS_TASK,
            source=LineFileDataSource(splits, fields=("inputs", "targets")),
            preprocessors=[
                seqio.preprocessors.tokenize,
                seqio.CacheDatasetPlaceholder(),
                seqio.preprocessors.append_eos_after_trim,
            ],
            output_features={
                "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
                "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
            },
            metric_fns=[],
        )


def fixed_validation_examples(
    task_name: str,
    sequence_length: Mapping[str, int],
    num_examples: int,
    seed: int = VALIDATION_SEED,
    split: str = "validation",
) -> list[dict[str, np.ndarray]]:
    """The first ``num_examples`` examples of a task's split, with noise fixed by ``seed``.

    No shuffling and fixed map seeds, so every call returns the same corrupted examples
    (for evaluation across checkpoints). Returns dicts of int32 [len] numpy arrays
    (EOS included, unpadded); string features (``*_pretokenized``) come back as ``str``.
    """
    task = seqio.get_mixture_or_task(task_name)
    ds = task.get_dataset(
        sequence_length=dict(sequence_length),
        split=split,
        shuffle=False,
        seed=seed,
        num_epochs=1,
        try_in_mem_cache=False,
    )
    return [
        {k: v.decode("utf-8") if isinstance(v, bytes) else np.asarray(v) for k, v in ex.items()}
        for ex in ds.take(num_examples).as_numpy_iterator()
    ]


register_tasks()

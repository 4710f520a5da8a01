"""Small fixed token batches held in memory: the calibration data of the `align` / `svd` conversions and the held-out
batch of `convert --compare`.

A spec names the data: 'bundled' (span corruption on the bundled corpus; needs a model that reads the bundled
vocabulary), 'random' (uniform random tokens), a JSONL file with 'inputs' / 'targets' (text or token-id lists), a
text file (one example per line, inputs = targets), or 'auto' (bundled if the vocabulary fits, else random).
Text is tokenised with the bundled SentencePiece model (or `vocab`) and ends with EOS, as seqio's features do.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from gqa_uptrain.errors import UserError

# encoder tokens [n, inputs_length], decoder input tokens [n, targets_length], decoder targets [n, targets_length]
TokenBatch = tuple[np.ndarray, np.ndarray, np.ndarray]
Pair = tuple[list[int], list[int]]


def pad_rows(rows: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """int32 [len(rows), length]: each row truncated to `length` and right-padded with 0."""
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        r = list(r)[:length]
        out[i, :len(r)] = r
    return out


def teacher_forced(pairs: Sequence[Pair], inputs_length: int, targets_length: int) -> TokenBatch:
    """[(inputs, targets)] -> encoder tokens, decoder inputs (targets shifted right after a 0) and targets."""
    enc = pad_rows([p[0] for p in pairs], inputs_length)
    tgt = pad_rows([p[1] for p in pairs], targets_length)
    dec_in = np.concatenate([np.zeros((len(pairs), 1), np.int32), tgt[:, :-1]], axis=1)
    return enc, dec_in, tgt


def read_pairs(path: str, n: int, vocab_size: int, vocab: str | None = None) -> list[Pair]:
    """The first `n` examples of a JSONL file ('inputs' / 'targets': text or token-id lists) or a text file (one
    example per line, used as both inputs and targets); token ids must lie in [0, vocab_size)."""
    from gqa_uptrain import jsonl
    tokenizer = None

    def ids(x: Any, where: str, what: str) -> list[int]:
        nonlocal tokenizer
        if isinstance(x, list):
            toks = [int(t) for t in x]
        elif isinstance(x, str):
            if tokenizer is None:
                import sentencepiece

                from gqa_uptrain import data
                sp = sentencepiece.SentencePieceProcessor(model_file=str(vocab or data.VOCAB_PATH))
                tokenizer = lambda text: sp.encode(text) + [data.EOS_ID]  # noqa: E731
            toks = tokenizer(x)
        else:
            raise UserError(f"{where}: {what} must be a string or a list of token ids")
        bad = [t for t in toks if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"{where}: token id {bad[0]} outside the model vocabulary [0, {vocab_size})")
        return toks

    pairs = []
    if jsonl.is_jsonl(path):
        records = jsonl.read_jsonl(path, ("inputs", "targets"), what="data file")
        examples = ((ids(d["inputs"], w, "inputs"), ids(d["targets"], w, "targets")) for w, d in records)
    else:
        examples = ((t, t) for t in (ids(line, f"{path}:{i}", "line")
                                     for i, line in jsonl.read_lines(path, what="data file")))
    for pair in examples:
        pairs.append(pair)
        if len(pairs) >= n:
            break
    if not pairs:
        raise UserError(f"{path} holds no examples")
    return pairs


def span_corruption_pairs(split: str, n: int, length: int, seed: int) -> list[Pair]:
    """`n` span-corruption examples of the bundled corpus (inputs `length`, targets `length // 4` tokens)."""
    from gqa_uptrain import data
    examples = data.fixed_validation_examples(data.SPAN_CORRUPTION_TASK, {"inputs": length, "targets": length // 4},
                                              n, seed=seed, split=split)
    return [(list(e["inputs"]), list(e["targets"])) for e in examples]


def bundled_fits(vocab_size: int) -> bool:
    from gqa_uptrain import data
    return data.fits_bundled_vocabulary(vocab_size)


def token_batch(spec: str, vocab_size: int, n: int, length: int, seed: int = 0, split: str = "train",
                vocab: str | None = None) -> tuple[TokenBatch, str]:
    """(batch, the spec it resolved to) for a spec (see the module docstring). Bundled and random batches have
    inputs of `length` tokens and targets of `length // 4`; a file's are as long as its longest example (+1 for
    the target shift)."""
    if spec == "auto":
        spec = "bundled" if bundled_fits(vocab_size) else "random"
    if spec == "bundled":
        if not bundled_fits(vocab_size):
            from gqa_uptrain import data
            raise UserError(f"the bundled data needs vocab_size >= {data.bundled_vocab_size()}, the source has "
                            f"{vocab_size}; pass a data file or 'random'")
        return teacher_forced(span_corruption_pairs(split, n, length, seed), length, length // 4), spec
    if spec == "random":
        r = np.random.RandomState(seed)
        enc = r.randint(2, vocab_size, size=(n, length)).astype(np.int32)
        tgt = r.randint(2, vocab_size, size=(n, length // 4)).astype(np.int32)
        return teacher_forced(list(zip(enc.tolist(), tgt.tolist())), length, length // 4), spec
    pairs = read_pairs(spec, n, vocab_size, vocab)
    return teacher_forced(pairs, max(len(p[0]) for p in pairs), max(len(p[1]) for p in pairs) + 1), spec

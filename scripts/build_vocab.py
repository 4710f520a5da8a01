#!/usr/bin/env python3
"""Train the bundled SentencePiece unigram vocabulary on the bundled train corpus.

T5 conventions: pad=0, eos=1, unk=2, no bos. The 100 T5 sentinels (<extra_id_k>) are
*not* in the model; seqio.SentencePieceVocabulary appends them as extra ids.

    python scripts/build_vocab.py                 # gqa_uptrain/assets/vocab/spm.model
    python scripts/build_vocab.py --vocab_size 8000 --byte_fallback --out /tmp/spm.model

Deterministic: one trainer thread, fixed random seed, input sentences fed in file order.
"""

from __future__ import annotations

import argparse
import gzip
import pathlib
import re
import sys
import tempfile

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

ASSETS = pathlib.Path(__file__).resolve().parent.parent / "gqa_uptrain" / "assets"

# SentencePiece skips training lines longer than max_sentence_length bytes, and a KJV
# chapter is a single long line, so documents are cut into sentences first.
_SENT_SPLIT = re.compile(r"(?<=[.;:?!])\s+")


def sentences(path: pathlib.Path, max_chars: int = 2000):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for doc in f:
            for sent in _SENT_SPLIT.split(doc.strip()):
                if sent:
                    yield sent[:max_chars]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=pathlib.Path, default=ASSETS / "corpus" / "train.txt.gz")
    p.add_argument("--out", type=pathlib.Path, default=ASSETS / "vocab" / "spm.model")
    p.add_argument(
        "--vocab_size", type=int, default=4000, help="pieces in the model, excluding the extra ids seqio adds"
    )
    p.add_argument(
        "--byte_fallback", action="store_true", help="encode unknown characters as bytes instead of <unk>"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    spm.set_random_generator_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(pathlib.Path(tmp) / "spm")
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(args.corpus),
            model_prefix=prefix,
            model_type="unigram",
            vocab_size=args.vocab_size,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            pad_piece="<pad>",
            eos_piece="</s>",
            unk_piece="<unk>",
            character_coverage=1.0,  # ~80 distinct ASCII characters; keep all (0.9995 drops "!")
            byte_fallback=args.byte_fallback,
            num_threads=1,  # multi-threaded EM is not bit-reproducible
            shuffle_input_sentence=False,
            input_sentence_size=0,  # use every sentence; the corpus is small
            max_sentence_length=8192,
            minloglevel=2,
        )
        # The trainer records its (temporary) model_prefix in the proto; store a fixed
        # value so that rebuilding gives byte-identical files.
        proto = sp_pb2.ModelProto()
        proto.ParseFromString(pathlib.Path(prefix + ".model").read_bytes())
        proto.trainer_spec.model_prefix = "spm"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_bytes(proto.SerializeToString())
    sp = spm.SentencePieceProcessor(model_file=str(args.out))
    print(
        f"wrote {args.out} ({args.out.stat().st_size} bytes, {sp.get_piece_size()} pieces)", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

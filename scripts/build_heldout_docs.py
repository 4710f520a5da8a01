#!/usr/bin/env python3
"""Build the second held-out set: English prose from the Python documentation, outside the bundled corpus.

The bundled corpus (scripts/build_corpus.py) is the King James Bible plus WordNet glosses. A loss measured only
on its validation split could reward a conversion that fits that one distribution; this set is technical prose
of another register and vocabulary, never seen in pre-training or uptraining, used only for evaluation.

Source: ``pydoc_data.topics`` of the Python standard library (the reference-manual topics that ``help()``
prints; Python Software Foundation License Version 2, permissive). Kept: prose paragraphs only (indented code
blocks, doctests, grammar productions, headings and tables are dropped; a paragraph several topics share is
used once), each paragraph's lines joined by spaces;
consecutive paragraphs of one topic are merged until a document has at least ``--min_words`` words; documents
are ordered by the md5 of their text and the first ``--max_documents`` kept.

Output: ``gqa_uptrain/assets/heldout/python_docs.txt.gz`` (one document per line, gzip with mtime 0 and no file
name, so a rebuild from the same Python version gives identical bytes). It is registered as split
``python_docs`` of the ``gqa_span_corruption`` task (gqa_uptrain/data.py):
    gqa-uptrain eval --checkpoint DIR --task gqa_span_corruption --split python_docs
"""
from __future__ import annotations

import argparse
import hashlib
import pathlib
import platform
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from build_corpus import write_gz_lines  # noqa: E402  (same byte-reproducible gzip writer)

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent.parent / "gqa_uptrain" / "assets" / "heldout" / \
    "python_docs.txt.gz"
_HEADING_RULE = re.compile(r"^[*=\-~^]{3,}$")


def prose_paragraphs(text: str) -> list[str]:
    """The paragraphs of one topic that are running prose, each on one line."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(ln.startswith((" ", "\t", ">>>", "...")) for ln in lines):  # code, grammar, doctests, tables
            continue
        if len(lines) > 1 and _HEADING_RULE.match(lines[-1].strip()):  # "Title\n*****"
            continue
        para = " ".join(ln.strip() for ln in lines if ln.strip())
        if len(para.split()) >= 8 and not para.endswith(":"):  # a lead-in to a dropped example is kept only
            out.append(para)                                   # when it is a sentence of its own
    return out


def documents(topics: dict[str, str], min_words: int) -> list[str]:
    """Documents of >= min_words words; a paragraph that several topics share is used once (first topic)."""
    docs, seen = [], set()
    for name in sorted(topics):
        cur: list[str] = []
        for para in prose_paragraphs(topics[name]):
            if para in seen:
                continue
            seen.add(para)
            cur.append(para)
            if sum(len(p.split()) for p in cur) >= min_words:
                docs.append(" ".join(cur))
                cur = []
        if cur and sum(len(p.split()) for p in cur) >= min_words // 2:
            docs.append(" ".join(cur))
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    ap.add_argument("--min_words", type=int, default=60)
    ap.add_argument("--max_documents", type=int, default=600)
    args = ap.parse_args()
    import pydoc_data.topics
    docs = documents(pydoc_data.topics.topics, args.min_words)
    docs = sorted(docs, key=lambda d: hashlib.md5(d.encode("utf-8")).hexdigest())[: args.max_documents]
    write_gz_lines(args.out, docs)
    words = sum(len(d.split()) for d in docs)
    print(f"wrote {args.out}: {len(docs)} documents, {words} words, {args.out.stat().st_size} bytes "
          f"(Python {platform.python_version()} pydoc_data.topics)")


if __name__ == "__main__":
    main()

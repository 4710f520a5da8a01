#!/usr/bin/env python3
"""Build the small bundled English corpus and the WordNet gloss seq2seq task.

Sources (Debian packages, installable on a fresh machine):

    apt-get update && apt-get install -y --no-install-recommends \
        wordnet-base bible-kjv-text bible-kjv

* ``bible-kjv-text`` holds the King James Version (public domain) in a compressed
  binary format; ``bible-kjv`` provides the ``bible`` program that prints it.
* ``wordnet-base`` holds the WordNet 3.0 database (``/usr/share/wordnet/data.*``),
  under the WordNet 3.0 licence (permissive, notice must be kept).

Outputs (under ``gqa_uptrain/assets`` by default):

* ``corpus/{train,validation}.txt.gz``: one document per line. A KJV document is a
  chapter (verses joined by spaces); a WordNet document is one synset rendered as
  ``lemma, lemma (pos): definition. Example. Example.``. All synsets with usage
  examples are kept, and a hashed 10% of those without (to stay under ~3.5 MB). Lines are
  ordered by hash so that the two sources are interleaved. Documents are assigned to
  validation when md5("<source>:<key>") mod 1000 < 50 (~5%), so the split is stable
  across rebuilds and independent of ordering.
* ``wordnet_gloss/{train,validation}.jsonl.gz``: ``{"inputs": "define: <word>:
  <example sentence>", "targets": "<definition>"}``. Words are split by hash, so no
  word occurs in both splits. The synsets behind validation gloss examples are moved
  to the corpus *validation* split so that pre-training never sees their definitions.

All gzip files are written with mtime=0 and no file name, so rebuilding on the same
package versions reproduces identical bytes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import pathlib
import re
import subprocess
import sys

WORDNET_DIR = pathlib.Path("/usr/share/wordnet")
POS_FILES = {"noun": "data.noun", "verb": "data.verb", "adj": "data.adj", "adv": "data.adv"}
POS_TAG = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent.parent / "gqa_uptrain" / "assets"


def bucket(key: str) -> int:
    """Stable hash bucket in [0, 1000) (Python's hash() is salted per process)."""
    return int(hashlib.md5(key.encode("utf-8")).hexdigest()[:8], 16) % 1000


def write_gz_lines(path: pathlib.Path, lines) -> None:
    """Writes lines to a gzip file with fixed header fields for byte-reproducibility."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        for line in lines:
            f.write(line.encode("utf-8") + b"\n")
    path.write_bytes(buf.getvalue())


def package_version(pkg: str) -> str:
    out = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or "unknown"


# ----------------------------------------------------------------------------- KJV


def kjv_chapters(bible_cmd: str = "bible"):
    """Yields (key, text) per KJV chapter, e.g. ("Genesis 1", "In the beginning ...")."""
    # -l with a huge width disables the program's line wrapping: one verse per line.
    out = subprocess.run(
        [bible_cmd, "-l1000000", "gen1:1-rev22:21"], capture_output=True, text=True, check=True
    ).stdout
    header = re.compile(r"^(\S.*) (\d+)$")
    verse = re.compile(r"^\s+(\d+) (.*)$")
    key, verses = None, []
    for line in out.splitlines():
        if not line.strip():
            continue
        m = verse.match(line)
        if m:
            verses.append(m.group(2).strip())
            continue
        m = header.match(line)
        if not m:
            raise ValueError(f"unexpected line in bible output: {line!r}")
        if key is not None:
            yield key, " ".join(verses)
        key, verses = line.strip(), []
    if key is not None:
        yield key, " ".join(verses)


# ------------------------------------------------------------------------- WordNet


def _clean_lemma(word: str) -> str:
    # Adjective lemmas carry syntactic markers such as "(a)", "(p)", "(ip)".
    return re.sub(r"\([a-z]+\)$", "", word).replace("_", " ")


def wordnet_synsets(wordnet_dir: pathlib.Path = WORDNET_DIR):
    """Yields dicts {key, pos, lemmas, definition, examples} for every synset."""
    for pos, fname in POS_FILES.items():
        with open(wordnet_dir / fname, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):  # licence header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                offset, w_cnt = fields[0], int(fields[3], 16)
                lemmas = []
                for i in range(w_cnt):
                    lemma = _clean_lemma(fields[4 + 2 * i])
                    if lemma not in lemmas:
                        lemmas.append(lemma)
                gloss = gloss.strip()
                q = gloss.find('"')
                definition = (gloss if q < 0 else gloss[:q]).strip().rstrip(";").strip()
                examples = [] if q < 0 else [e.strip() for e in re.findall(r'"([^"]+)"', gloss[q:])]
                examples = [e for e in examples if e]
                if not definition:
                    continue
                yield {
                    "key": f"{pos}:{offset}",
                    "pos": pos,
                    "lemmas": lemmas,
                    "definition": definition,
                    "examples": examples,
                }


def _sentence(s: str) -> str:
    s = s.strip()
    return s if s[-1:] in ".?!" else s + "."


def synset_document(s: dict) -> str:
    head = ", ".join(s["lemmas"]) + f" ({POS_TAG[s['pos']]})"
    body = " ".join([_sentence(s["definition"])] + [_sentence(e) for e in s["examples"]])
    return f"{head}: {body}"


def _find_word(example: str, lemma: str) -> bool:
    """True when the example contains the lemma, allowing simple inflection.

    "glare" matches "glared", "try" matches "tried" (stem minus a final e/y for words of
    four or more letters). Good enough to pick examples that actually use the word.
    """
    low, lem = example.lower(), lemma.lower()
    stems = {lem}
    if len(lem) >= 4 and lem[-1] in "ey":
        stems.add(lem[:-1])
    return any(re.search(r"(?<![a-z])" + re.escape(st), low) for st in stems)


def gloss_examples(synsets):
    """Yields (word, synset_key, example dict) for examples that use one of the lemmas."""
    for s in synsets:
        for ex in s["examples"]:
            # Skip fragments and very long quotations; keep ordinary usage sentences.
            if not 3 <= len(ex.split()) <= 40:
                continue
            for lemma in s["lemmas"]:
                if _find_word(ex, lemma):
                    yield lemma, s["key"], {"inputs": f"define: {lemma}: {ex}", "targets": s["definition"]}
                    break


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", type=pathlib.Path, default=DEFAULT_OUT)
    p.add_argument(
        "--validation_permille",
        type=int,
        default=50,
        help="documents with hash bucket below this go to validation (default 5%%)",
    )
    p.add_argument("--gloss_train", type=int, default=5000, help="max gloss train examples")
    p.add_argument("--gloss_validation", type=int, default=500, help="max gloss validation examples")
    p.add_argument(
        "--wordnet_other_permille",
        type=int,
        default=100,
        help="fraction (per mille, by hash) of WordNet synsets *without* usage examples"
        " to keep in the corpus; synsets with examples are always kept. Caps the"
        " committed size (all synsets would be ~5 MB gzipped)",
    )
    p.add_argument("--bible_cmd", default="bible")
    p.add_argument("--wordnet_dir", type=pathlib.Path, default=WORDNET_DIR)
    args = p.parse_args(argv)

    synsets = list(wordnet_synsets(args.wordnet_dir))

    # Gloss task first: its validation synsets must not be in the corpus train split.
    per_split = {"train": [], "validation": []}
    for word, key, ex in gloss_examples(synsets):
        split = "validation" if bucket("word:" + word.lower()) < args.validation_permille else "train"
        per_split[split].append((bucket(f"ex:{key}:{ex['inputs']}"), key, ex))
    limits = {"train": args.gloss_train, "validation": args.gloss_validation}
    held_out_synsets = set()
    for split, rows in per_split.items():
        rows.sort(key=lambda r: (r[0], r[2]["inputs"]))  # deterministic pseudo-random subset
        rows = rows[: limits[split]]
        if split == "validation":
            held_out_synsets.update(r[1] for r in rows)
        write_gz_lines(
            args.out_dir / "wordnet_gloss" / f"{split}.jsonl.gz",
            (json.dumps(r[2], ensure_ascii=False, sort_keys=True) for r in rows),
        )
        print(f"wordnet_gloss/{split}: {len(rows)} examples", file=sys.stderr)

    docs = {"train": [], "validation": []}
    for key, text in kjv_chapters(args.bible_cmd):
        split = "validation" if bucket("kjv:" + key) < args.validation_permille else "train"
        docs[split].append(text)
    for s in synsets:
        if not s["examples"] and bucket("keep:" + s["key"]) >= args.wordnet_other_permille:
            continue
        split = (
            "validation"
            if s["key"] in held_out_synsets or bucket("wordnet:" + s["key"]) < args.validation_permille
            else "train"
        )
        docs[split].append(synset_document(s))
    for split, lines in docs.items():
        # Hash order mixes the two sources: seqio reads files sequentially and shuffles only
        # within a buffer, so a KJV-then-WordNet file would give a very non-iid stream.
        lines.sort(key=lambda text: hashlib.md5(text.encode("utf-8")).hexdigest())
        write_gz_lines(args.out_dir / "corpus" / f"{split}.txt.gz", lines)
        nbytes = (args.out_dir / "corpus" / f"{split}.txt.gz").stat().st_size
        print(
            f"corpus/{split}: {len(lines)} documents, {sum(len(doc.split()) for doc in lines)} words,"
            f" {nbytes} bytes gz",
            file=sys.stderr,
        )
    for pkg in ("wordnet-base", "bible-kjv-text", "bible-kjv"):
        print(f"{pkg}={package_version(pkg)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

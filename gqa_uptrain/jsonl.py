"""Reading the line files users hand us: JSONL records, and the plain lines (text, TSV) they are read as.

The one reader for infer inputs, eval files, convert's calibration / comparison files and the seqio JSONL data
sources. `.gz` files are read transparently; blank lines are skipped; every error is one line naming the file, the
line number and the key or value (`FILE:LINE: ...`).
"""
from __future__ import annotations

import gzip
import json
import pathlib
import sys
import zlib
from typing import Any, Iterator, Sequence

JSONL_SUFFIXES = (".jsonl", ".json")


def is_jsonl(path: str | pathlib.Path) -> bool:
    """Whether a file name says JSONL (.jsonl / .json, optionally .gz)."""
    name = str(path)
    return name.removesuffix(".gz").endswith(JSONL_SUFFIXES)


def read_lines(path: str | pathlib.Path, what: str = "input file") -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of each non-blank line; '-' reads stdin. Missing files, non-UTF-8
    bytes and corrupt gzip data are ValueErrors naming the file (and line)."""
    if str(path) == "-":
        for lineno, line in enumerate(sys.stdin.read().splitlines(), 1):
            if line.strip():
                yield lineno, line
        return
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    # Decoding errors name no file; translate them here, where the file and line are known.
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.decode("utf-8").rstrip("\n").removesuffix("\r")  # per line, so an error names the line
                if line.strip():
                    yield lineno, line
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip file ({e or type(e).__name__})") from None


def _with_fields(keys: Sequence[str]) -> str:
    if len(keys) == 1:
        return f"with {'an' if keys[0][:1] in 'aeiou' else 'a'} {keys[0]!r} field"
    return "with " + " and ".join(repr(k) for k in keys) if keys else ""


def parse_record(line: str, where: str, keys: Sequence[str] = ()) -> dict[str, Any]:
    """One JSONL line -> its object, which must hold `keys`; errors start with `where` (FILE:LINE)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object {_with_fields(keys)}, got {line.strip()[:60]}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise ValueError(f"{where}: record lacks field(s) {missing}")
    return obj


def read_jsonl(path: str | pathlib.Path, keys: Sequence[str] = (), what: str = "input file"
               ) -> Iterator[tuple[str, dict[str, Any]]]:
    """('FILE:LINE', object) for each record of a JSONL file (or '-' for stdin), each holding `keys`."""
    name = "stdin" if str(path) == "-" else str(path)
    for lineno, line in read_lines(path, what):
        where = f"{name}:{lineno}"
        yield where, parse_record(line, where, keys)

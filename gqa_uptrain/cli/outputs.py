"""Checks on the files a command reads and writes, done before any work, and cleanup of a run that failed early."""
from __future__ import annotations

import contextlib
import pathlib
import shutil


def check_input_file(path: str | None, flag: str) -> None:
    """A readable file (or '-'): a directory or a missing path is named now, not after loading a model."""
    if not path or path == "-":
        return
    p = pathlib.Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file")
    if not p.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist")


def check_output_file(path: str | None, overwrite: bool, flag: str = "--output") -> None:
    """Refuse before decoding anything: a directory, or an existing file without --overwrite (results are not
    replaced silently)."""
    if not path or path == "-":
        return
    p = pathlib.Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file path")
    if p.exists() and not overwrite:
        raise FileExistsError(f"{flag} {path} exists; pass --overwrite to replace it")


def _has_checkpoint(model_dir: pathlib.Path) -> bool:
    from gqa_uptrain.checkpoint import TRAIN_CHECKPOINTS_DIR
    ckpts = model_dir / TRAIN_CHECKPOINTS_DIR
    return ckpts.is_dir() and any(c.name.isdigit() for c in ckpts.iterdir())


@contextlib.contextmanager
def created_paths_removed_on_failure(model_dir: str | pathlib.Path):
    """If the body fails before any checkpoint exists, remove the files and directories under `model_dir` that it
    created (and `model_dir` itself when it created it), so a typo does not leave a run directory that looks
    started. What existed before is never touched, nor anything once a checkpoint was written (that is progress)."""
    model_dir = pathlib.Path(model_dir)
    existed = model_dir.exists()
    before = {p for p in model_dir.rglob("*")} if existed else set()
    try:
        yield
    except BaseException:
        if model_dir.is_dir() and not _has_checkpoint(model_dir):
            if not existed:
                shutil.rmtree(model_dir, ignore_errors=True)
            else:
                # Deepest first, so directories are empty when reached.
                for p in sorted(set(model_dir.rglob("*")) - before, key=lambda q: len(q.parts), reverse=True):
                    if any(q == p or p in q.parents for q in before):
                        continue  # a directory that now holds pre-existing files (cannot happen, but never risk it)
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
        raise

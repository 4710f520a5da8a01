"""Training-run safety: never save a diverged state, and resume past a damaged checkpoint.

- `all_finite`: one jitted reduction over parameters and optimiser state, run on device before every save, so a
  checkpoint (and so "the last good checkpoint") never holds NaN/Inf.
- `restore_newest_good`: resuming tries the checkpoints newest first; one that does not restore (deleted or
  truncated files) is moved aside to MODEL_DIR/damaged_checkpoints/<step> (never deleted: it may be worth
  inspecting) and the next older one is tried, saying which and why.
"""
from __future__ import annotations

import pathlib
import shutil
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp

DAMAGED_DIR = "damaged_checkpoints"


@jax.jit
def all_finite(*trees: Any) -> jax.Array:
    """True iff every floating-point leaf of `trees` is free of NaN/Inf (a scalar bool on device)."""
    leaves = [x for t in trees for x in jax.tree.leaves(t)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def move_aside(step_dir: pathlib.Path, model_dir: pathlib.Path) -> pathlib.Path:
    """Move a damaged checkpoint step directory to MODEL_DIR/damaged_checkpoints/<step>[.N]."""
    dest_root = model_dir / DAMAGED_DIR
    dest_root.mkdir(parents=True, exist_ok=True)
    dest, n = dest_root / step_dir.name, 1
    while dest.exists():
        dest, n = dest_root / f"{step_dir.name}.{n}", n + 1
    shutil.move(str(step_dir), str(dest))
    return dest


def restore_newest_good(mngr: Any, model_dir: pathlib.Path, restore: Callable[[int], Any],
                        primary: bool = True) -> tuple[int | None, Any]:
    """(step, restore(step)) for the newest checkpoint of `mngr` that restores, or (None, None) if none does.

    Damaged ones are moved aside (by process 0; the others wait for the manager to see the move) with one line
    on stderr each."""
    tried: list[tuple[int, str]] = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            result = restore(step)
        except Exception as e:  # orbax/tensorstore raise many types for missing or truncated files
            reason = _first_line(e)
            tried.append((step, reason))
            if primary:
                dest = move_aside(pathlib.Path(mngr.directory) / str(step), model_dir)
                print(f"checkpoint step {step} in {mngr.directory} does not restore ({reason[:300]}); moved it "
                      f"to {dest} and trying the previous one", file=sys.stderr, flush=True)
            mngr.reload()
            continue
        if tried and primary:
            print(f"resuming from step {step}, the newest checkpoint that restores (damaged: "
                  f"{', '.join(str(s) for s, _ in tried)})", file=sys.stderr, flush=True)
        return step, result
    if tried:
        raise ValueError(f"no checkpoint in {mngr.directory} restores (all moved to {model_dir / DAMAGED_DIR}); "
                         "running again starts from the initial checkpoint")
    return None, None

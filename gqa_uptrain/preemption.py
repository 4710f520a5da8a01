"""Graceful stop on preemption or an approaching time limit.

Schedulers warn before they kill: SLURM sends SIGTERM on preemption/`scancel` (then SIGKILL after KillWait) and,
with `--signal=USR1@60`, SIGUSR1 a minute before the time limit. `install()` turns those signals into a flag; the
train loop asks `stop_requested()` (gqa_uptrain/trainer.py says at which steps), writes a checkpoint and raises
`Preempted`, and the CLI exits with PREEMPTED_EXIT_CODE so the job script can tell "stopped early, requeue me"
from success and from failure.

The flag is agreed across processes (any process signalled -> all stop at the same step): every process must take
part in the checkpoint's collective save, and a process that stopped alone would leave the others hanging. Agreeing
is an allgather, a host sync, so with several processes the trainer asks only at log steps, the same steps on every
process.
"""
from __future__ import annotations

import signal
from typing import Iterable

# EX_TEMPFAIL from sysexits.h: "try again later". The job scripts written by gqa_uptrain/launch.py requeue on it.
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: list[int] = []


class Preempted(Exception):
    """Training stopped early on a signal after saving a checkpoint at `step`; re-running resumes there."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} after writing its checkpoint; "
                         "re-run the same command to resume")


def _handler(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    _received.append(signum)


def install(signals: Iterable[int] = SIGNALS) -> None:
    """Route `signals` to the flag. Only from the main thread (Python's rule for signal handlers)."""
    for s in signals:
        signal.signal(s, _handler)


def reset() -> None:
    _received.clear()


def received_signal() -> int | None:
    """The first signal received in this process, or None."""
    return _received[0] if _received else None


def stop_requested() -> int | None:
    """The signal if any process received one (a collective when there are several processes: call it at the
    same point on every process), else None."""
    import jax
    local = received_signal()
    if jax.process_count() == 1:
        return local
    import numpy as np
    from jax.experimental import multihost_utils
    got = multihost_utils.process_allgather(np.asarray(local or 0, np.int32))
    hits = [int(s) for s in np.ravel(got) if s]
    return hits[0] if hits else None

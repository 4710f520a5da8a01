"""The one place that turns an exception into the one line a user reads (and the exit code).

Validation points raise `gqa_uptrain.errors.UserError` (or another ValueError of our own) with the file, key or
value in the message; this module only shortens them to one line and translates the operating system's errors, which
carry the file name but not a readable sentence. Anything else (TypeError, KeyError, a ValueError from inside a
dependency) is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno
import logging
import pathlib
import re
import traceback

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1]

# OS errors a user fixes (permissions, space, a wrong path), as opposed to bugs.
_OS_HINTS = {
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EISDIR: "is a directory (expected a file)",
    errno.ENOTDIR: "not a directory",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "already exists",
    errno.ENOTEMPTY: "directory not empty",
}


def _user_path(path: str) -> str:
    """/out/.NAME.tmp-XXXX/params/... -> /out/NAME: outputs are built in a temporary sibling (see
    checkpoint.atomic_directory); name the path the user asked for."""
    t = re.match(r"(.*?)/\.([^/]+?)\.tmp-[^/]*(/|$)", path)
    return f"{t.group(1)}/{t.group(2)}" if t else path.rstrip("/")


def _first_line(msg: str) -> str:
    # gin and orbax append context lines; the first line names the problem.
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _os_error(e: OSError) -> str | None:
    hint = _OS_HINTS.get(e.errno)
    if hint is None:
        return None
    where = " -> ".join(_user_path(str(f)) for f in (e.filename, e.filename2) if f is not None)
    if not where:
        return _first_line(str(e)) or hint
    return f"{where}: {hint}" + (" (free some space or choose another output directory)"
                                 if e.errno in (errno.ENOSPC, errno.EDQUOT) else "")


def _disk_full(msg: str) -> str | None:
    """orbax/tensorstore report a full disk as RESOURCE_EXHAUSTED naming a temporary path; name the output."""
    if "No space left on device" not in msg and "RESOURCE_EXHAUSTED" not in msg:
        return None
    m = re.search(r'local file "([^"]+)"', msg) or re.search(r'"(/[^"]+)"', msg)
    where = _user_path(m.group(1)) if m else None
    return (f"{where or 'output'}: no space left on device (free some space or choose another output directory)")


class _DropLibraryTracebacks(logging.Filter):
    """orbax logs every failed background write as an ERROR with a traceback (one per thread, 100+ lines for a
    full disk) before re-raising it to us; the error is then reported once, in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info or record.exc_info[2] is None:
            return True
        # absl attributes records from worker threads to itself, so look at where the exception came from.
        return not any("/orbax/" in frame.filename for frame in traceback.extract_tb(record.exc_info[2]))


class _DropOrphanedStoreErrors(logging.Filter):
    """A failed write also leaves tensorstore futures and orbax tasks nobody awaits; when collected, asyncio logs
    "Future (or Task) exception was never retrieved" with the same status-coded error (e.g. RESOURCE_EXHAUSTED: ...
    No space left on device) that is reported in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage().startswith(("Future exception was never retrieved",
                                                  "Task exception was never retrieved")) and exc is not None
                    and re.match(r"[A-Z_]+: ", str(exc)))


def quiet_library_logging() -> None:
    # Logger filters see only records logged on that logger (not those propagated from children): one per source.
    for name, kind in (("absl", _DropLibraryTracebacks), ("", _DropLibraryTracebacks),
                       ("asyncio", _DropOrphanedStoreErrors)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


def one_line(e: BaseException) -> tuple[str, int] | None:
    """(message, exit code) for an error the user can act on, or None to keep the traceback."""
    from gqa_uptrain.gin_utils import GinBindingError
    if isinstance(e, GinBindingError):
        return str(e), 2  # a usage error, like argparse's
    if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, FileExistsError)) or (
            isinstance(e, (FileNotFoundError, FileExistsError)) and e.filename is not None):
        msg = _os_error(e)
        return (msg, 1) if msg else None
    # A cause that is a disk error, wrapped by a library (orbax re-raises writes as its own errors).
    cause = e.__cause__ or e.__context__
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        msg = _os_error(cause)
        if msg:
            return msg, 1
    full = _disk_full(str(e))
    if full:
        return full, 1
    if isinstance(e, (FileNotFoundError, FileExistsError)) or _is_validation_error(e):
        return _first_line(str(e)) or type(e).__name__, 1
    return None


def _is_validation_error(e: BaseException) -> bool:
    """A UserError, or a ValueError raised by a validation point in gqa_uptrain's own code. A ValueError raised
    inside a dependency (numpy's broadcasting, a jax shape check) is a bug unless our code translated it, and
    TypeError, KeyError, AttributeError, ... always are: those keep their traceback."""
    from gqa_uptrain.errors import UserError
    if isinstance(e, UserError):
        return True
    if not isinstance(e, ValueError) or e.__traceback__ is None:
        return False
    innermost = traceback.extract_tb(e.__traceback__)[-1].filename
    return pathlib.Path(innermost).resolve().is_relative_to(_PACKAGE_DIR)


def drop_closed_loop_thread_errors() -> None:
    """When a write fails (disk full, read-only), tensorstore's native threads still hand results to the asyncio loop
    that the failed orbax save closed; each call fails with RuntimeError('Event loop is closed'), which tensorstore
    reports through sys.unraisablehook, racing the one-line error. That one exception is dropped; every other
    unraisable exception is printed as before."""
    import sys
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            previous(unraisable)
    sys.unraisablehook = hook

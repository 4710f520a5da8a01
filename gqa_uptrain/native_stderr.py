"""Hold what native libraries write to file descriptor 2 (TensorFlow's C++ logging, tensorstore's threads): Python's
sys.stderr redirection does not see it. Light on imports: checkpoint.py uses it without pulling in TensorFlow."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile


@contextlib.contextmanager
def held(replay_on_success: bool, replay_on_failure: bool):
    """Send fd 2 to a temporary file while the body runs; afterwards write what was held to stderr if asked for the
    way the body ended (an exception propagates either way)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if (replay_on_success if ok else replay_on_failure):
                tmp.seek(0)
                sys.stderr.write(tmp.read().decode(errors="replace"))

"""Import TensorFlow and seqio once, quietly, and keep TF off accelerators.

TF only runs input pipelines and writes TensorBoard events here. Its C++ runtime logs CUDA/oneDNN notices before
absl logging is configured (TF_CPP_MIN_LOG_LEVEL does not reach them), so the import runs with fd 2 captured; the
captured text is replayed if the import fails. TF is hidden from GPUs so it never reserves memory JAX needs.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def native_stderr_captured():
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not ok:
                tmp.seek(0)
                sys.stderr.write(tmp.read().decode(errors="replace"))


with native_stderr_captured():
    import tensorflow as tf
    import seqio
    try:
        import tensorflow_text  # noqa: F401  (seqio loads it lazily; load it while muted)
    except ImportError:
        pass

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF was already initialised by the caller; keep their setting
    pass

__all__ = ["seqio", "tf", "native_stderr_captured"]

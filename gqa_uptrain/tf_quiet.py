"""Import TensorFlow and seqio once, quietly, and keep TF off accelerators.

TF only runs input pipelines and writes TensorBoard events here. Its C++ runtime logs CUDA/oneDNN notices before
absl logging is configured (TF_CPP_MIN_LOG_LEVEL does not reach them), so the import runs with fd 2 captured; the
captured text is replayed if the import fails. TF is hidden from GPUs so it never reserves memory JAX needs.
"""
from __future__ import annotations

import os

from gqa_uptrain import native_stderr

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def native_stderr_captured():
    """TensorFlow's C++ start-up lines are dropped; shown only if the import fails (they may explain why)."""
    return native_stderr.held(replay_on_success=False, replay_on_failure=True)


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

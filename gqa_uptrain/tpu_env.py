"""Keep libtpu (the `tpu` extra, for ahead-of-time compilation) out of the way on machines without a TPU.

With libtpu installed, JAX's first backend initialisation tries the TPU and, on a host without one, prints a libtpu
error trace (TPU_WORKER hostnames, a source-location trace) before falling back to CPU. The CLI calls this before
JAX is imported: when JAX_PLATFORMS is unset, libtpu is installed and the host shows no TPU or GPU device files,
JAX is pointed at the CPU, which it would have used anyway. Topology descriptions for ahead-of-time compilation
work under JAX_PLATFORMS=cpu.
"""
from __future__ import annotations

import glob
import importlib.util
import os

# Device files of TPU VMs (accel: v4 and later; vfio: v5e/v6e) and NVIDIA GPUs.
_ACCELERATOR_FILES = ("/dev/accel*", "/dev/vfio/*", "/dev/nvidia[0-9]*")


def default_to_cpu_without_tpu() -> bool:
    """Set JAX_PLATFORMS=cpu when libtpu is installed on a host with no accelerator; True if it did."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return False
    if any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES):
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    return True

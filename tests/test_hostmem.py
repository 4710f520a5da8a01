"""gqa_uptrain.hostmem: glibc allocator settings for training processes (run in subprocesses: they are process-wide)."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")

_PROBE = """
import resource
from gqa_uptrain.hostmem import retain_freed_memory
print(retain_freed_memory())
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    b = b"\x01" * (64 << 20)  # 64 MiB written, above glibc's largest mmap threshold
    del b
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


def _probe(env_value):
    env = dict(os.environ)
    env.pop("GQA_UPTRAIN_MALLOC", None)
    if env_value is not None:
        env["GQA_UPTRAIN_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_retain_freed_memory_keeps_large_blocks_mapped():
    applied, faults = _probe(None)
    if not applied:
        pytest.skip("not glibc")
    # 20 x 64 MiB zeroed allocations: ~330,000 page faults when each is a fresh mmap, ~one block's worth when kept.
    assert faults < 40_000, faults


def test_opt_out():
    applied, faults = _probe("system")
    assert not applied
    assert faults > 100_000, faults

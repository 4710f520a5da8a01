import os
import shutil
import tempfile

# Tests run on CPU in float32; keep XLA from grabbing every core's worth of threads on the 2-core CI machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the whole test session, shared by the xdist workers and every process the
# tests start (CLI subprocesses, SLURM jobs and the 8-device subprocess inherit the environment): the tests build
# the same tiny train/eval/decode programs many times over and, on CPU, compiling them is most of the suite's time.
# A cached executable is the one XLA would compile again (the key is the HLO, the compile options, XLA flags and the
# jaxlib version). The directory is new for each session (no state carried between runs) and removed at its end.
# Set JAX_COMPILATION_CACHE_DIR yourself to choose (and keep) the directory; JAX_ENABLE_COMPILATION_CACHE=false turns
# the cache off (every program compiled afresh, as before).
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gqa_uptrain_test_xla_cache_")
    os.environ["GQA_UPTRAIN_TEST_CACHE_OWNER"] = str(os.getpid())  # the process that removes it (the controller)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The tests' programs are tiny: compiling them costs far more than running them, and most of XLA:CPU's compile time
# is LLVM optimising code that then runs for milliseconds. Level 0 roughly halves the CPU time of compile-bound test
# files (tests/test_model_paths.py: 260 -> 147 CPU s, docs/bench/README.md) and changes no result a test checks: every
# comparison is between programs compiled with the same flags, or against NumPy within a tolerance. The library and
# its commands never set it. GQA_UPTRAIN_TEST_XLA_OPTIMIZE=1 keeps XLA's default optimisation.
if os.environ.get("GQA_UPTRAIN_TEST_XLA_OPTIMIZE", "") != "1" and \
        "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from gqa_uptrain.config import ModelConfig  # noqa: E402


@pytest.fixture
def tiny_config() -> ModelConfig:
    """Small enough to compile in seconds, big enough to have several KV-group choices (H=4)."""
    return ModelConfig(vocab_size=96, d_model=32, num_heads=4, head_dim=8, d_ff=48, num_encoder_layers=2,
                       num_decoder_layers=2, dtype="float32")


@pytest.fixture
def rng() -> jax.Array:
    return jax.random.PRNGKey(0)


@pytest.fixture
def after_train_step(monkeypatch):
    """Install `f(new_step, params, opt_state, metrics) -> (params, opt_state, metrics)` behind every training step
    that `train.train` builds (new_step: the on-device step count after the step, 1-based)."""
    from gqa_uptrain import train as train_lib
    real = train_lib.make_train_step

    def install(f):
        def make(*a, **kw):
            step_fn = real(*a, **kw)

            def wrapped(params, opt_state, step, batch):
                params, opt_state, new_step, metrics = step_fn(params, opt_state, step, batch)
                params, opt_state, metrics = f(new_step, params, opt_state, metrics)
                return params, opt_state, new_step, metrics
            return wrapped
        monkeypatch.setattr(train_lib, "make_train_step", make)
    return install


@pytest.fixture(scope="module")
def aot():
    """gqa_uptrain.aot, or a skip naming why TPU topologies cannot be described here (no libtpu)."""
    from gqa_uptrain import aot as aot_lib
    reason = aot_lib.libtpu_available()
    if reason:
        pytest.skip(f"TPU ahead-of-time compilation needs libtpu: {reason}")
    # TPU executables compiled without a TPU client cannot be loaded back from the persistent cache (JAX warns and
    # compiles again), so these compiles bypass it. reset_cache makes JAX look at the setting again.
    from jax.experimental.compilation_cache import compilation_cache
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield aot_lib
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


# Test files by serial time on the 2-core CI machine (2026-12-03, before the compilation cache), longest first. pytest
# runs them in this order, then the rest in theirs; pyproject turns xdist's reordering (most tests first) off, so
# `--dist loadfile` hands the long files out first and neither worker ends alone with one (test_slurm.py, with
# 4 tests, used to be started last).
_LONGEST_FIRST = ("test_slurm.py", "test_scan.py", "test_trainer.py", "test_train.py", "test_sharding.py",
                  "test_safety.py", "test_carry.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


def pytest_unconfigure(config):
    if _OWN_CACHE and os.environ.get("GQA_UPTRAIN_TEST_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

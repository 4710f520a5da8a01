import os

# Tests run on CPU in float32; keep XLA from grabbing every core's worth of threads on the 2-core CI machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
    return aot_lib

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
# The CLI keeps compiled functions across runs (cli._persist_compilation): the tests' own CLI runs,
# in this process and in subprocesses, share one cache outside the user's home.
os.environ.setdefault("MEDSAM2_JAX_COMPILE_CACHE", os.path.join(tempfile.gettempdir(), "medsam2_jax_test_xla"))
import jax  # noqa: E402

# Parity tests compare float32 against float32 CPU torch.
jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _compile_cache_stays_with_the_cli():
    """A CLI run in this process turns JAX's persistent compilation cache on for the whole process
    (cli._persist_compilation); without this, every library test after it would serialize each
    executable it compiles into the cache (hundreds of MB written for nothing). Each test leaves
    the cache setting as it found it."""
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_compilation_cache_dir
    yield
    if jax.config.jax_compilation_cache_dir != before:
        jax.config.update("jax_compilation_cache_dir", before)
        compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def demo_predictor():
    """A VideoPredictor over the shipped demo weights (one cond slot), built once per session."""
    from medsam2_jax import weights
    from medsam2_jax.configs.model import get_config
    from medsam2_jax.convert.checkpoint import load_params
    from medsam2_jax.tracker.config import get_tracker_config
    from medsam2_jax.tracker.predictor import VideoPredictor

    shipped = weights.default_checkpoint()
    assert shipped is not None, "no demo weights in medsam2_jax/weights/medsam2_jax_demo"
    config = get_config(shipped.config)
    return VideoPredictor(load_params(shipped.path, config), config, get_tracker_config())

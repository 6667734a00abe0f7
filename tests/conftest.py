import os

os.environ.setdefault("XLA_FLAGS", "")
import jax  # noqa: E402

# Parity tests compare float32 against float32 CPU torch.
jax.config.update("jax_default_matmul_precision", "highest")

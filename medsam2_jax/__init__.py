"""MedSAM-2 in JAX/Flax. `load_model()` gives the (params, config) every entry point takes.

Kept import-light: `import medsam2_jax` loads no JAX; each function imports what it needs.
"""

from __future__ import annotations


def load_model(checkpoint=None, config=None):
    """(params, config) of a checkpoint folder, or of the demo weights that ship with the package.

    checkpoint: a folder written by `medsam2-jax convert` or a training export (Orbax `params/`
    and `manifest.json`); None for the shipped demo weights.
    config: a model variant name (`configs/model.py`) or a model ConfigDict; default: the one
    the checkpoint's manifest names, else "medsam2".
    """
    from medsam2_jax import weights
    from medsam2_jax.configs.model import get_config
    from medsam2_jax.convert.checkpoint import CheckpointError, load_params, read_manifest

    if checkpoint is None:
        shipped = weights.default_checkpoint()
        if shipped is None:
            raise CheckpointError("no trained weights ship with this installation; give load_model a checkpoint folder")
        checkpoint, named = shipped.path, shipped.config
    else:
        named = read_manifest(checkpoint).get("config") or "medsam2"
    if config is None or isinstance(config, str):
        config = get_config(config or named)
    return load_params(checkpoint, config), config

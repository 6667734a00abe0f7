"""Weights that ship with the package (trained by this project; see the model card beside them).

Each shipped model is a folder here holding an Orbax `params/` checkpoint and `manifest.json`
(as written by `medsam2_jax.convert.checkpoint.save_params`). `DEFAULT` names the one that
`medsam2-jax demo` and `segment` use when no --checkpoint is given.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

HERE = Path(__file__).parent
DEFAULT = "medsam2_jax_demo"


@dataclasses.dataclass(frozen=True)
class ShippedWeights:
    name: str
    config: str
    path: Path
    inference: dict = dataclasses.field(default_factory=dict)  # the manifest's run settings, e.g. {"crop": 3.0}


def default_checkpoint() -> ShippedWeights | None:
    """The default shipped model, or None while no trained weights ship."""
    folder = HERE / DEFAULT
    manifest = folder / "manifest.json"
    if not (folder / "params").is_dir() or not manifest.is_file():
        return None
    info = json.loads(manifest.read_text())
    return ShippedWeights(DEFAULT, info["config"], folder, dict(info.get("inference", {})))

"""Labelled structures to evaluate on: built-in sets from the offline data (shared/DATA.md) and
manifests in the training format (one JSON object or CSV row per image/label pair, optional
`objects` and `axis`; see medsam2_jax/training/data.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from medsam2_jax.volumes.io import Volume

# AAL structures the demo model never saw labelled (both hemispheres, so the mirror image is
# unseen too); scripts/train_demo_model.py removes them from its training labels.
AAL_HELD_OUT = {
    37: "Hippocampus_L", 38: "Hippocampus_R",
    71: "Caudate_L", 72: "Caudate_R",
    73: "Putamen_L", 74: "Putamen_R",
    77: "Thalamus_L", 78: "Thalamus_R",
}
# Structures the demo model trained on, evaluated the same way (an optimistic reference).
AAL_SEEN = {75: "Pallidum_L", 41: "Amygdala_L", 1: "Precentral_L", 91: "Cerebelum_Crus1_L"}

BUILT_IN = {
    "aal_held_out": "Colin27 T1, the 8 AAL structures held out of the demo model's training (axial)",
    "aal_seen": "Colin27 T1, 4 AAL structures the demo model trained on (axial)",
    "stardist3d": "stardist's synthetic 3D nuclei (31 x 61 x 57), one structure per nucleus (axis 0)",
}


@dataclasses.dataclass(frozen=True, eq=False)
class Structure:
    """One labelled structure in one volume, segmented along canonical `axis`."""

    name: str
    source: str  # the image it lives in
    label: int
    volume: Volume
    target: np.ndarray  # (X, Y, Z) bool, canonical order
    axis: int
    window: str | None = None


def built_in(name: str, *, limit: int | None = None) -> list[Structure]:
    if name not in BUILT_IN:
        raise ValueError(f"unknown structure set {name!r}; choose one of {', '.join(BUILT_IN)} or give a manifest file")
    if name.startswith("aal_"):
        return _aal(AAL_HELD_OUT if name == "aal_held_out" else AAL_SEEN)[:limit]
    return _stardist3d(limit)


def _aal(structures: dict[int, str]) -> list[Structure]:
    from medsam2_jax import datasets
    from medsam2_jax.volumes.io import load_label_volume, load_volume

    volume = load_volume(datasets.colin27())
    atlas = load_label_volume(datasets.aal(), volume)
    return [Structure(name, "colin27", label, volume, atlas == label, axis=2) for label, name in structures.items()]


def _stardist3d(limit: int | None) -> list[Structure]:
    """The nuclei volume as stored (z, y, x) on a 1-voxel grid, sliced along its first axis."""
    import tifffile

    from medsam2_jax import datasets
    from medsam2_jax.volumes.io import make_volume

    image_path, mask_path = datasets.stardist_nuclei_3d()
    image = tifffile.imread(image_path).astype(np.float32)
    labels = tifffile.imread(mask_path).astype(np.int32)
    volume = make_volume(image, np.eye(4), source_path=Path(image_path), source_format="tiff")
    ids = [int(i) for i in np.unique(labels) if i != 0][:limit]
    return [Structure(f"nucleus_{i}", "stardist3d", i, volume, labels == i, axis=0) for i in ids]


def from_manifest(path: str | Path, *, axis: int | None = None, limit: int | None = None) -> list[Structure]:
    """Every labelled structure of every manifest entry (or the entry's `objects`)."""
    from medsam2_jax.training.data import read_manifest
    from medsam2_jax.volumes.io import load_label_volume, load_volume

    structures = []
    for entry in read_manifest(path, "raise"):
        volume = load_volume(entry.image)
        labels = load_label_volume(entry.label, volume)
        ids = entry.objects or tuple(int(i) for i in np.unique(labels) if i != 0)
        for i in ids:
            target = labels == i
            if not target.any():
                raise ValueError(f"{entry.label}: label {i} is not in the volume; fix the manifest's objects")
            along = entry.axis if entry.axis is not None else (2 if axis is None else axis)  # default: axial
            structures.append(Structure(f"{Path(entry.label).name.split('.')[0]}:{i}", entry.image, int(i), volume,
                                        target, axis=along, window=entry.window))
    return structures[:limit]

"""Segmentation metrics for volumes: Dice, normalised surface Dice (NSD), HD95, slice ranges.

The surface distances come from MedPy (`medpy.metric.binary`, the package MedPy's `hd95` and
`assd` are built on): the border voxels of each mask (the mask minus its erosion by the
6-neighbourhood) and the Euclidean distance, in mm through the voxel spacing, from each border
voxel of one mask to the nearest border voxel of the other (scipy's exact distance transform).
From those two directed distance sets:
  HD95  max(95th percentile of pred->ref, 95th percentile of ref->pred), the robust Hausdorff
        distance of DeepMind's `surface-distance` and MONAI's `compute_hausdorff_distance`
        (percentile=95);
  NSD   (#pred border voxels within tau of ref + #ref border voxels within tau of pred) /
        (#pred border voxels + #ref border voxels), Nikolov et al.'s surface Dice at tolerance
        tau mm counted over border voxels, as MONAI's `compute_surface_dice` does.
Both are checked in the tests on shapes with known answers and against MONAI.

Empty masks: Dice and NSD are 1 when both masks are empty and 0 when only one is; HD95 is 0 when
both are empty and undefined (NaN, reported as null in JSON) when only one is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    total = int(pred.sum()) + int(ref.sum())
    return 2.0 * int((pred & ref).sum()) / total if total else 1.0


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(pred border -> ref border, ref border -> pred border) distances in mm; both masks non-empty."""
    from medpy.metric import binary

    # MedPy's own helper behind hd95/asd (module-private, pinned version in pyproject.toml).
    distances = getattr(binary, "__surface_distances")
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    # Only the region around both masks matters: crop (with a margin for the erosion) for speed.
    region = _bounding_region(pred | ref, margin=1)
    pred, ref = pred[region], ref[region]
    spacing = tuple(float(s) for s in spacing)
    return distances(pred, ref, spacing, 1), distances(ref, pred, spacing, 1)


def surface_scores(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                   tolerance_mm: float) -> tuple[float, float]:
    """(NSD at `tolerance_mm`, HD95) from one computation of the surface distances."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not pred.any() and not ref.any():
        return 1.0, 0.0
    if not pred.any() or not ref.any():
        return 0.0, float("nan")
    a, b = surface_distances(pred, ref, spacing)
    nsd_value = ((a <= tolerance_mm).sum() + (b <= tolerance_mm).sum()) / (a.size + b.size)
    return float(nsd_value), float(max(np.percentile(a, 95), np.percentile(b, 95)))


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    return surface_scores(pred, ref, spacing, 0.0)[1]


def nsd(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], tolerance_mm: float) -> float:
    return surface_scores(pred, ref, spacing, tolerance_mm)[0]


def _bounding_region(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    region = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        region.append(slice(max(int(idx[0]) - margin, 0), int(idx[-1]) + margin + 1))
    return tuple(region)


@dataclasses.dataclass(frozen=True)
class SliceRange:
    """Where a structure is and where a prediction put it, along the slice axis (inclusive indices;
    None when the mask is empty)."""

    true_first: int | None
    true_last: int | None
    pred_first: int | None
    pred_last: int | None
    slices_predicted: int  # slices with any predicted voxel
    slices_true: int  # slices with any true voxel
    predicted_outside: int  # predicted slices outside the true range
    missed_inside: int  # slices of the true range with nothing predicted

    def within(self, fraction: float = 0.25) -> bool:
        """Both ends of the predicted range within `fraction` of the true range's length of the
        true ends (a structure that is not predicted at all fails)."""
        if self.pred_first is None or self.true_first is None:
            return self.pred_first is None and self.true_first is None
        slack = fraction * (self.true_last - self.true_first + 1)
        return abs(self.pred_first - self.true_first) <= slack and abs(self.pred_last - self.true_last) <= slack


def slice_range(pred: np.ndarray, ref: np.ndarray, axis: int) -> SliceRange:
    other = tuple(a for a in range(3) if a != axis)
    p, t = np.flatnonzero(np.any(pred, axis=other)), np.flatnonzero(np.any(ref, axis=other))
    first_last = lambda idx: (int(idx[0]), int(idx[-1])) if idx.size else (None, None)  # noqa: E731
    (tf, tl), (pf, pl) = first_last(t), first_last(p)
    inside = (p >= tf) & (p <= tl) if t.size else np.zeros(p.shape, bool)
    missed = (tl - tf + 1) - int(inside.sum()) if t.size else 0
    return SliceRange(tf, tl, pf, pl, int(p.size), int(t.size), int((~inside).sum()), int(missed))


def per_slice_dice(pred: np.ndarray, ref: np.ndarray, axis: int) -> np.ndarray:
    """Dice of every slice along `axis` (NaN where both are empty)."""
    other = tuple(a for a in range(3) if a != axis)
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    inter = (pred & ref).sum(axis=other).astype(np.float64)
    total = pred.sum(axis=other).astype(np.float64) + ref.sum(axis=other)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2 * inter / total, np.nan)

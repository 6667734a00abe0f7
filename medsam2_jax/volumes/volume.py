"""The canonical 3D image every reader returns (`Volume`), its error type, and `make_volume`.

The lowest layer of `volumes`: the readers (`io.py` for NIfTI, `dicom.py` for DICOM) build on it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

CANONICAL_AXCODES = ("R", "A", "S")

# DICOM patient coordinates are LPS+, NIfTI world coordinates RAS+: flip x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class VolumeError(ValueError):
    """An input that cannot be read as the image the caller needs."""


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image in canonical (RAS+) voxel order plus what is needed to write results back.

    array: float32 (X, Y, Z) in RAS+ order, intensities after any rescale slope/intercept
        (Hounsfield units for CT).
    affine: canonical voxel index -> world RAS+ mm.
    spacing: voxel size in mm along the canonical axes.
    original_affine, original_shape, original_header: as stored in the input file (the
        header is a NIfTI header; a DICOM input gets one built from its geometry).
    to_canonical: nibabel orientation transform from the input's voxel axes to RAS+.
    modality: "CT", "MR", ... from DICOM; None for NIfTI (NIfTI does not record it).
    """

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source_path: Path
    source_format: str
    original_affine: np.ndarray
    original_shape: tuple[int, ...]
    original_header: nib.Nifti1Header
    to_canonical: np.ndarray
    modality: str | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.array.shape

    @property
    def original_axcodes(self) -> tuple[str, ...]:
        return tuple(nib.aff2axcodes(self.original_affine))

    def to_original(self, canonical: np.ndarray) -> np.ndarray:
        """An array on the canonical grid (extra trailing axes allowed) -> the input's voxel order
        and shape (a 4D input with one volume gets its trailing axis of length 1 back)."""
        from_canonical = orientations.ornt_transform(_canonical_ornt(), _ornt_of(self.original_affine))
        original = orientations.apply_orientation(np.asarray(canonical), from_canonical)
        extra_axes = original.shape[3:] or self.original_shape[3:]
        return original.reshape(self.original_shape[:3] + extra_axes)

    def original_to_canonical_index(self, index_xyz: np.ndarray) -> np.ndarray:
        """Voxel coordinates of the input file (N, 3) -> canonical voxel coordinates (N, 3)."""
        canonical_to_original = orientations.inv_ornt_aff(self.to_canonical, self.original_shape[:3])
        index_xyz = np.atleast_2d(np.asarray(index_xyz, dtype=np.float64))
        homogeneous = np.c_[index_xyz, np.ones(len(index_xyz))]
        return (homogeneous @ np.linalg.inv(canonical_to_original).T)[:, :3]


def make_volume(
    data: np.ndarray,
    affine: np.ndarray,
    *,
    source_path: Path,
    source_format: str,
    original_header: nib.Nifti1Header | None = None,
    original_shape: tuple[int, ...] | None = None,
    modality: str | None = None,
) -> Volume:
    """Validates a 3D array on the grid of `affine` and reorients it to RAS+."""
    check_voxels(data, source_path)
    check_geometry(affine, source_path)
    to_canonical = orientations.ornt_transform(_ornt_of(affine), _canonical_ornt())
    canonical = orientations.apply_orientation(data, to_canonical).astype(np.float32)
    if not np.isfinite(canonical).all():
        bad = int(canonical.size - np.count_nonzero(np.isfinite(canonical)))
        raise VolumeError(f"{source_path}: {bad} voxels lie beyond the float32 range (magnitude above 3.4e38), which "
                          "the model reads; rescale the image")
    canonical_affine = affine @ orientations.inv_ornt_aff(to_canonical, data.shape)
    if original_header is None:
        original_header = _header_for(data, affine)
    return Volume(
        array=np.ascontiguousarray(canonical),
        affine=canonical_affine,
        spacing=tuple(float(s) for s in np.linalg.norm(canonical_affine[:3, :3], axis=0)),
        source_path=source_path,
        source_format=source_format,
        original_affine=affine,
        original_shape=original_shape or tuple(data.shape),
        original_header=original_header,
        to_canonical=to_canonical,
        modality=modality,
    )


def check_voxels(data: np.ndarray, path: Path) -> None:
    """Rejects what no model input can come from: NaN/Inf voxels and constant volumes."""
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(data.size - np.count_nonzero(finite))
        raise VolumeError(f"{path}: {bad} voxels are NaN or Inf; fix or mask them before segmenting")
    if data.size == 0 or data.min() == data.max():
        value = data.flat[0] if data.size else "nothing"
        raise VolumeError(f"{path}: every voxel has the same value ({value}); the image is empty, check the file")


def check_geometry(affine: np.ndarray, path: Path) -> None:
    """Rejects a voxel-to-world affine that places no voxel: NaN, Inf or overflowing entries, a
    voxel axis of no size, or two voxel axes along one direction (no orientation, no world
    coordinates can come from it)."""
    affine = np.asarray(affine, np.float64)
    with np.errstate(over="ignore"):
        sizes = np.linalg.norm(affine[:3, :3], axis=0)
    if not (np.isfinite(affine).all() and np.isfinite(sizes).all()):
        raise VolumeError(f"{path}: the voxel-to-world affine holds NaN, Inf or overflowing values; "
                          "fix the file's geometry")
    if sizes.min() == 0 or np.linalg.matrix_rank(affine[:3, :3] / sizes) < 3:
        raise VolumeError(f"{path}: the voxel-to-world affine is singular (a voxel axis with no size, or two along "
                          "one direction); fix the file's geometry")


def _header_for(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Header:
    """A NIfTI header for an input that had none (DICOM): the geometry as scanner coordinates."""
    image = nib.Nifti1Image(np.zeros(data.shape, np.int16), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image.header


def _ornt_of(affine: np.ndarray) -> np.ndarray:
    return orientations.io_orientation(affine)


def _canonical_ornt() -> np.ndarray:
    return orientations.axcodes2ornt(CANONICAL_AXCODES)

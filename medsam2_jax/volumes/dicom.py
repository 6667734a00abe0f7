"""DICOM series and multi-frame files -> `Volume`.

Geometry follows DICOM PS3.3 C.7.6.2: ImageOrientationPatient holds the row direction (the way
column index grows) then the column direction (the way row index grows); PixelSpacing is
(between rows, between columns); slices are ordered by their ImagePositionPatient projected on
the slice normal, never by file name or InstanceNumber, which scanners do not keep consistent.
Voxel index (i, j, k) = (column, row, slice); the affine maps it to RAS+ mm like NIfTI's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from medsam2_jax.volumes.volume import LPS_TO_RAS, Volume, VolumeError, make_volume

# Slices whose gaps differ from the median gap by more than this fraction are not a regular grid.
SLICE_GAP_TOLERANCE = 0.1


@dataclasses.dataclass(frozen=True)
class _Slice:
    pixels: np.ndarray  # (rows, columns), rescaled to real units
    position: np.ndarray  # ImagePositionPatient, LPS mm


def load_dicom_series(folder: Path) -> Volume:
    """Reads every DICOM file of one series in `folder` (not recursive) as one volume."""
    datasets = _read_folder(folder)
    if len(datasets) == 1:
        return load_dicom_file(Path(datasets[0].filename))
    _check_one_series(datasets, folder)
    first = datasets[0]
    row_dir, col_dir = _orientation(first, folder)
    normal = np.cross(row_dir, col_dir)
    slices = sorted(
        (_Slice(_rescaled_pixels(ds, _pixel_array(ds, folder), folder), _position(ds, folder)) for ds in datasets),
        key=lambda s: float(s.position @ normal),
    )
    slice_gap = _regular_slice_gap([float(s.position @ normal) for s in slices], folder)
    pixels = np.stack([s.pixels for s in slices])
    affine = _affine(row_dir, col_dir, normal * slice_gap, _pixel_spacing(first, folder), slices[0].position)
    return _volume_from_frames(pixels, affine, folder, first)


def load_dicom_file(path: Path) -> Volume:
    """Reads one DICOM file; only a multi-frame file holds a volume."""
    dataset = _read(path, path)
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames < 2:
        raise VolumeError(
            f"{path}: a single 2D DICOM slice where a 3D volume is needed; give the folder holding the whole series"
        )
    pixels = _rescaled_pixels(dataset, _pixel_array(dataset, path), path)
    row_dir, col_dir = _orientation(dataset, path, default=True)
    positions = _frame_positions(dataset, frames)
    normal = np.cross(row_dir, col_dir)
    if positions is not None:
        order = np.argsort(positions @ normal)
        pixels, positions = pixels[order], positions[order]
        gap = _regular_slice_gap(list(positions @ normal), path)
        origin = positions[0]
    else:
        gap, origin = _frame_spacing(dataset, path), np.zeros(3)
    affine = _affine(row_dir, col_dir, normal * gap, _pixel_spacing(dataset, path), origin)
    return _volume_from_frames(pixels, affine, path, dataset)


def _volume_from_frames(pixels: np.ndarray, affine: np.ndarray, path: Path, dataset) -> Volume:
    """pixels (slices, rows, columns) -> voxel order (column, row, slice) to match the affine."""
    data = np.transpose(pixels, (2, 1, 0))
    return make_volume(
        data, affine, source_path=path, source_format="dicom", modality=getattr(dataset, "Modality", None)
    )


def _affine(row_dir, col_dir, slice_step, pixel_spacing, origin) -> np.ndarray:
    lps = np.eye(4)
    lps[:3, 0] = row_dir * pixel_spacing[1]
    lps[:3, 1] = col_dir * pixel_spacing[0]
    lps[:3, 2] = slice_step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def _read_folder(folder: Path) -> list:
    import pydicom

    datasets = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            dataset = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, OSError, EOFError):
            continue  # folders often hold DICOMDIR, notes or thumbnails beside the series
        if "PixelData" in dataset:
            datasets.append(dataset)
    if not datasets:
        raise VolumeError(f"{folder}: no DICOM image files in this folder; give the folder that holds the series")
    return datasets


def _read(path: Path, where: Path):
    import pydicom

    try:
        dataset = pydicom.dcmread(path)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError) as error:
        raise VolumeError(f"{where}: not a readable DICOM file ({error}); check the file") from error
    if "PixelData" not in dataset:
        raise VolumeError(f"{where}: a DICOM file without pixel data; give an image file or series folder")
    return dataset


def _check_one_series(datasets: list, folder: Path) -> None:
    series = {getattr(ds, "SeriesInstanceUID", None) for ds in datasets}
    if len(series) > 1:
        raise VolumeError(f"{folder}: holds {len(series)} DICOM series; put each series in its own folder")
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) > 1:
        raise VolumeError(f"{folder}: slices of different sizes {sorted(shapes)}; the series is not one volume")


def _orientation(dataset, where: Path, default: bool = False) -> tuple[np.ndarray, np.ndarray]:
    values = _shared_attribute(dataset, "PlaneOrientationSequence", "ImageOrientationPatient")
    if values is None:
        if default:
            return np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
        raise VolumeError(f"{where}: DICOM slices without ImageOrientationPatient; the series geometry is unknown")
    cosines = _numbers(values, 6, "ImageOrientationPatient", where)
    row_dir, col_dir = cosines[:3], cosines[3:]
    if not np.linalg.norm(np.cross(row_dir, col_dir)) > 0.5:  # two unit vectors at right angles: 1
        raise VolumeError(f"{where}: DICOM ImageOrientationPatient {values!r} gives no slice direction (the row and "
                          "column directions must be unit vectors at right angles); fix the file's header")
    return row_dir, col_dir


def _position(dataset, where: Path) -> np.ndarray:
    if "ImagePositionPatient" not in dataset:
        raise VolumeError(f"{where}: DICOM slices without ImagePositionPatient; the slice order is unknown")
    return _numbers(dataset.ImagePositionPatient, 3, "ImagePositionPatient", where)


def _frame_positions(dataset, frames: int) -> np.ndarray | None:
    """Per-frame positions of an enhanced multi-frame file, or None when it records none."""
    per_frame = getattr(dataset, "PerFrameFunctionalGroupsSequence", None)
    if per_frame is None or len(per_frame) != frames:
        return None
    try:
        return np.array([item.PlanePositionSequence[0].ImagePositionPatient for item in per_frame], dtype=np.float64)
    except (AttributeError, IndexError):
        return None


def _frame_spacing(dataset, where: Path) -> float:
    for name in ("SpacingBetweenSlices", "SliceThickness"):
        value = _shared_attribute(dataset, "PixelMeasuresSequence", name)
        if value:
            return float(_numbers(value, 1, name, where, positive=True)[0])
    return 1.0  # nothing recorded: unit spacing, as most viewers assume


def _pixel_spacing(dataset, where: Path) -> tuple[float, float]:
    value = _shared_attribute(dataset, "PixelMeasuresSequence", "PixelSpacing")
    if not value:
        return (1.0, 1.0)
    between_rows, between_columns = _numbers(value, 2, "PixelSpacing", where, positive=True)
    return float(between_rows), float(between_columns)


def _numbers(value, count: int, name: str, where: Path, positive: bool = False) -> np.ndarray:
    """A header attribute that must hold `count` finite numbers (all positive if `positive`)."""
    try:
        numbers = np.asarray(value, dtype=np.float64).reshape(count)
    except (TypeError, ValueError):
        numbers = None
    if numbers is None or not np.isfinite(numbers).all() or (positive and (numbers <= 0).any()):
        kind = "positive" if positive else "finite"
        expected = f"a {kind} number" if count == 1 else f"{count} {kind} numbers"
        raise VolumeError(f"{where}: DICOM {name} {value!r} is not {expected}; fix the file's header")
    return numbers


def _shared_attribute(dataset, sequence: str, name: str):
    """A top-level attribute, or the one in the shared functional groups of an enhanced file."""
    if name in dataset:
        return dataset[name].value
    shared = getattr(dataset, "SharedFunctionalGroupsSequence", None)
    if shared and sequence in shared[0] and name in shared[0][sequence][0]:
        return shared[0][sequence][0][name].value
    return None


def _pixel_array(dataset, where: Path) -> np.ndarray:
    try:
        return dataset.pixel_array
    except Exception as error:  # pydicom raises many types for pixel data it cannot decode
        message = " ".join(str(error).split()) or type(error).__name__
        raise VolumeError(f"{where}: cannot decode the DICOM pixel data ({message}); check the file") from None


def _rescaled_pixels(dataset, pixels: np.ndarray, where: Path) -> np.ndarray:
    """Stored values -> real units (Hounsfield units for CT) through RescaleSlope/Intercept."""
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and "NumberOfFrames" not in dataset):
        raise VolumeError(f"{where}: colour or unusual DICOM pixel layout {pixels.shape}; give a greyscale series")
    slope = float(_numbers(getattr(dataset, "RescaleSlope", 1) or 1, 1, "RescaleSlope", where)[0])
    intercept = float(_numbers(getattr(dataset, "RescaleIntercept", 0) or 0, 1, "RescaleIntercept", where)[0])
    return pixels.astype(np.float32) * slope + intercept


def _regular_slice_gap(offsets: list[float], where: Path) -> float:
    gaps = np.diff(np.asarray(offsets))
    median = float(np.median(gaps))
    if median <= 0 or np.any(gaps <= 0):
        raise VolumeError(f"{where}: two DICOM slices share one position; remove the duplicate files")
    if np.max(np.abs(gaps - median)) > SLICE_GAP_TOLERANCE * median:
        raise VolumeError(
            f"{where}: uneven gaps between DICOM slices ({gaps.min():.2f} to {gaps.max():.2f} mm); "
            "the series is missing slices or must be resampled first"
        )
    return median

"""Writing results: label and probability NIfTI on the input's grid, and a JSON sidecar.

Results arrive on the canonical grid; `Volume.to_original` puts them back in the input's voxel
order so the written file has the input's own affine and header (geometry, units, description;
only the data type, scaling and intent change). A DICOM input gets a NIfTI with the affine built
from its geometry. Every write is atomic: a temporary file in the target folder, then
`os.replace`, so a reader never sees half a file and a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from medsam2_jax.volumes.io import Volume
from medsam2_jax.volumes.prompts import VolumePrompts

SIDECAR_VERSION = 1
NIFTI_INTENT_LABEL = "label"
NIFTI_INTENT_ESTIMATE = "estimate"


class OutputError(ValueError):
    """An output that cannot be written where asked."""


def check_output_folder(path: str | Path) -> Path:
    """Fails early, before any work, when `path`'s folder cannot take a new file."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"{path}: the output folder {folder} does not exist or is not a folder; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: the output folder {folder} is not writable; choose another folder")
    try:  # root passes os.access everywhere; a real file tells (read-only mounts, /proc)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.probe.")
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise OutputError(f"{path}: cannot write in {folder} ({error.strerror}); choose another folder") from None
    return path


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `target` (same suffix, so writers pick the same format);
    on success it replaces `target`, on any failure it is removed."""
    target = check_output_folder(target)
    try:
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=_suffix(target))
    except OSError as error:
        raise OutputError(f"{target}: cannot write in {target.parent} ({error.strerror}); "
                          "choose another folder") from error
    os.close(handle)
    # mkstemp makes the file 0600 and the rename keeps that: give it what a plain open would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        yield Path(temporary)
        os.replace(temporary, target)
    except OSError as error:
        raise OutputError(f"{target}: writing failed ({error.strerror or error}); check the disk and folder") from error
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_labels(volume: Volume, labels: np.ndarray, path: str | Path) -> Path:
    """Integer labels (X, Y, Z) on the canonical grid -> NIfTI on the input's grid and header."""
    labels = np.asarray(labels)
    _check_grid(volume, labels.shape[:3], "labels")
    dtype = _label_dtype(labels)
    image = _like_input(volume, volume.to_original(labels.astype(dtype)), dtype)
    image.header.set_intent(NIFTI_INTENT_LABEL)
    image.header["cal_min"], image.header["cal_max"] = 0, int(labels.max(initial=0))
    return _save(image, path)


def write_probabilities(volume: Volume, probabilities: np.ndarray, path: str | Path) -> Path:
    """Probabilities (X, Y, Z) or (X, Y, Z, objects) on the canonical grid -> float32 NIfTI."""
    probabilities = np.asarray(probabilities, np.float32)
    _check_grid(volume, probabilities.shape[:3], "probabilities")
    image = _like_input(volume, volume.to_original(probabilities), np.float32)
    image.header.set_intent(NIFTI_INTENT_ESTIMATE)
    image.header["cal_min"], image.header["cal_max"] = 0.0, 1.0
    return _save(image, path)


def write_sidecar(path: str | Path, volume: Volume, *, prompts: VolumePrompts, config_name: str,
                  checkpoint_hash: str | None, slice_object_scores: Mapping[int, Sequence[float]] | None = None,
                  outputs: Mapping[str, Path] | None = None, extra: Mapping | None = None) -> Path:
    """A JSON record of how the labels were made.

    slice_object_scores: per object id, one score per slice along the prompt axis (the
    tracker's object score); NaN or None for slices never visited become null.
    """
    record = {
        "version": SIDECAR_VERSION,
        "input": {
            "path": str(volume.source_path),
            "format": volume.source_format,
            "shape": list(volume.original_shape),
            "orientation": "".join(volume.original_axcodes),
            "affine": np.asarray(volume.original_affine).round(6).tolist(),
        },
        "config": config_name,
        "checkpoint_sha256": checkpoint_hash,
        "prompts": prompts.to_json(),
        "slice_object_scores": {str(k): _json_numbers(v) for k, v in (slice_object_scores or {}).items()},
        "outputs": {name: str(p) for name, p in (outputs or {}).items()},
        **dict(extra or {}),
    }
    text = json.dumps(record, indent=2, allow_nan=False) + "\n"
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_segmentation(volume: Volume, labels: np.ndarray, out_path: str | Path, *, prompts: VolumePrompts,
                       config_name: str, checkpoint_hash: str | None,
                       slice_object_scores: Mapping[int, Sequence[float]] | None = None,
                       probabilities: np.ndarray | None = None, extra: Mapping | None = None) -> dict[str, Path]:
    """Labels at `out_path`, optional probabilities and the sidecar beside it; all or nothing."""
    out_path = check_output_folder(out_path)
    paths = {"labels": out_path, "sidecar": sidecar_path(out_path)}
    if probabilities is not None:
        paths["probabilities"] = probability_path(out_path)
    written: list[Path] = []
    try:
        written.append(write_labels(volume, labels, paths["labels"]))
        if probabilities is not None:
            written.append(write_probabilities(volume, probabilities, paths["probabilities"]))
        write_sidecar(paths["sidecar"], volume, prompts=prompts, config_name=config_name,
                      checkpoint_hash=checkpoint_hash, slice_object_scores=slice_object_scores, outputs=paths,
                      extra=extra)
    except BaseException:
        for path in written:  # a half set of outputs would pass for a whole run
            path.unlink(missing_ok=True)
        raise
    return paths


def sidecar_path(out_path: str | Path) -> Path:
    return _beside(out_path, "", ".json")


def probability_path(out_path: str | Path) -> Path:
    return _beside(out_path, "_probabilities", _suffix(Path(out_path)))


def _beside(out_path: str | Path, tag: str, suffix: str) -> Path:
    out_path = Path(out_path)
    stem = out_path.name[: -len(_suffix(out_path))] if _suffix(out_path) else out_path.name
    return out_path.with_name(f"{stem}{tag}{suffix}")


def _like_input(volume: Volume, data: np.ndarray, dtype) -> nib.Nifti1Image:
    header = volume.original_header.copy()
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(data, volume.original_affine, header=header)
    image.set_data_dtype(dtype)
    image.header.set_slope_inter(1.0, 0.0)  # results are stored as they are, never rescaled
    return image


def _save(image, path: str | Path) -> Path:
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        raise OutputError(f"{path}: a NIfTI output needs a .nii or .nii.gz name")
    with atomic_path(path) as temporary:
        nib.save(image, temporary)
    return path


def _check_grid(volume: Volume, shape: tuple[int, ...], what: str) -> None:
    if tuple(shape) != volume.shape:
        raise OutputError(f"{what} of shape {tuple(shape)} do not fit the canonical grid {volume.shape} "
                          f"of {volume.source_path}")


def _label_dtype(labels: np.ndarray):
    if labels.size and (labels.min() < 0 or not np.issubdtype(labels.dtype, np.integer)):
        raise OutputError("labels must be non-negative integers")
    largest = int(labels.max(initial=0))
    return np.uint8 if largest <= 255 else np.int16 if largest <= 32767 else np.int32


def _json_numbers(values: Sequence[float] | None) -> list[float | None]:
    return [None if v is None or not math.isfinite(float(v)) else float(v)
            for v in (values if values is not None else [])]


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else ".nii" if name.endswith(".nii") else path.suffix

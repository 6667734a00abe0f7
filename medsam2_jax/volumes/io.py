"""Reading medical volumes and 2D images into one canonical form.

Every 3D input becomes a `Volume` whose array is in RAS+ voxel order (the closest canonical
orientation nibabel knows: axis 0 runs towards the patient's Right, 1 Anterior, 2 Superior), so
"axial slice k" means the same thing for every file. The `Volume` keeps what is needed to put a
result back on the input's own voxel grid: the orientation transform, the original shape,
affine and header (see `Volume.to_original` and `output.py`).

Every failure on the way in is a `VolumeError` whose one-line message names the file, the
problem and what to do about it.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from medsam2_jax.volumes import dicom
from medsam2_jax.volumes.volume import (  # noqa: F401  (re-exported: the readers' public types)
    CANONICAL_AXCODES,
    LPS_TO_RAS,
    Volume,
    VolumeError,
    check_voxels,
    make_volume,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_2D_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

def loads_json(text: str):
    """`json.loads` for what users write (prompt files, manifests): NaN and Infinity, which Python
    reads but JSON does not have (nor could a strict-JSON output repeat them), are a ValueError."""

    def refuse(name):
        raise ValueError(f"{name} is not a JSON number (JSON has no NaN or Infinity); write a number")

    return json.loads(text, parse_constant=refuse)


def load_volume(path: str | Path) -> Volume:
    """Reads a 3D NIfTI file, a DICOM series folder or a multi-frame DICOM file."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder; check the path")
    if path.is_dir():
        return dicom.load_dicom_series(path)
    if _has_suffix(path, NIFTI_SUFFIXES):
        return load_nifti(path)
    if _has_suffix(path, DICOM_SUFFIXES) or _looks_like_dicom(path):
        return dicom.load_dicom_file(path)
    if _has_suffix(path, IMAGE_2D_SUFFIXES):
        raise VolumeError(f"{path}: a 2D image where a 3D volume is needed; give a NIfTI file or a DICOM series folder")
    raise VolumeError(f"{path}: not a medical image this tool reads; give a .nii/.nii.gz file or a DICOM series folder")


def load_nifti(path: str | Path) -> Volume:
    """Reads a NIfTI volume in any orientation; a 4D file holding one volume is accepted."""
    path = Path(path)
    image = _open_nifti(path)
    data = _read_nifti_data(image, path)
    data = _squeeze_to_3d(data, path)
    return make_volume(
        data,
        np.asarray(image.affine, dtype=np.float64),
        source_path=path,
        source_format="nifti",
        original_header=image.header,
        original_shape=tuple(image.shape),
    )


def load_label_volume(path: str | Path, reference: Volume) -> np.ndarray:
    """Reads an integer label NIfTI on the grid of `reference` and returns it in canonical order.

    An all-zero label volume is allowed here (the caller decides whether that is an error).
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file; check the path of the label volume")
    image = _open_nifti(path)
    data = _squeeze_to_3d(_read_nifti_data(image, path), path)
    if (data.shape != reference.original_shape[:3]
            or not np.allclose(image.affine, reference.original_affine, atol=1e-3)):
        raise VolumeError(
            f"{path}: label grid {data.shape} does not match the image {reference.source_path} "
            f"{reference.original_shape[:3]}; the labels must be drawn on the image's own grid"
        )
    if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
        raise VolumeError(f"{path}: label values must be whole numbers; give an integer label volume")
    return orientations.apply_orientation(np.round(data).astype(np.int32), reference.to_canonical)


def load_image_2d(path: str | Path) -> np.ndarray:
    """Reads a PNG, TIFF or JPEG image as float32 (H, W) grey or (H, W, 3) colour."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file; check the path")
    if not _has_suffix(path, IMAGE_2D_SUFFIXES):
        raise VolumeError(f"{path}: not a 2D image this tool reads; give a .png, .tif or .jpg file")
    try:
        image = _read_tiff(path) if _has_suffix(path, (".tif", ".tiff")) else _read_pil(path)
    except (OSError, ValueError, SyntaxError) as error:
        raise VolumeError(f"{path}: cannot be read as an image ({_first_line(error)}); check the file") from error
    return _as_2d_image(np.asarray(image), path)


def _as_2d_image(image: np.ndarray, path: Path) -> np.ndarray:
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]  # alpha carries no anatomy
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 3 and image.shape[-1] != 3:
        raise VolumeError(f"{path}: a stack of {image.shape[0]} images where one 2D image is needed; "
                          "split it into single images")
    if image.ndim not in (2, 3):
        raise VolumeError(f"{path}: has {image.ndim} dimensions where a 2D image is needed; give a single 2D image")
    image = image.astype(np.float32)
    check_voxels(image, path)
    return image


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(path)


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("L", "RGB", "RGBA", "I", "I;16", "F"):
            image = image.convert("RGB")  # palette, CMYK, YCbCr, ...: make them plain colour
        return np.asarray(image)


def _open_nifti(path: Path):
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for a file that is not NIfTI
        raise VolumeError(f"{path}: not a readable NIfTI file ({_first_line(error)}); check the file") from error
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"{path}: a {type(image).__name__}, not NIfTI; convert it to NIfTI")
    return image


def _read_nifti_data(image, path: Path) -> np.ndarray:
    try:
        data = np.asarray(image.dataobj)  # applies the header's scale slope and intercept
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as error:
        raise VolumeError(
            f"{path}: the file is truncated or corrupt ({_first_line(error)}); copy or export it again"
        ) from error
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating) or data.dtype == bool):
        raise VolumeError(f"{path}: voxels of type {data.dtype} (colour or complex values); give a greyscale volume")
    return data


def _squeeze_to_3d(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim > 3 and all(n == 1 for n in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim > 3:
        raise VolumeError(
            f"{path}: a {data.ndim}D image of shape {data.shape} where one 3D volume is needed; "
            "extract a single volume first"
        )
    if data.ndim < 3 or min(data.shape) < 2:
        raise VolumeError(
            f"{path}: a 2D image of shape {data.shape} where a 3D volume is needed; use the 2D path or give a 3D volume"
        )
    return data


def _looks_like_dicom(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble, whatever their name."""
    try:
        with open(path, "rb") as file:
            return file.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(suffixes)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__

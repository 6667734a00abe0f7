"""Real medical images that ship inside Debian and PyPI packages (shared/DATA.md).

`scripts/install_data.sh` installs them; each function here finds one file, checks its SHA-256
against the sum recorded when the data was chosen, and returns its path. A missing file is a
`DatasetMissingError` naming the install command; a changed file is a `DatasetChecksumError`.
The InVesalius head CT ships in InVesalius' own project format and is converted once to NIfTI in
the cache folder (~/.cache/medsam2_jax, or $MEDSAM2_JAX_CACHE).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import plistlib
import tarfile
import tempfile
from pathlib import Path

import numpy as np

INSTALL_COMMAND = "bash scripts/install_data.sh"

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")
ITK_EXAMPLES = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
INVESALIUS_EXAMPLES = Path("/usr/share/doc/invesalius-examples/examples")

SHA256 = {
    "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz":
        "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
    "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz":
        "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed",
    "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz":
        "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db",
    "ch2.nii.gz": "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309",
    "ch2bet.nii.gz": "592a2d20abdf36eefcb540ca8958428040edffc1bc1a18ba1dcfbabac77c5dd1",
    "aal.nii.gz": "b512dcd3f36b77f56be7a9a038134096e66314b7e8c31d25875b96bcf6991454",
    "brodmann.nii.gz": "23ddedf2867c2bb857762a901b4f57f453139e41ffcdfc54a070fcaa3432d1f9",
    "img2d.tif": "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
    "mask2d.tif": "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f",
    "img3d.tif": "f5626d500c7a738cd321698f43df36e2ac149d98456579c5cbcf8af48c7253e8",
    "mask3d.tif": "a2ff51b712941a90cf3a5628b11f04f5d7fa3f29c808c065d3be6ff938b215a1",
    "Cranium.inv3": "3b34f11f7c4f557f4c65cd6543c412a2f6ceb0cfecfd9c41184420e02d9b7e2a",
    "KmeansTest_T1UCharRaw.nii.gz": "e0e5975587f3f7916804bdd317c493cdb99cdb3703bf2671d458528f62510327",
    "KmeansTest_T1RawSkullStrip.nii.gz": "f3ca85fa9559f7cc4b7c3ca862355cf0e7351505bdc62e3144b7fe6f6da37f3b",
    "MR-SIEMENS-DICOM-WithOverlays.dcm": "094faf56c63bff84c30567e29de0c67d7c5a8ae05cf880ac12175491b6b645d2",
}

DICOM_TEST_FILES = ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm")


class DatasetMissingError(FileNotFoundError):
    """A data file is not installed."""


class DatasetChecksumError(ValueError):
    """A data file is installed but is not the file the project was tested with."""


def cache_dir() -> Path:
    return Path(os.environ.get("MEDSAM2_JAX_CACHE", Path.home() / ".cache" / "medsam2_jax"))


# Colin27 single-subject T1 and its atlases, all on one 181x217x181 1 mm grid (Debian mricron-data).
def colin27() -> Path:
    return _verified(MRICRON_TEMPLATES / "ch2.nii.gz")


def colin27_brain() -> Path:
    return _verified(MRICRON_TEMPLATES / "ch2bet.nii.gz")


def aal() -> Path:
    return _verified(MRICRON_TEMPLATES / "aal.nii.gz")


def brodmann() -> Path:
    return _verified(MRICRON_TEMPLATES / "brodmann.nii.gz")


# MNI152 2009a template bundled with nilearn (pip install --no-deps nilearn; never imported).
def mni152_t1() -> Path:
    return _verified(_nilearn_data() / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


def mni152_gm() -> Path:
    return _verified(_nilearn_data() / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")


def mni152_wm() -> Path:
    return _verified(_nilearn_data() / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")


# Small T1 head stored LSA (Debian insighttoolkit5-examples): the non-RAS orientation case.
def itk_t1_lsa() -> Path:
    return _verified(ITK_EXAMPLES / "KmeansTest_T1UCharRaw.nii.gz")


def itk_t1_brainmask() -> Path:
    return _verified(ITK_EXAMPLES / "KmeansTest_T1RawSkullStrip.nii.gz")


# nibabel's own test data: always present where nibabel is (no recorded sum in DATA.md).
def nibabel_anatomical() -> Path:
    return _existing(_package_dir("nibabel") / "tests" / "data" / "anatomical.nii", "nibabel")


def nibabel_example4d() -> Path:
    return _existing(_package_dir("nibabel") / "tests" / "data" / "example4d.nii.gz", "nibabel")


def stardist_nuclei() -> tuple[Path, Path]:
    """(image, instance mask) of the 2D DSB2018 nuclei image from the stardist wheel."""
    images = cache_dir() / "stardist" / "data" / "images"
    return _verified(images / "img2d.tif"), _verified(images / "mask2d.tif")


def stardist_nuclei_3d() -> tuple[Path, Path]:
    images = cache_dir() / "stardist" / "data" / "images"
    return _verified(images / "img3d.tif"), _verified(images / "mask3d.tif")


def dicom_files() -> dict[str, Path]:
    """pydicom's offline test files by name: CT_small, MR_small, emri_small (10 frames) and the
    Siemens abdominal MR whose overlay outlines a liver lesion."""
    if importlib.util.find_spec("pydicom") is None:
        raise _missing("pydicom test files", "pydicom is not installed")
    from pydicom.data import get_testdata_file

    files = {}
    for name in DICOM_TEST_FILES:
        found = get_testdata_file(name)
        if found is None:
            raise _missing(name, "pydicom-data is not installed")
        files[name] = _verified(Path(found)) if name in SHA256 else Path(found)
    return files


def invesalius_ct() -> Path:
    """The InVesalius head CT (HU, 0.957 x 0.957 x 1.5 mm) as a NIfTI in the cache folder."""
    source = _verified(INVESALIUS_EXAMPLES / "Cranium.inv3")
    target = cache_dir() / "invesalius_cranium_ct_v2.nii.gz"
    if not target.exists():
        _convert_invesalius(source, target)
    return target


def _convert_invesalius(source: Path, target: Path) -> None:
    """Cranium.inv3 is a gzip'd tar: main.plist (shape, spacing) and matrix.dat, a raw int16
    (z, y, x) array. InVesalius stores the DICOM rows flipped: row index grows towards anterior
    (the face and the couch show it), slices grow superior. Columns are taken to grow towards
    the patient's left as in DICOM; a symmetric head cannot confirm left from right."""
    import nibabel as nib

    with tarfile.open(source) as archive:
        members = {Path(m.name).name: m for m in archive.getmembers()}
        main = plistlib.loads(archive.extractfile(members["main.plist"]).read())
        raw = archive.extractfile(members[main["matrix"]["filename"]]).read()
    shape = tuple(main["matrix"]["shape"])
    hounsfield = np.frombuffer(raw, dtype=np.dtype(main["matrix"]["dtype"]).newbyteorder("<")).reshape(shape)
    volume_xyz = np.ascontiguousarray(hounsfield.transpose(2, 1, 0)).astype(np.int16)
    spacing_xyz = [float(s) for s in main["spacing"]]
    affine = np.diag([-spacing_xyz[0], spacing_xyz[1], spacing_xyz[2], 1.0])
    image = nib.Nifti1Image(volume_xyz, affine)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    target.parent.mkdir(parents=True, exist_ok=True)
    _save_atomically(image, target)


def _save_atomically(image, target: Path) -> None:
    import nibabel as nib

    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".nii.gz")
    os.close(handle)
    try:
        nib.save(image, temporary)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _nilearn_data() -> Path:
    return _package_dir("nilearn") / "datasets" / "data"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise _missing(name, f"the Python package {name} is not installed")
    return Path(spec.origin).parent


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise _missing(what, f"{path} does not exist")
    return path


def _verified(path: Path) -> Path:
    _existing(path, path.name)
    expected = SHA256[path.name]
    actual = _sha256(path, path.stat().st_mtime_ns, path.stat().st_size)
    if actual != expected:
        raise DatasetChecksumError(
            f"{path}: SHA-256 {actual[:12]}... is not the expected {expected[:12]}...; "
            f"reinstall it with {INSTALL_COMMAND}"
        )
    return path


@functools.cache
def _sha256(path: Path, mtime_ns: int, size: int) -> str:
    """Hashed once per file version (mtime and size are part of the cache key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _missing(what: str, why: str) -> DatasetMissingError:
    return DatasetMissingError(f"{what}: {why}; install the offline data with {INSTALL_COMMAND}")

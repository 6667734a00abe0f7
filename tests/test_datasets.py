"""medsam2_jax.datasets: every file of shared/DATA.md is found and verified; missing or changed
files are clear errors naming the install command."""

import nibabel as nib
import numpy as np
import pytest

from medsam2_jax import datasets


@pytest.mark.parametrize("name, shape", [
    ("colin27", (181, 217, 181)), ("colin27_brain", (181, 217, 181)), ("aal", (181, 217, 181)),
    ("brodmann", (181, 217, 181)), ("mni152_t1", (197, 233, 189)), ("mni152_gm", (197, 233, 189)),
    ("mni152_wm", (197, 233, 189)), ("itk_t1_lsa", (128, 128, 62)), ("itk_t1_brainmask", (128, 128, 62)),
    ("nibabel_anatomical", (33, 41, 25)), ("nibabel_example4d", (128, 96, 24, 2)),
])
def test_nifti_files_are_found_and_verified(name, shape):
    path = getattr(datasets, name)()
    assert nib.load(path).shape == shape


def test_aal_holds_its_116_regions():
    values = np.unique(np.asarray(nib.load(datasets.aal()).dataobj))
    assert len(values) == 117 and values.max() == 116


def test_stardist_and_dicom_files():
    image, mask = datasets.stardist_nuclei()
    assert image.name == "img2d.tif" and mask.name == "mask2d.tif"
    files = datasets.dicom_files()
    assert set(files) == set(datasets.DICOM_TEST_FILES) and all(p.is_file() for p in files.values())


def test_invesalius_ct_converts_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSAM2_JAX_CACHE", str(tmp_path))
    path = datasets.invesalius_ct()
    assert path.parent == tmp_path and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    image = nib.load(path)
    assert image.shape == (256, 256, 108) and image.get_data_dtype() == np.int16
    np.testing.assert_allclose(image.header.get_zooms(), (0.9570312, 0.9570312, 1.5), rtol=1e-6)
    data = np.asarray(image.dataobj)
    assert data.min() == -1024 and data.max() == 2986
    modified = path.stat().st_mtime_ns
    assert datasets.invesalius_ct() == path and path.stat().st_mtime_ns == modified  # not converted again


def test_missing_file_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "MRICRON_TEMPLATES", tmp_path)
    with pytest.raises(datasets.DatasetMissingError) as error:
        datasets.colin27()
    message = str(error.value)
    assert "ch2.nii.gz" in message and datasets.INSTALL_COMMAND in message and "\n" not in message


def test_changed_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / "ch2.nii.gz").write_bytes(b"a different file")
    monkeypatch.setattr(datasets, "MRICRON_TEMPLATES", tmp_path)
    with pytest.raises(datasets.DatasetChecksumError, match="SHA-256"):
        datasets.colin27()


def test_missing_python_package(monkeypatch):
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(datasets.DatasetMissingError, match="nilearn is not installed"):
        datasets.mni152_t1()

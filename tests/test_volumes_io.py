"""volumes.io and volumes.dicom on the real volumes of shared/DATA.md and on broken inputs."""

import random

import nibabel as nib
import numpy as np
import pytest

from medsam2_jax import datasets
from medsam2_jax.volumes import io, output
from medsam2_jax.volumes.io import VolumeError


@pytest.fixture(scope="module")
def itk_t1():
    return io.load_volume(datasets.itk_t1_lsa())


def assert_one_line_naming(error_info, path, *words):
    message = str(error_info.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message


def save_nifti(data, path, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


# Real volumes -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, shape, axcodes", [
    ("colin27", (181, 217, 181), "RAS"),
    ("mni152_t1", (197, 233, 189), "RAS"),
    ("itk_t1_lsa", (128, 62, 128), "LSA"),
    ("nibabel_anatomical", (33, 41, 25), "LAS"),
    ("invesalius_ct", (256, 256, 108), "LAS"),
])
def test_real_volumes_load_canonical(name, shape, axcodes):
    volume = io.load_volume(getattr(datasets, name)())
    assert volume.shape == shape
    assert "".join(volume.original_axcodes) == axcodes
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    assert volume.array.dtype == np.float32


def test_lsa_volume_world_coordinates_survive_reorientation(itk_t1):
    """Every voxel keeps its world position: original affine @ file index == canonical affine @
    canonical index, and the intensity there is the same."""
    original = np.asarray(nib.load(itk_t1.source_path).dataobj)
    rng = np.random.default_rng(0)
    file_indices = rng.integers(0, original.shape, size=(50, 3))
    canonical = np.rint(itk_t1.original_to_canonical_index(file_indices)).astype(int)
    world_from_file = nib.affines.apply_affine(itk_t1.original_affine, file_indices)
    world_from_canonical = nib.affines.apply_affine(itk_t1.affine, canonical)
    np.testing.assert_allclose(world_from_canonical, world_from_file, atol=1e-4)
    np.testing.assert_array_equal(itk_t1.array[tuple(canonical.T)], original[tuple(file_indices.T)])


def test_to_original_inverts_canonical(itk_t1):
    original = np.asarray(nib.load(itk_t1.source_path).dataobj)
    np.testing.assert_array_equal(itk_t1.to_original(itk_t1.array), original)
    assert itk_t1.spacing == (2.0, 3.0, 2.0)  # R-L 2 mm, A-P 3 mm, S-I 2 mm


def test_label_volume_on_the_image_grid(itk_t1):
    mask = io.load_label_volume(datasets.itk_t1_brainmask(), itk_t1)
    assert mask.shape == itk_t1.shape and mask.dtype == np.int32
    stored = np.asarray(nib.load(datasets.itk_t1_brainmask()).dataobj)
    for value in (0, 4, 5, 6):  # the skull strip holds these class values
        assert np.count_nonzero(mask == value) == np.count_nonzero(stored == value) > 0


def test_label_volume_on_another_grid_is_rejected(itk_t1):
    with pytest.raises(VolumeError, match="does not match"):
        io.load_label_volume(datasets.aal(), itk_t1)


# Bad input: each a one-line VolumeError naming the file ------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "absent.nii.gz"
    with pytest.raises(VolumeError) as error:
        io.load_volume(path)
    assert_one_line_naming(error, path, "no such file")


@pytest.mark.parametrize("name, content", [("notes.nii.gz", b"not an image at all" * 20),
                                           ("notes.nii", b"not an image at all" * 20),
                                           ("notes.txt", b"plain text")])
def test_not_an_image(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(VolumeError) as error:
        io.load_volume(path)
    assert_one_line_naming(error, path)


def test_truncated_nifti_gz(tmp_path):
    whole = datasets.itk_t1_lsa().read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(VolumeError) as error:
        io.load_volume(path)
    assert_one_line_naming(error, path, "truncated")


def test_2d_nifti_where_3d_is_needed(tmp_path):
    path = save_nifti(np.arange(64 * 64, dtype=np.float32).reshape(64, 64), tmp_path / "slice.nii.gz")
    with pytest.raises(VolumeError) as error:
        io.load_volume(path)
    assert_one_line_naming(error, path, "2D")


def test_single_slice_volume_is_2d(tmp_path):
    path = save_nifti(np.arange(64 * 64, dtype=np.float32).reshape(64, 64, 1), tmp_path / "one_slice.nii.gz")
    with pytest.raises(VolumeError, match="2D"):
        io.load_volume(path)


def test_png_where_3d_is_needed(tmp_path):
    from PIL import Image

    path = tmp_path / "slice.png"
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(path)
    with pytest.raises(VolumeError) as error:
        io.load_volume(path)
    assert_one_line_naming(error, path, "2D")


def test_real_4d_is_rejected():
    path = datasets.nibabel_example4d()
    with pytest.raises(VolumeError) as error:
        io.load_volume(path)
    assert_one_line_naming(error, path, "4D")


def test_4d_with_one_volume_is_accepted(tmp_path):
    source = nib.load(datasets.nibabel_anatomical())
    data = np.asarray(source.dataobj)
    path = tmp_path / "one_volume.nii.gz"
    nib.save(nib.Nifti1Image(data[..., None], source.affine), path)
    volume = io.load_volume(path)
    assert volume.shape == (33, 41, 25)
    assert volume.original_shape == (33, 41, 25, 1)
    assert volume.to_original(volume.array).shape == (33, 41, 25, 1)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(tmp_path, bad_value):
    data = np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float32)
    data[3, 4, 5] = bad_value
    path = save_nifti(data, tmp_path / "bad.nii.gz")
    with pytest.raises(VolumeError) as error:
        io.load_volume(path)
    assert_one_line_naming(error, path, "NaN or Inf")


def test_voxels_beyond_float32_are_refused(tmp_path):
    # float64 data the model's float32 cannot hold (a fuzz run found them becoming NaN inputs)
    data = np.random.default_rng(0).normal(size=(8, 9, 10))
    data[3, 4, 5] = 1e300
    path = save_nifti(data, tmp_path / "huge.nii.gz")
    with pytest.raises(VolumeError) as error:
        io.load_volume(path)
    assert_one_line_naming(error, path, "1 voxels", "float32 range")


def test_constant_volume(tmp_path):
    path = save_nifti(np.full((8, 9, 10), 7, np.int16), tmp_path / "flat.nii.gz")
    with pytest.raises(VolumeError) as error:
        io.load_volume(path)
    assert_one_line_naming(error, path, "same value")


@pytest.mark.parametrize("affine, words", [
    (np.diag([1.0, np.nan, 1.0, 1.0]), "NaN, Inf or overflowing"),
    (np.diag([1.0, 1e308, 1e308, 1.0]), "NaN, Inf or overflowing"),
    (np.diag([1.0, 0.0, 1.0, 1.0]), "singular"),  # a voxel axis with no size
    (np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), "singular"),  # two along one direction
])
def test_an_affine_that_places_no_voxel(tmp_path, affine, words):
    """nibabel reads such a header; orienting it raised LinAlgError or ValueError (found by fuzzing)."""
    path = tmp_path / "bad_affine.nii"
    image = nib.Nifti1Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), np.eye(4))
    image.header["sform_code"], image.header["qform_code"] = 1, 0
    nib.save(image, path)
    header = nib.Nifti1Header.from_fileobj(open(path, "rb"))
    for row, name in enumerate(("srow_x", "srow_y", "srow_z")):
        header[name] = affine[row]
    with open(path, "r+b") as file:
        file.write(header.binaryblock)
    with pytest.raises(VolumeError) as error:
        io.load_volume(path)
    assert_one_line_naming(error, path, words)


@pytest.mark.parametrize("dtype", [np.complex64, np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])])
def test_colour_or_complex_voxels(tmp_path, dtype):
    """Complex voxels lost their imaginary part silently; RGB24 ones raised TypeError."""
    data = np.zeros((4, 5, 6), dtype)
    path = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4), dtype=dtype), path)
    with pytest.raises(VolumeError) as error:
        io.load_volume(path)
    assert_one_line_naming(error, path, "colour or complex")


# DICOM -------------------------------------------------------------------------------------

def write_dicom_series(volume_path, folder, drop_slice=None):
    """Each slice along the file's third axis of a NIfTI -> one DICOM file, with LPS geometry
    from the NIfTI affine, written under shuffled names so only positions give the order."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    image = nib.load(volume_path)
    data = np.asarray(image.dataobj).astype(np.uint16)
    lps_affine = io.LPS_TO_RAS @ image.affine
    spacing = np.linalg.norm(lps_affine[:3, :3], axis=0)
    series_uid = generate_uid()
    names = list(range(data.shape[2]))
    random.Random(0).shuffle(names)
    for k in range(data.shape[2]):
        if k == drop_slice:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "MR", series_uid, k + 1
        ds.ImageOrientationPatient = [*(lps_affine[:3, 0] / spacing[0]), *(lps_affine[:3, 1] / spacing[1])]
        ds.ImagePositionPatient = list(nib.affines.apply_affine(lps_affine, [0, 0, k]))
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 2, -100
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T).tobytes()
        pydicom.dcmwrite(folder / f"IM{names[k]:04d}", ds, enforce_file_format=True)
    (folder / "README.txt").write_text("not DICOM; the reader must skip it")
    return folder


@pytest.fixture(scope="module")
def itk_t1_dicom_folder(tmp_path_factory):
    return write_dicom_series(datasets.itk_t1_lsa(), tmp_path_factory.mktemp("dicom"))


def test_dicom_series_matches_the_nifti_it_came_from(itk_t1, itk_t1_dicom_folder):
    volume = io.load_volume(itk_t1_dicom_folder)
    assert volume.source_format == "dicom" and volume.modality == "MR"
    np.testing.assert_allclose(volume.affine, itk_t1.affine, atol=1e-4)
    np.testing.assert_array_equal(volume.array, itk_t1.array * 2 - 100)  # rescale slope/intercept applied


def test_dicom_input_gets_nifti_with_its_geometry(tmp_path, itk_t1_dicom_folder):
    volume = io.load_volume(itk_t1_dicom_folder)
    labels = (volume.array > 300).astype(np.int32)
    written = nib.load(output.write_labels(volume, labels, tmp_path / "labels.nii.gz"))
    np.testing.assert_allclose(written.affine, volume.original_affine, atol=1e-5)
    assert written.header["sform_code"] == 1 and written.header["qform_code"] == 1
    np.testing.assert_array_equal(io.load_label_volume(tmp_path / "labels.nii.gz", volume), labels)


def test_dicom_series_with_a_missing_slice(tmp_path):
    folder = write_dicom_series(datasets.itk_t1_lsa(), tmp_path, drop_slice=30)
    with pytest.raises(VolumeError) as error:
        io.load_volume(folder)
    assert_one_line_naming(error, folder, "uneven gaps")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(VolumeError) as error:
        io.load_volume(tmp_path)
    assert_one_line_naming(error, tmp_path, "no DICOM")


def test_multi_frame_dicom_file():
    path = datasets.dicom_files()["emri_small.dcm"]
    volume = io.load_volume(path)
    assert volume.shape == (64, 64, 10)
    assert volume.modality == "MR"


def test_single_dicom_slice_where_3d_is_needed():
    path = datasets.dicom_files()["CT_small.dcm"]
    with pytest.raises(VolumeError) as error:
        io.load_volume(path)
    assert_one_line_naming(error, path, "single 2D DICOM slice")


@pytest.mark.parametrize("keyword, value, words", [
    ("ImageOrientationPatient", [1.0], "is not 6 finite numbers"),  # one value: a scalar, not a list
    ("ImageOrientationPatient", [1, 0, 0, 1, 0, 0], "no slice direction"),  # rows and columns one way
    ("ImagePositionPatient", [1.0, 2.0], "is not 3 finite numbers"),
    ("PixelSpacing", [0.0, 1.0], "is not 2 positive numbers"),
    ("PixelSpacing", [1.0], "is not 2 positive numbers"),
    ("RescaleSlope", "abc", "is not a finite number"),
    ("PixelData", b"\0" * 100, "cannot decode the DICOM pixel data"),  # shorter than Rows x Columns
])
def test_dicom_header_values_that_are_not_what_dicom_says(tmp_path, itk_t1_dicom_folder, keyword, value, words):
    """Each raised IndexError, TypeError or ValueError from numpy or pydicom (found by fuzzing)."""
    import shutil

    import pydicom

    folder = tmp_path / "series"
    shutil.copytree(itk_t1_dicom_folder, folder)
    first = sorted(p for p in folder.iterdir() if p.name.startswith("IM"))[0]
    dataset = pydicom.dcmread(first)
    if isinstance(value, str):  # as a scanner may write it: text where numbers belong
        dataset.add_new(pydicom.datadict.tag_for_keyword(keyword), "LO", value)
    else:
        setattr(dataset, keyword, value)
    dataset.save_as(first)
    with pytest.raises(VolumeError) as error:
        io.load_volume(folder)
    assert_one_line_naming(error, folder, keyword if keyword != "PixelData" else "", words)


# 2D images ---------------------------------------------------------------------------------

def test_stardist_tiff_loads_as_2d():
    image_path, mask_path = datasets.stardist_nuclei()
    image = io.load_image_2d(image_path)
    assert image.shape == (512, 512) and image.dtype == np.float32
    assert len(np.unique(io.load_image_2d(mask_path))) == 126  # 125 nuclei and background


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_2d_formats_round_trip(tmp_path, suffix):
    from PIL import Image

    pixels = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (20, 1))
    path = tmp_path / f"gradient{suffix}"
    Image.fromarray(pixels).save(path)
    image = io.load_image_2d(path)
    assert image.shape == pixels.shape
    np.testing.assert_allclose(image, pixels, atol=0 if suffix != ".jpg" else 8)


def test_3d_tiff_where_a_2d_image_is_needed():
    image_path, _ = datasets.stardist_nuclei_3d()
    with pytest.raises(VolumeError, match="stack of 31 images"):
        io.load_image_2d(image_path)


def test_2d_image_missing_or_wrong_kind(tmp_path):
    with pytest.raises(VolumeError, match="no such file"):
        io.load_image_2d(tmp_path / "absent.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(VolumeError, match="cannot be read"):
        io.load_image_2d(tmp_path / "broken.png")

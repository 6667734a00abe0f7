"""volumes.output: labels drawn in voxel space come back on the same voxels, world positions,
affine and header; atomic writes leave nothing behind when they fail."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from medsam2_jax import datasets
from medsam2_jax.volumes import io, output, prompts
from medsam2_jax.volumes.output import OutputError

# Header fields a label file changes on purpose; every other field must equal the input's.
CHANGED_FOR_LABELS = {"datatype", "bitpix", "scl_slope", "scl_inter", "intent_code", "cal_min", "cal_max"}



def assert_same_header(written, source, except_fields=CHANGED_FOR_LABELS):
    for field in written.keys():
        if field in except_fields:
            continue
        a, b = np.asarray(written[field]), np.asarray(source[field])
        same = np.array_equal(a, b, equal_nan=True) if a.dtype.kind == "f" else np.array_equal(a, b)
        assert same, f"header field {field}: {a} != {b}"


def draw_in_file_voxels(shape):
    """Two labelled boxes in the input file's own voxel indices."""
    drawn = np.zeros(shape[:3], np.uint8)
    x, y, z = shape[:3]
    drawn[x // 8 : x // 3, y // 5 : y // 2, z // 6 : z // 4] = 1
    drawn[x - 9 : x - 4, y - 6 : y - 2, z - 4 : z - 2] = 2  # small, near the far corner
    return drawn


@pytest.mark.parametrize("name", ["itk_t1_lsa", "colin27", "nibabel_anatomical", "invesalius_ct"])
def test_label_round_trip_on_real_volumes(tmp_path, name):
    source_path = getattr(datasets, name)()
    volume = io.load_volume(source_path)
    source = nib.load(source_path)
    drawn = draw_in_file_voxels(source.shape)
    drawn_path = tmp_path / "drawn.nii.gz"
    nib.save(nib.Nifti1Image(drawn, source.affine, source.header), drawn_path)

    canonical = io.load_label_volume(drawn_path, volume)  # what a pipeline works on
    written_path = output.write_labels(volume, canonical, tmp_path / "labels.nii.gz")
    written = nib.load(written_path)

    np.testing.assert_array_equal(np.asarray(written.dataobj), drawn)  # the same voxels
    np.testing.assert_array_equal(written.affine, source.affine)
    assert_same_header(written.header, source.header)
    assert written.header.get_intent()[0] == "label"
    for value in (1, 2):  # and the same world coordinates, through either grid
        world_in = nib.affines.apply_affine(source.affine, np.argwhere(drawn == value)).mean(axis=0)
        world_canonical = nib.affines.apply_affine(volume.affine, np.argwhere(canonical == value)).mean(axis=0)
        world_out = nib.affines.apply_affine(written.affine,
                                             np.argwhere(np.asarray(written.dataobj) == value)).mean(axis=0)
        np.testing.assert_allclose(world_canonical, world_in, atol=1e-4)
        np.testing.assert_allclose(world_out, world_in, atol=1e-4)
    assert sorted(os.listdir(tmp_path)) == ["drawn.nii.gz", "labels.nii.gz"]


def test_prompt_voxel_comes_back_labelled_in_the_file(tmp_path):
    """A point prompted in file voxel indices on the LSA T1, labelled on the canonical grid at the
    prompt's slice pixel, is written back at exactly that file voxel."""
    volume = io.load_volume(datasets.itk_t1_lsa())
    file_voxel = (40, 30, 50)
    prompt = prompts.build_prompts(volume, [{"id": 9, "points": [file_voxel]}]).prompts[0]
    x, y = np.rint(prompt.points[0]).astype(int)
    labels = np.zeros(volume.shape, np.int32)
    labels[y, x, prompt.slice_index] = 9  # axial slice: row = canonical axis 0, column = axis 1
    written = np.asarray(nib.load(output.write_labels(volume, labels, tmp_path / "l.nii.gz")).dataobj)
    assert list(zip(*np.nonzero(written))) == [file_voxel]


def test_4d_input_with_one_volume_gets_its_shape_back(tmp_path):
    source = nib.load(datasets.nibabel_anatomical())
    path = tmp_path / "one_volume.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[..., None], source.affine), path)
    volume = io.load_volume(path)
    written = nib.load(output.write_labels(volume, np.ones(volume.shape, np.int32), tmp_path / "l.nii.gz"))
    assert written.shape == (33, 41, 25, 1)


def test_segmentation_outputs_and_sidecar(tmp_path):
    volume = io.load_volume(datasets.itk_t1_lsa())
    volume_prompts = prompts.build_prompts(volume, [{"id": 1, "points": [[40, 30, 50]]},
                                                    {"id": 2, "points": [[60, 60, 40]]}])
    labels = np.zeros(volume.shape, np.int32)
    labels[20:40, 10:20, 30:40], labels[50:60, 30:40, 60:70] = 1, 2
    probabilities = np.stack([labels == 1, labels == 2], axis=-1).astype(np.float32)
    scores = {1: [float("nan")] + [0.5] * (volume.shape[2] - 1), 2: [1.0] * volume.shape[2]}
    paths = output.write_segmentation(volume, labels, tmp_path / "case.nii.gz", prompts=volume_prompts,
                                      config_name="sam2.1_hiera_tiny", checkpoint_hash="ab" * 32,
                                      slice_object_scores=scores, probabilities=probabilities)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.json", "case.nii.gz", "case_probabilities.nii.gz"]
    probability_image = nib.load(paths["probabilities"])
    assert probability_image.shape == (128, 128, 62, 2) and probability_image.get_data_dtype() == np.float32
    np.testing.assert_array_equal(probability_image.affine, volume.original_affine)
    sidecar = json.loads(paths["sidecar"].read_text())
    assert sidecar["config"] == "sam2.1_hiera_tiny" and sidecar["checkpoint_sha256"] == "ab" * 32
    assert sidecar["input"]["orientation"] == "LSA"
    assert sidecar["slice_object_scores"]["1"][:2] == [None, 0.5]
    assert [p["object_id"] for p in sidecar["prompts"]["prompts"]] == [1, 2]
    assert sidecar["outputs"]["labels"] == str(tmp_path / "case.nii.gz")


# Unwritable outputs: one clear error, nothing left behind ----------------------------------

@pytest.fixture(scope="module")
def small_volume():
    return io.load_volume(datasets.nibabel_anatomical())


def test_missing_output_folder(tmp_path, small_volume):
    target = tmp_path / "no_such_folder" / "labels.nii.gz"
    with pytest.raises(OutputError, match="does not exist") as error:
        output.write_labels(small_volume, np.ones(small_volume.shape, np.int32), target)
    assert "\n" not in str(error.value)
    assert not target.parent.exists()


def test_output_folder_is_a_file(tmp_path, small_volume):
    (tmp_path / "plain_file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        output.write_labels(small_volume, np.ones(small_volume.shape, np.int32), tmp_path / "plain_file" / "l.nii.gz")


def test_folder_the_kernel_refuses(small_volume):
    """/proc takes no new files even from root, so this is unwritable wherever tests run."""
    with pytest.raises(OutputError, match="/proc"):
        output.write_labels(small_volume, np.ones(small_volume.shape, np.int32), "/proc/medsam2_jax_labels.nii.gz")
    assert not os.path.exists("/proc/medsam2_jax_labels.nii.gz")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; /proc covers that case")
def test_read_only_folder(tmp_path, small_volume):
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            output.write_labels(small_volume, np.ones(small_volume.shape, np.int32), tmp_path / "l.nii.gz")
    finally:
        tmp_path.chmod(0o755)
    assert list(tmp_path.iterdir()) == []


def test_a_write_failing_halfway_leaves_nothing(tmp_path, small_volume, monkeypatch):
    def write_half_then_fail(image, path):
        with open(path, "wb") as file:
            file.write(b"\x1f\x8b partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", write_half_then_fail)
    with pytest.raises(OutputError, match="No space left"):
        output.write_labels(small_volume, np.ones(small_volume.shape, np.int32), tmp_path / "l.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_sidecar_removes_the_labels_already_written(tmp_path, small_volume, monkeypatch):
    volume_prompts = prompts.build_prompts(small_volume, [{"id": 1, "points": [[5, 5, 5]]}])

    def failing_sidecar(*args, **kwargs):
        raise OutputError("disk full")

    monkeypatch.setattr(output, "write_sidecar", failing_sidecar)
    with pytest.raises(OutputError):
        output.write_segmentation(small_volume, np.ones(small_volume.shape, np.int32), tmp_path / "case.nii.gz",
                                  prompts=volume_prompts, config_name="c", checkpoint_hash=None)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_is_replaced_whole(tmp_path, small_volume):
    target = tmp_path / "l.nii.gz"
    target.write_bytes(b"old")
    output.write_labels(small_volume, np.ones(small_volume.shape, np.int32), target)
    assert nib.load(target).shape == (33, 41, 25)
    assert sorted(os.listdir(tmp_path)) == ["l.nii.gz"]


@pytest.mark.parametrize("labels, message", [(np.ones((3, 3, 3), np.int32), "do not fit"),
                                             (None, "non-negative integers")])
def test_bad_label_arrays(tmp_path, small_volume, labels, message):
    labels = -np.ones(small_volume.shape, np.int32) if labels is None else labels
    with pytest.raises(OutputError, match=message):
        output.write_labels(small_volume, labels, tmp_path / "l.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_output_name_must_be_nifti(tmp_path, small_volume):
    with pytest.raises(OutputError, match=".nii or .nii.gz"):
        output.write_labels(small_volume, np.ones(small_volume.shape, np.int32), tmp_path / "labels.png")

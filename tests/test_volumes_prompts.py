"""volumes.prompts: coordinate spaces on the LSA T1, seed labels from AAL, JSON files, errors."""

import json

import nibabel as nib
import numpy as np
import pytest

from medsam2_jax import datasets
from medsam2_jax.volumes import io, prompts
from medsam2_jax.volumes.prompts import PromptError


@pytest.fixture(scope="module")
def itk_t1():
    return io.load_volume(datasets.itk_t1_lsa())


@pytest.fixture(scope="module")
def colin27():
    return io.load_volume(datasets.colin27())


def only_prompt(volume_prompts):
    assert len(volume_prompts.prompts) == 1
    return volume_prompts.prompts[0]


def test_voxel_and_world_points_land_on_the_same_canonical_voxel(itk_t1):
    """On an LSA file: a point given as file voxel indices, as RAS mm and as LPS mm is the same
    axial slice and pixel, and that pixel's world position is the point's."""
    file_index = np.array([[40.0, 30.0, 50.0]])
    world = nib.affines.apply_affine(itk_t1.original_affine, file_index)
    by_space = {
        "voxel": file_index,
        "world": world,
        "world_lps": world * np.array([-1, -1, 1]),
    }
    results = [only_prompt(prompts.build_prompts(itk_t1, [{"id": 1, "points": c.tolist()}], space=s))
               for s, c in by_space.items()]
    for result in results:
        assert result.slice_index == results[0].slice_index
        np.testing.assert_allclose(result.points, results[0].points, atol=1e-4)
    # slice k along axial (axis 2): x = column = canonical axis 1, y = row = canonical axis 0
    x, y = results[0].points[0]
    canonical = np.array([y, x, results[0].slice_index])
    np.testing.assert_allclose(nib.affines.apply_affine(itk_t1.affine, canonical), world[0], atol=1e-4)


def test_file_axis_maps_to_canonical_axis(itk_t1):
    # LSA: the file's third axis runs anterior, so "@Z" slices of this file are coronal.
    assert [prompts.canonical_axis_of_file_axis(itk_t1, a) for a in range(3)] == [0, 2, 1]


def test_box_in_voxel_space_on_a_coronal_slice(itk_t1):
    box = [[20, 10, 40], [90, 50, 40]]  # file (i, j, k): L, S, A; both corners on file slice k=40
    result = prompts.build_prompts(itk_t1, [{"id": 2, "boxes": [box]}], axis="coronal")
    prompt = only_prompt(result)
    corners = itk_t1.original_to_canonical_index(np.array(box))
    assert prompt.slice_index == round(corners[0, 1])
    np.testing.assert_allclose(prompt.box, [*corners[:, [2, 0]].min(axis=0), *corners[:, [2, 0]].max(axis=0)])
    assert result.slice_shape == (128, 128) and result.num_slices == 62


def test_points_on_several_slices_and_a_box_merge_per_slice(colin27):
    objects = [{"id": 5, "name": "putamen", "points": [[60, 110, 70], [62, 112, 70], [60, 110, 80]],
                "point_labels": [1, 0, 1], "boxes": [[[50, 100, 70], [70, 125, 70]]]}]
    result = prompts.build_prompts(colin27, objects, space="canonical")
    assert result.prompted_slices(5) == (70, 80)
    first = result.prompts[0]
    assert first.box is not None and first.points.shape == (2, 2)
    np.testing.assert_array_equal(first.point_labels, [1, 0])
    assert result.object_names == {5: "putamen"}


def test_prompts_in_the_model_frame(colin27):
    result = prompts.build_prompts(colin27, [{"id": 1, "boxes": [[[0, 0, 90], [180, 216, 90]]]}], space="canonical")
    model = prompts.to_model_frame(result, 64)
    x0, y0, x1, y1 = model.prompts[0].box
    np.testing.assert_allclose([x0, y0, x1, y1], [0, 0, 216 * 64 / 217, 180 * 64 / 181], rtol=1e-6)
    assert model.slice_shape == (64, 64) and model.num_slices == 181


def test_seed_labels_prompt_each_object_on_its_largest_slice(colin27):
    aal = io.load_label_volume(datasets.aal(), colin27)
    seed = np.where(np.isin(aal, [37, 71, 77]), aal, 0)  # left hippocampus, caudate, thalamus
    result = prompts.prompts_from_seed_labels(colin27, seed, axis="axial")
    assert result.object_ids == (37, 71, 77)
    for prompt in result.prompts:
        per_slice = (seed == prompt.object_id).sum(axis=(0, 1))
        assert prompt.slice_index == per_slice.argmax()
        rows, cols = np.nonzero(seed[:, :, prompt.slice_index] == prompt.object_id)
        np.testing.assert_array_equal(prompt.box, [cols.min(), rows.min(), cols.max(), rows.max()])
    masks = prompts.prompts_from_seed_labels(colin27, seed, axis="coronal", prompt_with="mask")
    for prompt in masks.prompts:
        np.testing.assert_array_equal(prompt.mask, seed[:, prompt.slice_index, :] == prompt.object_id)
    scaled = prompts.to_model_frame(masks, 32).prompts[0].mask
    assert scaled.shape == (32, 32) and scaled.any()


def test_a_one_voxel_thin_seed_is_prompted_with_its_mask(colin27):
    seed = np.zeros(colin27.shape, np.int32)
    seed[50:60, 80, 90] = 3
    prompt = only_prompt(prompts.prompts_from_seed_labels(colin27, seed))
    assert prompt.box is None and prompt.mask.sum() == 10


def test_json_prompt_file(tmp_path, itk_t1):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({
        "version": 1, "space": "voxel", "axis": "coronal",
        "objects": [{"id": 1, "name": "brain", "boxes": [[[20, 10, 40], [90, 50, 40]]]},
                    {"id": 2, "points": [[40, 30, 50]], "point_labels": [1]}],
    }))
    result = prompts.load_prompt_file(path, itk_t1)
    assert result.object_ids == (1, 2) and result.axis == 1
    assert result.object_names[1] == "brain"
    summary = result.to_json()
    json.dumps(summary)  # ready for the sidecar
    assert summary["axis"] == "coronal" and len(summary["prompts"]) == 2


# Errors: each a one-line PromptError -------------------------------------------------------

@pytest.mark.parametrize("objects, space, message", [
    ([{"id": 1, "points": [[40, 30, 500]]}], "voxel", "outside the volume"),
    ([{"id": 1, "points": [[-1, 30, 20]]}], "voxel", "outside the volume"),
    ([{"id": 1, "points": [[0, 0, 10_000]]}], "world", "outside the volume"),
    ([{"id": 1, "boxes": [[[20, 10, 40], [20, 50, 40]]]}], "voxel", "zero area"),
    ([{"id": 1, "boxes": [[[20, 10, 40], [90, 10, 40]]]}], "voxel", "zero area"),
    ([{"id": 1, "boxes": [[[20, 10, 10], [90, 50, 40]]]}], "voxel", "different coronal slices"),
    ([{"id": 1, "boxes": [[[20, 10, 40], [90, 50, 40]], [[30, 10, 40], [90, 50, 40]]]}], "voxel", "two boxes"),
    ([{"id": 1}], "voxel", "no points and no boxes"),
    ([{"id": 0, "points": [[1, 1, 1]]}], "voxel", "integer 'id' from 1"),
    ([{"id": 2**31, "points": [[1, 1, 1]]}], "voxel", "integer 'id' from 1 to 2147483647"),  # a label file's largest
    ([{"id": 1, "points": [[1, 1]]}], "voxel", "expected numbers"),
    ([{"id": 1, "points": [[1, 1, 1]], "point_labels": [2]}], "voxel", "0 or 1"),
    ([{"id": 1, "points": [[1, 1, 1]], "point_labels": [0.5]}], "voxel", "0 or 1"),
    ([{"id": 1, "points": [[1, 1, 1], [2, 2, 2]], "point_labels": [[], 0]}], "voxel", "0 or 1"),
    ([{"id": 1, "points": [[1, 1, 1]], "point_labels": [2**31]}], "voxel", "0 or 1"),
    ([{"id": 1, "boxes": True}], "voxel", "boxes must be a list"),
    ([{"id": 1, "points": [[1, 1, 1]]}, {"id": 1, "points": [[2, 2, 2]]}], "voxel", "given twice"),
    ([{"id": 1, "points": [[1, 1, 1]]}], "pixels", "unknown coordinate space"),
    ([], "voxel", "no objects"),
])
def test_bad_prompts(itk_t1, objects, space, message):
    with pytest.raises(PromptError, match=message) as error:
        prompts.build_prompts(itk_t1, objects, space=space, axis="coronal")
    assert "\n" not in str(error.value)


def test_unknown_axis(itk_t1):
    with pytest.raises(PromptError, match="unknown slice axis"):
        prompts.build_prompts(itk_t1, [{"id": 1, "points": [[1, 1, 1]]}], axis="oblique")


def test_empty_seed_label(itk_t1):
    with pytest.raises(PromptError, match="empty") as error:
        prompts.prompts_from_seed_labels(itk_t1, np.zeros(itk_t1.shape, np.int32))
    assert str(itk_t1.source_path) in str(error.value)


def test_seed_label_on_another_grid(itk_t1):
    with pytest.raises(PromptError, match="not the volume's"):
        prompts.prompts_from_seed_labels(itk_t1, np.ones((4, 4, 4), np.int32))


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"objects": 3}', "'objects' list"),
    ('{"version": 2, "objects": []}', "version 2"),
    ('{"objects": [{"id": 1, "points": [[1, 1, 999]]}]}', "outside the volume"),
    (b"\xff\xfe{}", "not text"),
    pytest.param("[" * 5000, "nested too deeply", id="5000-deep"),
])
def test_bad_prompt_files(tmp_path, itk_t1, content, message):
    path = tmp_path / "prompts.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PromptError, match=message) as error:
        prompts.load_prompt_file(path, itk_t1)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_prompt_file(tmp_path, itk_t1):
    with pytest.raises(PromptError, match="cannot read"):
        prompts.load_prompt_file(tmp_path / "absent.json", itk_t1)


# Tidied on the way in: done, and said in `notes` ---------------------------------------------

def test_a_box_given_high_corner_first_is_sorted_and_noted(itk_t1):
    ordered = prompts.build_prompts(itk_t1, [{"id": 1, "boxes": [[[20, 10, 40], [90, 50, 40]]]}], axis="coronal")
    flipped = prompts.build_prompts(itk_t1, [{"id": 1, "boxes": [[[90, 50, 40], [20, 10, 40]]]}], axis="coronal")
    x_only = prompts.build_prompts(itk_t1, [{"id": 1, "boxes": [[[90, 10, 40], [20, 50, 40]]]}], axis="coronal")
    assert ordered.notes == ()
    np.testing.assert_array_equal(only_prompt(flipped).box, only_prompt(ordered).box)
    assert flipped.notes == ("object 1: box corners given as X1<X0 and Y1<Y0; sorted",)
    assert x_only.notes == ("object 1: box corners given as X1<X0; sorted",)
    assert flipped.to_json()["notes"] == list(flipped.notes) and "notes" not in ordered.to_json()


def test_a_fractional_slice_is_rounded_in_the_users_numbering(itk_t1):
    """File x of this LSA volume runs right to left over 128 voxels (canonical 127 - x): slice
    40.5 rounded as given is 40 (canonical 87); rounded after the flip it would be canonical 86.5
    -> 86, file 41, not what the note says."""
    point = prompts.build_prompts(itk_t1, [{"id": 1, "points": [[40.5, 30, 50]]}], axis="sagittal")
    assert only_prompt(point).slice_index == 127 - 40
    assert point.notes == ("object 1: point slice 40.5 rounded to 40",)
    box = prompts.build_prompts(itk_t1, [{"id": 2, "boxes": [[[20, 10, 40.5], [90, 50, 40.5]]]}], axis="coronal")
    assert only_prompt(box).slice_index == 40 and box.notes == ("object 2: box slice 40.5 rounded to 40",)
    # Millimetres fall between slices as a matter of course: rounded to the nearest, unremarked.
    world = nib.affines.apply_affine(itk_t1.original_affine, [[40.2, 30, 50]])
    assert prompts.build_prompts(itk_t1, [{"id": 1, "points": world.tolist()}], space="world").notes == ()


def test_a_slice_range_beyond_any_slice_number_is_refused(tmp_path):
    """Millimetres on half-millimetre slices double: 1e308 mm overflows to an infinite slice,
    which is outside the volume like any other (not an OverflowError)."""
    volume = io.make_volume(np.arange(9 * 8 * 7, dtype=np.float32).reshape(9, 8, 7), np.diag([1, 1, 0.5, 1]),
                            source_path=tmp_path / "v.nii.gz", source_format="nifti")
    entry = {"id": 1, "boxes": [[[1, 1, 1], [4, 4, 1]]], "z_range": [0, 1e308]}
    with pytest.raises(PromptError, match=r"slice range 0:inf lies outside"):
        prompts.build_prompts(volume, [entry], space="world")
    box_only = prompts.build_prompts(volume, [dict(entry, z_range=None)], space="world")
    with pytest.raises(PromptError, match="lies outside"):
        prompts.with_slice_ranges(box_only, {1: [float("nan"), 3]})

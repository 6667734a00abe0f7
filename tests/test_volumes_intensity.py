"""volumes.intensity: CT windows on the InVesalius head CT (real HU), MR clipping, model frames."""

import numpy as np
import pytest

from medsam2_jax import datasets
from medsam2_jax.volumes import intensity, io


@pytest.fixture(scope="module")
def head_ct():
    return io.load_volume(datasets.invesalius_ct())


def test_head_ct_is_in_hounsfield_units(head_ct):
    assert head_ct.array.min() == -1024  # air outside the head (scanner floor value)
    assert head_ct.array.max() == 2986   # dense bone / teeth
    brain = head_ct.array[118:138, 118:138, 70]  # a patch in the middle of the brain
    assert 0 < np.median(brain) < 80


@pytest.mark.parametrize("window", sorted(intensity.CT_WINDOWS))
def test_named_window_maps_level_and_edges(head_ct, window):
    level, width = intensity.CT_WINDOWS[window]
    hu = head_ct.array
    unit = intensity.ct_window(hu, window)
    assert unit.dtype == np.float32 and unit.min() >= 0 and unit.max() <= 1
    assert np.all(unit[hu <= level - width / 2] == 0)
    assert np.all(unit[hu >= level + width / 2] == 1)
    inside = (hu > level - width / 2) & (hu < level + width / 2)
    np.testing.assert_allclose(unit[inside], (hu[inside] - (level - width / 2)) / width, atol=1e-6)


def test_standard_window_values():
    assert intensity.CT_WINDOWS == {
        "abdomen": (40, 400), "lung": (-600, 1500), "bone": (400, 1800), "brain": (40, 80), "soft_tissue": (50, 350),
    }


def test_explicit_level_width_equals_the_named_window(head_ct):
    np.testing.assert_array_equal(intensity.ct_window(head_ct.array, level=40, width=80),
                                  intensity.ct_window(head_ct.array, "brain"))


def test_bone_window_saturates_on_the_skull_only(head_ct):
    bright = intensity.ct_window(head_ct.array, "bone") == 1.0  # HU >= 1300: cortical bone, teeth
    fraction = bright.mean()
    assert 0.001 < fraction < 0.05
    assert intensity.ct_window(head_ct.array, "brain")[bright].min() == 1.0


def test_to_unit_range_chooses_window_or_percentiles(head_ct):
    np.testing.assert_array_equal(intensity.to_unit_range(head_ct.array, window="lung"),
                                  intensity.ct_window(head_ct.array, "lung"))
    np.testing.assert_array_equal(intensity.to_unit_range(head_ct.array), intensity.percentile_clip(head_ct.array))


@pytest.mark.parametrize("kwargs, message", [
    ({"window": "liver_special"}, "unknown CT window"),
    ({"level": 40}, "needs both"),
    ({"level": 40, "width": 0}, "must be positive"),
    ({"level": 40, "width": float("nan")}, "finite level and width"),  # the model saw NaN (found by fuzzing)
    ({"level": float("inf"), "width": 400}, "finite level and width"),
    ({"level": 1e308, "width": 1e308}, "finite level and width"),  # finite, but Inf as float32 intensities
    ({"window": "brain", "level": 40, "width": 80}, "not both"),
])
def test_bad_window_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        intensity.ct_window(np.zeros(3), **kwargs)


def test_mr_percentile_clip_on_colin27():
    t1 = io.load_volume(datasets.colin27()).array
    unit = intensity.percentile_clip(t1, 0.5, 99.5)
    assert unit.min() == 0 and unit.max() == 1
    assert 0.004 < np.mean(unit == 1) < 0.006  # the top 0.5 % saturate (uint8 ties add a little)
    high = np.percentile(t1, 99.5)
    assert np.all(unit[t1 >= high] == 1)


def test_model_input_frames():
    unit = np.random.default_rng(0).uniform(size=(10, 12, 7)).astype(np.float32)
    frames = intensity.slices_to_model_input(unit, axis=2, image_size=32)
    assert frames.shape == (7, 32, 32, 3)
    rgb = frames * intensity.IMAGENET_STD + intensity.IMAGENET_MEAN
    np.testing.assert_allclose(rgb[..., 0], rgb[..., 2], atol=1e-5)  # grey in every channel
    flat = intensity.slices_to_model_input(np.full((4, 5, 6), 0.25, np.float32), axis=0, image_size=16)
    np.testing.assert_allclose(flat, np.broadcast_to((0.25 - intensity.IMAGENET_MEAN) / intensity.IMAGENET_STD,
                                                     flat.shape), atol=1e-5)


def test_frames_follow_np_take_along_the_axis():
    unit = np.zeros((6, 8, 10), np.float32)
    unit[2, 3:5, 7] = 1.0  # a bright spot on frame 2 along axis 0
    frames = intensity.slices_to_model_input(unit, axis=0, image_size=8)
    rgb = frames[..., 0] * intensity.IMAGENET_STD[0] + intensity.IMAGENET_MEAN[0]
    assert rgb.sum(axis=(1, 2)).argmax() == 2
    row, col = np.unravel_index(rgb[2].argmax(), rgb[2].shape)
    assert 2 <= row <= 4 and 5 <= col <= 6  # rows follow axis 1 (8 -> 8), columns axis 2 (10 -> 8)


def test_probabilities_and_labels_back_to_slice_size():
    probabilities = np.random.default_rng(1).uniform(size=(3, 16, 16)).astype(np.float32)
    back = intensity.probabilities_to_slices(probabilities, (40, 24))
    assert back.shape == (3, 40, 24)
    assert back.min() >= probabilities.min() - 1e-6 and back.max() <= probabilities.max() + 1e-6
    labels = np.zeros((2, 8, 8), np.int32)
    labels[0, 2:6, 2:6], labels[1, 0:4, :] = 3, 7
    up = intensity.labels_to_slices(labels, (16, 24))
    assert up.shape == (2, 16, 24) and set(np.unique(up)) == {0, 3, 7}
    np.testing.assert_array_equal(up[:, ::2, ::3], labels)  # integer factors: pure replication
    np.testing.assert_array_equal(intensity.labels_to_slices(up, (8, 8)), labels)

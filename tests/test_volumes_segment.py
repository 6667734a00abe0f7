"""The merge rule of the 3D pipeline: the pass from the nearer prompt wins a slice."""

import numpy as np
from scipy.special import expit

from medsam2_jax.volumes.prompts import SlicePrompt, VolumePrompts
from medsam2_jax.volumes.segment import _labels, _merge_passes


def test_nearer_prompt_wins_and_ties_average_probabilities():
    n, h, w = 9, 2, 2
    prompts = VolumePrompts(2, n, (h, w), (SlicePrompt(1, 2, box=np.array([0, 0, 1, 1], np.float32)),
                                           SlicePrompt(1, 6, box=np.array([0, 0, 1, 1], np.float32))))
    forward = np.full((n, 1, h, w), np.nan, np.float32)
    backward = np.full((n, 1, h, w), np.nan, np.float32)
    forward[2:] = 1.0  # the forward pass starts at the first prompt
    backward[:7] = -3.0  # the backward pass starts at the last prompt
    merged = _merge_passes(forward, backward, prompts, [1])[:, 0, 0, 0]
    assert np.all(merged[:2] == -3.0)  # before the first prompt: only backward reached
    assert np.all(merged[7:] == 1.0)  # after the last: only forward
    assert merged[3] == 1.0 and merged[5] == -3.0  # nearer to slice 2, nearer to slice 6
    for tie in (2, 4, 6):  # prompted slices and the midpoint
        assert np.isclose(expit(merged[tie]), 0.5 * (expit(1.0) + expit(-3.0)), atol=1e-6)
    assert not np.isnan(merged).any()


def test_highest_positive_logit_wins_a_voxel():
    logits = np.array([[[[2.0]], [[3.0]]], [[[-1.0]], [[-0.5]]]], np.float32)  # (slices, objects, 1, 1)
    assert _labels(logits, [4, 7])[:, 0, 0].tolist() == [7, 0]


def test_a_box_on_the_first_slice_shows_the_decoders_answer(demo_predictor):
    """SAM 2 tracks nothing backward from frame 0; a prompt on the first tracked slice (slice 0,
    or the first of its --z-range) must still show the decoder's answer there, not an empty mask."""
    from pathlib import Path

    from medsam2_jax.tracker.predictor import Frames
    from medsam2_jax.volumes import intensity
    from medsam2_jax.volumes.io import make_volume
    from medsam2_jax.volumes.prompts import build_prompts
    from medsam2_jax.volumes.segment import segment_volume

    data = np.zeros((48, 48, 4), np.float32)
    data[14:34, 16:30] = 1.0
    volume = make_volume(data, np.eye(4), source_path=Path("blob.nii.gz"), source_format="nifti")
    unit = intensity.to_unit_range(volume.array)
    first_slice = Frames(1, lambda idx: intensity.slices_to_model_input(unit[:, :, [0]], 2, demo_predictor.image_size))
    state = demo_predictor.init_state(first_slice, normalized=True, video_hw=(48, 48))
    box = np.array([16, 14, 29, 33], np.float32)  # x = column, y = row
    _, _, answer = demo_predictor.add_new_points_or_box(state, 0, 1, box=box)
    assert (answer[0, 0] > 0).any()
    entry = {"id": 1, "boxes": [[[14, 16, 0], [33, 29, 0]]]}
    for z_range in (None, [0, 2]):
        prompts = build_prompts(volume, [dict(entry, z_range=z_range)], space="canonical")
        result = segment_volume(volume, prompts, demo_predictor)
        assert not np.isnan(result.probabilities).any()
        np.testing.assert_array_equal(result.labels[:, :, 0] == 1, answer[0, 0] > 0)

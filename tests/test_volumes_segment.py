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

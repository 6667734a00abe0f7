"""The prompt window (`segment --crop`): geometry, the round trip through it, and the real path.

At 128 px a whole brain slice leaves a small structure a few pixels of the model's 32 x 32 mask;
the window shows the model only a square `crop` x the prompts' extent, as the demo model was
trained (training.data `crop_prob`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medsam2_jax.volumes.prompts import SlicePrompt, VolumePrompts
from medsam2_jax.volumes.segment import Crop, prompt_crop


def _prompts(*slice_prompts, shape=(60, 80), n=10):
    return VolumePrompts(2, n, shape, tuple(slice_prompts))


def test_window_is_square_in_mm_centred_on_the_prompts_and_at_least_the_minimum():
    box = SlicePrompt(1, 4, box=np.array([20, 10, 29, 15], np.float32))  # x 20..29 (10 px), y 10..15 (6 px)
    # Rows 1 mm, columns 2 mm: the box is 6 mm x 20 mm; the window 3 x 20 = 60 mm a side.
    crop = prompt_crop(_prompts(box), (1.0, 2.0), 3.0, min_mm=0)
    assert (crop.height, crop.width) == (60, 30)
    assert crop.row + (crop.height - 1) / 2 == pytest.approx(12.5, abs=0.5)
    assert crop.col + (crop.width - 1) / 2 == pytest.approx(24.5, abs=0.5)
    assert (prompt_crop(_prompts(box), (1.0, 2.0), 1.0, min_mm=100)
            == Crop(crop.row + 30 - 50, crop.col + 15 - 25, 100, 50))
    # Points (negative clicks left out when there is a positive one) and masks count too.
    click = SlicePrompt(2, 4, points=np.array([[5, 5], [70, 50]], np.float32), point_labels=np.array([1, 0]))
    mask = np.zeros((60, 80), bool)
    mask[40:44, 60:62] = True
    both = prompt_crop(_prompts(click, SlicePrompt(3, 6, mask=mask)), (1.0, 1.0), 1.0, min_mm=0)
    assert (both.height, both.width) == (57, 57)  # x 5..61, y 5..43: 57 x 39 px
    with pytest.raises(ValueError, match="at least 1"):
        prompt_crop(_prompts(box), (1.0, 1.0), 0.5)


def test_slices_prompts_and_paste_agree_past_the_edges():
    rng = np.random.default_rng(0)
    unit = rng.random((50, 40, 7)).astype(np.float32)  # (X, Y, Z): axial slices are 50 x 40
    crop = Crop(row=-5, col=30, height=20, width=16)  # past the top edge and the right edge
    frames = crop.slices(unit, axis=2)
    assert frames.shape == (20, 16, 7)
    assert not frames[:5].any() and not frames[:, 10:].any()  # outside the volume: zero
    np.testing.assert_array_equal(frames[5:, :10], unit[:15, 30:40])
    back = crop.paste(np.moveaxis(frames, 2, 0), (50, 40), fill=-1.0)
    np.testing.assert_array_equal(back[:, :15, 30:], np.moveaxis(unit, 2, 0)[:, :15, 30:])
    assert (back[:, 15:] == -1).all() and (back[:, :, :30] == -1).all()
    mask = np.zeros((50, 40), bool)
    mask[3, 33] = True
    prompts = _prompts(SlicePrompt(1, 2, box=np.array([31, 2, 35, 6], np.float32)),
                       SlicePrompt(1, 3, points=np.array([[33, 3]], np.float32), point_labels=np.array([1])),
                       SlicePrompt(2, 2, mask=mask), shape=(50, 40))
    moved = crop.prompts(prompts)
    assert moved.slice_shape == (20, 16)
    box, click, seed = moved.prompts
    # The same voxel under the moved coordinates (x = column, y = row).
    assert frames[int(click.points[0, 1]), int(click.points[0, 0]), 3] == unit[3, 33, 3]
    assert box.box.tolist() == [1, 7, 5, 11]
    assert np.argwhere(seed.mask).tolist() == [[8, 3]]


def test_segment_volume_with_a_window_writes_nothing_outside_it(demo_predictor):
    """The real path with the shipped model: a box on a synthetic bright blob, a window 2x the
    box; the labels live on the whole grid and only inside the window."""
    from medsam2_jax.volumes.io import make_volume
    from medsam2_jax.volumes.prompts import build_prompts
    from medsam2_jax.volumes.segment import segment_volume

    data = np.zeros((96, 96, 12), np.float32)
    data[40:56, 40:60, 3:9] = 1.0
    volume = make_volume(data, np.eye(4), source_path=Path("blob.nii.gz"), source_format="nifti")
    prompts = build_prompts(volume, [{"id": 1, "boxes": [[[40, 40, 6], [55, 59, 6]]]}], space="canonical")
    result = segment_volume(volume, prompts, demo_predictor, crop=2.0)
    assert result.labels.shape == data.shape and result.probabilities.shape == (1, *data.shape)
    crop = prompt_crop(prompts, (1.0, 1.0), 2.0)
    inside = np.zeros(data.shape, bool)
    inside[max(crop.row, 0) : crop.row + crop.height, max(crop.col, 0) : crop.col + crop.width] = True
    assert result.labels[inside].any() and not result.labels[~inside].any()
    assert (result.probabilities[0][~inside] < 1e-6).all()

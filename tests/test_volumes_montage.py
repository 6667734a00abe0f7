"""volumes.montage: the PNG shows the anatomy, one contour colour per object and the prompts."""

import os

import numpy as np
import pytest
from PIL import Image

from medsam2_jax import datasets
from medsam2_jax.volumes import io, montage, prompts
from medsam2_jax.volumes.output import OutputError


@pytest.fixture(scope="module")
def colin27_with_seeds():
    volume = io.load_volume(datasets.colin27())
    aal = io.load_label_volume(datasets.aal(), volume)
    seeds = np.where(np.isin(aal, [71, 73, 77]), aal, 0)  # left caudate, putamen, thalamus
    return volume, seeds, prompts.prompts_from_seed_labels(volume, seeds)


def test_montage_slices_cover_the_labels_and_the_prompts():
    labels = np.zeros((5, 6, 40), np.int32)
    labels[..., 10:21] = 1
    assert montage.montage_slices(labels, 2, prompted=(3,), count=3) == [3, 10, 15, 20]
    assert montage.montage_slices(np.zeros((5, 6, 9)), 2, count=3) == [0, 4, 8]


def test_montage_png_shows_anatomy_contours_and_legend(tmp_path, colin27_with_seeds):
    volume, seeds, seed_prompts = colin27_with_seeds
    path = montage.write_montage(volume, seeds, tmp_path / "montage.png", prompts=seed_prompts,
                                 object_names={71: "caudate L", 73: "putamen L", 77: "thalamus L"})
    assert os.listdir(tmp_path) == ["montage.png"]
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    grey = (pixels[..., 0] == pixels[..., 1]) & (pixels[..., 1] == pixels[..., 2]) & (pixels[..., 0] > 40)
    assert grey.mean() > 0.1  # the brain slices
    for colour in [(31, 119, 180), (255, 127, 14), (44, 160, 44)]:  # tab10: one per object
        close = np.abs(pixels - np.array(colour)).sum(axis=-1) < 40
        assert close.sum() > 50, f"no contour drawn in {colour}"


def test_montage_of_a_point_prompt_on_the_ct(tmp_path):
    from medsam2_jax.volumes import intensity

    ct = io.load_volume(datasets.invesalius_ct())
    bone = (ct.array > 300).astype(np.int32)
    point = prompts.build_prompts(ct, [{"id": 1, "points": [[128, 128, 60]], "point_labels": [1]}], space="canonical")
    path = montage.write_montage(ct, bone, tmp_path / "ct.png", prompts=point,
                                 display=intensity.ct_window(ct.array, "bone"), count=3)
    assert Image.open(path).format == "PNG"


def test_montage_into_a_missing_folder(tmp_path, colin27_with_seeds):
    volume, seeds, _ = colin27_with_seeds
    with pytest.raises(OutputError, match="does not exist"):
        montage.write_montage(volume, seeds, tmp_path / "absent" / "m.png")

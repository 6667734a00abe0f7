"""One-Prompt 2D on real nuclei crops (DATA.md: stardist img2d/mask2d): a mask per image at its
own size, deterministic, and batched streams equal to the streams run one by one. Random
weights, so only shapes and determinism are meaningful."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import tifffile

from medsam2_jax import datasets
from medsam2_jax.configs.model import get_config
from medsam2_jax.model import sam2
from medsam2_jax.one_prompt import segment_one_prompt, segment_one_prompt_batch, segment_one_prompt_sweep
from medsam2_jax.tracker import propagate
from medsam2_jax.tracker.config import get_tracker_config


@functools.cache
def model():
    config = get_config("test")
    config.image_size = 128
    return sam2.init_params(jax.random.PRNGKey(0), config), config


def nuclei_stream(offset):
    img_path, mask_path = datasets.stardist_nuclei()
    img, lab = tifffile.imread(img_path), tifffile.imread(mask_path)
    crops = [(0, 0, 96, 128), (200, 40, 120, 100), (300, 300, 80, 80), (100, 380, 64, 96)]
    images = [img[y + offset:y + offset + h, x:x + w] for y, x, h, w in crops]
    rgb = np.repeat(images[1][..., None], 3, axis=-1)  # one RGB image among grey ones
    images[1] = rgb
    template, tlab = img[150:278, 150:278], lab[150:278, 150:278]
    ys, xs = np.nonzero(tlab == np.bincount(tlab[tlab > 0]).argmax())
    return images, template, {"box": [xs.min(), ys.min(), xs.max(), ys.max()]}


def test_one_prompt_masks_per_image_deterministic_and_batched():
    params, config = model()
    tc = get_tracker_config(memory_policy="self_sorting", K=4, conf_threshold=0.0)
    images, template, prompt = nuclei_stream(0)
    masks, outs = segment_one_prompt(images, template, prompt, params=params, config=config, tracker_config=tc,
                                     return_outputs=True)
    assert [m.shape for m in masks] == [x.shape[:2] for x in images]
    assert all(m.dtype == bool for m in masks)
    assert outs["bank_frames"].shape == (len(images), 4)
    again = segment_one_prompt(images, template, prompt, params=params, config=config, tracker_config=tc)
    for a, b in zip(masks, again):
        np.testing.assert_array_equal(a, b)
    other = nuclei_stream(20)
    single = segment_one_prompt(*other, params=params, config=config, tracker_config=tc)
    batched = segment_one_prompt_batch([(images, template, prompt), other], params=params, config=config,
                                       tracker_config=tc)
    for got, want in zip(batched, [masks, single]):
        for a, b in zip(got, want):
            assert a.shape == b.shape and (a == b).mean() > 0.999


def test_sweep_of_traced_knobs_equals_one_run_per_value_and_compiles_once():
    """`segment_one_prompt_sweep` vmaps the scan over a grid of self_sorting's traced knobs: each
    row equals `segment_one_prompt` with that value in the tracker config; a second grid of the
    same size reuses the executable; a knob the policy compiles in is refused."""
    params, config = model()
    # Random weights leave the object score near zero: raise it so tracked images pass the gate.
    params = jax.tree_util.tree_map(lambda x: x, params)
    head = params["sam_mask_decoder"]["pred_obj_score_head"]["layers"][2]
    head["bias"] = head["bias"] + 20.0
    tc = get_tracker_config(memory_policy="self_sorting", K=2)
    images, template, prompt = nuclei_stream(0)
    grid = {"conf_threshold": [0.0, 0.0, 2.0], "lambda_conf": [0.0, 1.0, 0.5]}
    before = propagate.TRACE_COUNTS["one_prompt_sweep"]
    masks, outs = segment_one_prompt_sweep(images, template, prompt, grid, params=params, config=config,
                                           tracker_config=tc, return_outputs=True)
    for g in range(3):
        one = get_tracker_config(memory_policy="self_sorting", K=2, conf_threshold=grid["conf_threshold"][g],
                                 lambda_conf=grid["lambda_conf"][g])
        want, want_outs = segment_one_prompt(images, template, prompt, params=params, config=config,
                                             tracker_config=one, return_outputs=True)
        np.testing.assert_array_equal(outs["bank_frames"][g], want_outs["bank_frames"])
        for a, b in zip(masks[g], want):
            assert a.shape == b.shape and (a == b).mean() > 0.999
    assert (outs["bank_frames"][0] >= 0).any() and (outs["bank_frames"][2] == -1).all()  # the gate took the knob
    segment_one_prompt_sweep(images, template, prompt, {"conf_threshold": [0.1, 0.2, 0.3], "lambda_conf": [1, 1, 1]},
                             params=params, config=config, tracker_config=tc)
    assert propagate.TRACE_COUNTS["one_prompt_sweep"] == before + 1
    with pytest.raises(ValueError, match="cannot sweep"):
        segment_one_prompt_sweep(images, template, prompt, {"K": [2, 3]}, params=params, config=config,
                                 tracker_config=tc)

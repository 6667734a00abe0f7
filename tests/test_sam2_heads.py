"""SAM2Base pieces against the official methods: SAM heads, mask-as-output, memory encoding.

These run through the official private methods that `track_step` uses, on the same features.
Tolerances: 1e-3 on logits (span about +-15), 1e-4 on pointers and memory features.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medsam2_jax.model import sam2 as S
from tests.reference import max_abs, nchw, nhwc, reference_video_predictor


@pytest.fixture(scope="module")
def ref():
    return reference_video_predictor("test")


def _features(config, seed=0, b=2):
    r = np.random.default_rng(seed)
    s = config.image_size // 16
    feat = r.standard_normal((b, s, s, 256)).astype(np.float32)
    hr = [r.standard_normal((b, 4 * s, 4 * s, 32)).astype(np.float32),
          r.standard_normal((b, 2 * s, 2 * s, 64)).astype(np.float32)]
    return feat, hr


def _compare_heads(ours, official):
    low_multi, high_multi, ious, low, high, ptr, obj = official
    assert max_abs(ours["low_res_masks"], nhwc(low)) < 1e-3
    assert max_abs(ours["high_res_masks"], nhwc(high)) < 1e-3
    assert max_abs(ours["obj_ptr"], ptr) < 1e-4
    assert max_abs(ours["object_score_logits"], obj) < 1e-4
    if "ious" in ours:
        assert max_abs(ours["ious"], ious) < 1e-5
        assert max_abs(ours["low_res_multimasks"], nhwc(low_multi)) < 1e-3


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", ["points", "mask", "none"])
def test_forward_sam_heads(ref, multimask, prompt):
    model, params, config = ref
    feat, hr = _features(config, seed=1)
    S_ = config.image_size
    kw, tkw = {}, {}
    if prompt == "points":
        coords = np.array([[[S_ * 0.3, S_ * 0.4], [S_ * 0.6, S_ * 0.5]]] * 2, np.float32)
        labels = np.array([[1, 0], [1, 1]], np.int32)
        kw = dict(point_coords=jnp.asarray(coords), point_labels=jnp.asarray(labels))
        tkw = dict(point_inputs={"point_coords": torch.from_numpy(coords), "point_labels": torch.from_numpy(labels)})
    elif prompt == "mask":
        m = (np.random.default_rng(2).standard_normal((2, S_, S_, 1)) * 5).astype(np.float32)
        kw = dict(mask_inputs=jnp.asarray(m))
        tkw = dict(mask_inputs=nchw(m))
    with torch.no_grad():
        official = model._forward_sam_heads(nchw(feat), high_res_features=[nchw(h) for h in hr],
                                            multimask_output=multimask, **tkw)
    ours = S.forward_sam_heads(params, jnp.asarray(feat), config, high_res_features=[jnp.asarray(h) for h in hr],
                               multimask_output=multimask, **kw)
    ours["low_res_multimasks"], ours["ious"] = S.multimask_candidates(ours, multimask)
    _compare_heads(ours, official)
    # The traced multimask flag selects the same outputs as the static one.
    traced = S.forward_sam_heads(params, jnp.asarray(feat), config, high_res_features=[jnp.asarray(h) for h in hr],
                                 multimask_output=jnp.asarray(multimask), **kw)
    for k in ("low_res_masks", "iou", "obj_ptr"):
        assert max_abs(traced[k], ours[k]) == 0.0


def test_no_object_path(ref):
    """With a negative object score, masks are -1024 and the pointer mixes in no_obj_ptr."""
    model, params, config = ref
    feat, hr = _features(config, seed=3)
    with torch.no_grad():
        bias = model.sam_mask_decoder.pred_obj_score_head.layers[2].bias
        saved = bias.clone()
        bias.sub_(50.0)
        official = model._forward_sam_heads(nchw(feat), high_res_features=[nchw(h) for h in hr], multimask_output=True)
        bias.copy_(saved)
    params = jax.tree_util.tree_map(lambda x: x, params)  # new containers, same arrays
    head = params["sam_mask_decoder"]["pred_obj_score_head"]["layers"][2]
    head["bias"] = head["bias"] - 50.0
    ours = S.forward_sam_heads(params, jnp.asarray(feat), config, high_res_features=[jnp.asarray(h) for h in hr],
                               multimask_output=True)
    ours["low_res_multimasks"], ours["ious"] = S.multimask_candidates(ours, True)
    assert np.all(np.asarray(ours["low_res_masks"]) == S.NO_OBJ_SCORE)
    _compare_heads(ours, official)


def test_use_mask_as_output(ref):
    model, params, config = ref
    feat, hr = _features(config, seed=4)
    S_ = config.image_size
    m = np.zeros((2, S_, S_, 1), np.float32)
    m[0, S_ // 4: S_ // 2, S_ // 3: S_ // 2] = 1.0  # second item empty: the no-object branch
    with torch.no_grad():
        official = model._use_mask_as_output(nchw(feat), [nchw(h) for h in hr], nchw(m).bool())
    ours = S.use_mask_as_output(params, jnp.asarray(feat), [jnp.asarray(h) for h in hr], jnp.asarray(m), config)
    low, high, ious, _, _, ptr, obj = official
    assert max_abs(ours["low_res_masks"], nhwc(low)) < 1e-4
    assert max_abs(ours["high_res_masks"], nhwc(high)) == 0.0
    assert max_abs(ours["obj_ptr"], ptr) < 1e-4
    assert max_abs(ours["object_score_logits"], obj) == 0.0


@pytest.mark.parametrize("from_points", [True, False])
def test_encode_new_memory(ref, from_points):
    model, params, config = ref
    feat, _ = _features(config, seed=5)
    S_ = config.image_size
    masks = (np.random.default_rng(6).standard_normal((2, S_, S_, 1)) * 8).astype(np.float32)
    obj = np.array([[2.0], [-1.0]], np.float32)  # one present, one absent (no_obj_embed_spatial)
    s = S_ // 16
    vision = [torch.from_numpy(feat.reshape(2, s * s, 256)).transpose(0, 1)]
    with torch.no_grad():
        f, pos = model._encode_new_memory(vision, [(s, s)], nchw(masks), torch.from_numpy(obj), from_points)
    of, opos = S.encode_new_memory(params, jnp.asarray(feat), jnp.asarray(masks), jnp.asarray(obj), from_points, config)
    assert max_abs(of, nhwc(f)) < 1e-4
    assert max_abs(opos, nhwc(pos[0])[0]) < 1e-6

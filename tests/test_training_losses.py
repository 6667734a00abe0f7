"""SAM 2's loss against a direct NumPy re-statement of `training/loss_fns.py` (float64 loops).

Tolerance 1e-5 relative: ours runs in float32, the reference in float64, over 32x32 pixels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medsam2_jax.training import losses

W_MASK, W_DICE, W_IOU, W_CLASS = 20.0, 1.0, 1.0, 1.0
sam2_loss = jax.jit(losses.sam2_loss)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _focal(x, t, alpha, gamma):
    p = _sigmoid(x)
    ce = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss


def reference_loss(masks, ious, scores, gt, valid):
    """masks (T, O, M, H, W), ious (T, O, M), scores (T, O), gt (T, O, H, W), valid (O,)."""
    masks, ious, scores, gt = (np.asarray(a, np.float64) for a in (masks, ious, scores, gt))
    num_objects = max(float(np.sum(valid)), 1.0)
    total = dict(loss_mask=0.0, loss_dice=0.0, loss_iou=0.0, loss_class=0.0)
    for t in range(masks.shape[0]):
        for o in range(masks.shape[1]):
            if not valid[o]:
                continue
            target = gt[t, o]
            present = float(target.any())
            focal, dice, iou = [], [], []
            for m in range(masks.shape[2]):
                x = masks[t, o, m]
                focal.append(_focal(x, target, 0.25, 2.0).mean())
                p = _sigmoid(x)
                dice.append(1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1))
                inter = np.sum((x > 0) & (target > 0))
                union = np.sum((x > 0) | (target > 0))
                iou.append(abs(ious[t, o, m] - inter / max(union, 1)))
            best = int(np.argmin(W_MASK * np.array(focal) + W_DICE * np.array(dice)))
            total["loss_mask"] += focal[best] * present / num_objects
            total["loss_dice"] += dice[best] * present / num_objects
            total["loss_iou"] += np.mean(iou) * present / num_objects
            total["loss_class"] += _focal(scores[t, o], present, -1, 0) / num_objects
    total["core_loss"] = (W_MASK * total["loss_mask"] + W_DICE * total["loss_dice"] + W_IOU * total["loss_iou"]
                          + W_CLASS * total["loss_class"])
    return total


def _inputs(num_masks, seed=0, frames=3, objects=4, size=32):
    rng = np.random.default_rng(seed)
    masks = rng.normal(0, 3, (frames, objects, num_masks, size, size)).astype(np.float32)
    ious = rng.uniform(0, 1, (frames, objects, num_masks)).astype(np.float32)
    scores = rng.normal(0, 2, (frames, objects)).astype(np.float32)
    gt = (rng.uniform(size=(frames, objects, size, size)) < 0.3).astype(np.uint8)
    gt[1, min(2, objects - 1)] = 0  # an object absent from one frame: only its class term counts there
    valid = np.array([True, True, True, False])[:objects]
    return masks, ious, scores, gt, valid


@pytest.mark.parametrize("num_masks", [1, 3])
def test_matches_numpy_reference(num_masks):
    masks, ious, scores, gt, valid = _inputs(num_masks)
    ours = sam2_loss(masks, ious, scores, gt, valid)
    ref = reference_loss(masks, ious, scores, gt, valid)
    for key, value in ref.items():
        np.testing.assert_allclose(float(ours[key]), value, rtol=1e-5, err_msg=key)


def test_padded_objects_change_nothing():
    masks, ious, scores, gt, valid = _inputs(3)
    keep = np.flatnonzero(valid)
    full = sam2_loss(masks, ious, scores, gt, valid)
    trimmed = sam2_loss(masks[:, keep], ious[:, keep], scores[:, keep], gt[:, keep])
    for key in full:
        np.testing.assert_allclose(float(full[key]), float(trimmed[key]), rtol=1e-6, err_msg=key)


def test_absent_object_has_only_class_loss():
    masks, ious, scores, gt, _ = _inputs(3, objects=1)
    gt[:] = 0
    out = sam2_loss(masks, ious, scores, gt)
    assert float(out["loss_mask"]) == float(out["loss_dice"]) == float(out["loss_iou"]) == 0.0
    assert float(out["loss_class"]) > 0


def test_mask_on_absent_trains_an_empty_mask_and_balanced_score():
    """mask_on_absent: an absent object's mask terms are those of an all-empty target (SAM 2 zeroes
    them); score_alpha weights the object-score BCE of present frames by alpha, absent by 1 - alpha."""
    masks, ious, scores, gt, _ = _inputs(3, objects=1)
    gt[:] = 0
    out = losses.sam2_loss(masks, ious, scores, gt, mask_on_absent=True)
    probs = 1 / (1 + np.exp(-masks.astype(np.float64)))
    assert float(out["loss_dice"]) > 0 and float(out["loss_mask"]) > 0
    # A single mask (M = 1) against an empty target: Dice loss is 1 - 1 / (sum p + 1), summed over frames.
    single = losses.sam2_loss(masks[:, :, :1], ious[:, :, :1], scores, gt, mask_on_absent=True)
    expected = sum(1 - 1 / (probs[t, 0, 0].sum() + 1) for t in range(masks.shape[0]))
    np.testing.assert_allclose(float(single["loss_dice"]), expected, rtol=1e-5)
    plain = losses.sam2_loss(masks, ious, scores, gt)
    half = losses.sam2_loss(masks, ious, scores, gt, score_alpha=0.25)
    np.testing.assert_allclose(float(half["loss_class"]), 0.75 * float(plain["loss_class"]), rtol=1e-6)


def test_gradients_finite_and_only_through_best_mask():
    masks, ious, scores, gt, valid = _inputs(3)
    masks[0, 0, 0, :4] = 80.0  # saturated logits: p_t == 1 exactly, where gamma-0 pow would NaN
    grads = jax.grad(lambda m, i, s: losses.sam2_loss(m, i, s, gt, valid)["core_loss"], argnums=(0, 1, 2))(
        jnp.asarray(masks), jnp.asarray(ious), jnp.asarray(scores))
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    mask_grad = np.abs(np.asarray(grads[0])).sum((-2, -1))  # (T, O, M)
    # Per valid (frame, object) with a GT mask, exactly one of the M masks gets a gradient.
    present = gt.any((-2, -1)) & valid[None]
    assert ((mask_grad > 0).sum(-1)[present] == 1).all()
    assert (mask_grad[:, ~valid] == 0).all()
    # The IoU head is supervised on all M masks of present objects.
    assert (np.abs(np.asarray(grads[1]))[present] > 0).all()


def test_weights_from_config():
    from medsam2_jax.configs.train import get_config

    kwargs = losses.weights_from_config(get_config("test").loss)
    assert kwargs["weights"] == losses.DEFAULT_WEIGHTS
    assert (kwargs["focal_alpha"], kwargs["focal_gamma"]) == (0.25, 2.0)

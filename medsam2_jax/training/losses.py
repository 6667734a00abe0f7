"""SAM 2's training loss (`training/loss_fns.py::MultiStepMultiMasksAndIous`) in pure jnp.

Per frame and object, on the high-resolution mask logits:
  mask   sigmoid focal loss (alpha 0.25, gamma 2), mean over pixels          weight 20
  dice   1 - (2|p.g| + 1) / (|p| + |g| + 1) on sigmoid probabilities          weight 1
  iou    |predicted IoU - IoU of (logits > 0) with the GT|, mean over masks  weight 1
  class  BCE (focal with alpha -1, gamma 0; both configurable) of the object-score
         logit against "GT mask non-empty"                                   weight 1
With M > 1 masks only the mask with the lowest 20*focal + dice is back-propagated for mask and
dice; the IoU term supervises all M (`supervise_all_iou=True`). Mask, dice and IoU are zeroed
for objects absent from the GT frame (unless `mask_on_absent`: then an empty mask is the target
there). Every term is divided by the number of objects and summed
over frames (and over correction steps: fold them into the frame axis, the sum is the same).

Objects are one flat axis O: a batch of B clips with N objects each is O = B*N. Padded objects
(`object_valid` False) contribute nothing, and the divisor counts valid objects only, so with a
global batch under jit this equals the official per-rank loss averaged by DDP (each rank divides
by its own object count and DDP averages gradients over ranks of equal count).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TERMS = ("loss_mask", "loss_dice", "loss_iou", "loss_class")
DEFAULT_WEIGHTS = {"loss_mask": 20.0, "loss_dice": 1.0, "loss_iou": 1.0, "loss_class": 1.0}


def _modulate(base, gamma: float):
    # A static exponent: gamma 0 must not differentiate 0**0, integer gammas use integer_pow.
    if gamma == 0:
        return jnp.ones_like(base)
    if float(gamma).is_integer():
        return base ** int(gamma)
    return base**gamma


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
    """Elementwise RetinaNet focal loss on logits; alpha < 0 turns off the class balance."""
    logits = logits.astype(jnp.float32)
    targets = targets.astype(jnp.float32)
    prob = jax.nn.sigmoid(logits)
    # Stable BCE with logits, as torch's binary_cross_entropy_with_logits computes it.
    ce = jnp.maximum(logits, 0.0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    p_t = prob * targets + (1.0 - prob) * (1.0 - targets)
    loss = ce * _modulate(1.0 - p_t, gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
    return loss


def dice_loss(logits, targets):
    """Soft dice over the last two axes, +1 smoothing (Wang et al.'s form used by SAM 2).

    numerator = |p| + |g| - ||p - g||_1, which is 2|p.g| for binary targets."""
    prob = jax.nn.sigmoid(logits.astype(jnp.float32))
    targets = targets.astype(jnp.float32)
    denominator = prob.sum((-2, -1)) + targets.sum((-2, -1))
    numerator = denominator - jnp.abs(prob - targets).sum((-2, -1))
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def actual_iou(logits, targets):
    """IoU of the binarised prediction (logits > 0) with the GT over the last two axes."""
    pred = logits > 0
    gt = targets > 0
    inter = jnp.sum(pred & gt, axis=(-2, -1)).astype(jnp.float32)
    union = jnp.sum(pred | gt, axis=(-2, -1)).astype(jnp.float32)
    return inter / jnp.maximum(union, 1.0)


def frame_losses(pred_masks, pred_ious, object_score_logits, gt_masks, *, focal_alpha=0.25, focal_gamma=2.0,
                 weights=None, score_alpha=-1.0, score_gamma=0.0, mask_on_absent=False) -> dict:
    """One frame: per-object terms (O,), before division by the number of objects.

    pred_masks (O, M, H, W) logits; pred_ious (O, M); object_score_logits (O,) or (O, 1);
    gt_masks (O, H, W) binary. score_alpha/score_gamma: the object-score loss's focal parameters
    (SAM 2's `focal_alpha_obj_score`/`focal_gamma_obj_score`; -1/0 is plain BCE, an alpha in
    [0, 1] weights present frames by alpha and absent ones by 1 - alpha). mask_on_absent: also
    apply the mask, Dice and IoU terms where the object is absent (pushing the mask to empty); SAM 2
    zeroes them there and leaves absence to the object score alone.
    """
    weights = {**DEFAULT_WEIGHTS, **(weights or {})}
    gt = gt_masks.astype(jnp.float32)[:, None]  # (O, 1, H, W), broadcast over M
    focal = sigmoid_focal_loss(pred_masks, gt, focal_alpha, focal_gamma).mean((-2, -1))  # (O, M)
    dice = dice_loss(pred_masks, gt)  # (O, M)
    iou = jnp.abs(pred_ious.astype(jnp.float32) - jax.lax.stop_gradient(actual_iou(pred_masks, gt)))  # (O, M)
    if pred_masks.shape[1] > 1:
        best = jnp.argmin(weights["loss_mask"] * focal + weights["loss_dice"] * dice, axis=-1)[:, None]
        focal = jnp.take_along_axis(focal, best, axis=-1)
        dice = jnp.take_along_axis(dice, best, axis=-1)
    present = jnp.any(gt_masks > 0, axis=(-2, -1)).astype(jnp.float32)  # (O,)
    score = object_score_logits.reshape(present.shape)
    counted = jnp.where(mask_on_absent, 1.0, present)
    return {
        "loss_mask": focal[:, 0] * counted,
        "loss_dice": dice[:, 0] * counted,
        "loss_iou": iou.mean(-1) * counted,
        "loss_class": sigmoid_focal_loss(score, present, alpha=score_alpha, gamma=score_gamma),
    }


def sam2_loss(pred_masks, pred_ious, object_score_logits, gt_masks, object_valid=None, *, frame_valid=None,
              focal_alpha=0.25, focal_gamma=2.0, weights=None, score_alpha=-1.0, score_gamma=0.0,
              mask_on_absent=False) -> dict:
    """SAM 2's loss over a clip. Returns the four terms and `core_loss`, their weighted sum.

    pred_masks (T, O, M, H, W) high-res mask logits; pred_ious (T, O, M); object_score_logits
    (T, O) or (T, O, 1); gt_masks (T, O, H, W) binary; object_valid (O,) bool, default all valid.
    frame_valid (T, O) bool (or broadcastable): outputs that count; the train step stacks fixed
    slots (conditioning frames, correction steps, tracked frames) and masks the unused ones.
    """
    weights = {**DEFAULT_WEIGHTS, **(weights or {})}
    num_frames, num_objects = gt_masks.shape[:2]
    valid = jnp.ones((num_objects,), jnp.float32) if object_valid is None else object_valid.astype(jnp.float32)
    per_frame = jax.vmap(lambda m, i, s, g: frame_losses(m, i, s, g, focal_alpha=focal_alpha,
                                                         focal_gamma=focal_gamma, weights=weights,
                                                         score_alpha=score_alpha, score_gamma=score_gamma,
                                                         mask_on_absent=mask_on_absent))(
        pred_masks, pred_ious, object_score_logits, gt_masks)
    if frame_valid is not None:
        per_frame = {k: v * jnp.broadcast_to(frame_valid, v.shape).astype(jnp.float32) for k, v in per_frame.items()}
    count = jnp.maximum(valid.sum(), 1.0)
    losses = {k: jnp.sum(v * valid) / count for k, v in per_frame.items()}
    losses["core_loss"] = sum(weights[k] * losses[k] for k in LOSS_TERMS if weights[k] != 0)
    return losses


def weights_from_config(loss_config) -> dict:
    """`config.loss` of configs/train.py -> the weights and focal keywords of `sam2_loss`."""
    return dict(
        weights={"loss_mask": loss_config.mask, "loss_dice": loss_config.dice, "loss_iou": loss_config.iou,
                 "loss_class": loss_config.object_score},
        focal_alpha=loss_config.focal_alpha,
        focal_gamma=loss_config.focal_gamma,
        score_alpha=loss_config.get("object_score_alpha", -1.0),
        score_gamma=loss_config.get("object_score_gamma", 0.0),
        mask_on_absent=loss_config.get("mask_on_absent", False),
    )

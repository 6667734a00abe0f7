"""The jitted train step: SAM 2's training forward over a clip through the memory bank, its loss,
and the optax update (`SAM2Train.forward` + `MultiStepMultiMasksAndIous`, sam2-architecture.md 6).

Per clip (vmapped over clips, and over objects on shared image features):
  1. every frame through the image encoder in one batch;
  2. the conditioning frames (fixed slots, `cond_valid` masks the unused one), each prompted by
     a GT mask (`use_mask_as_output`), or by a box/click followed by `num_correction_points`
     error clicks, each step feeding the previous low-res logits back as the mask input; the
     last step's mask is encoded into memory (sigmoid, as in training) and pinned;
  3. a `lax.scan` over the frames in temporal order, each tracked from the bank by
     `tracker.step.track_frame` in training mode, so the configured memory policy
     (tracker_config.memory_policy: fifo, self_sorting, medsam2_released or a registered one)
     decides what is written and read, exactly as at inference; conditioning frames replay their
     output there and write nothing, as SAM 2 processes them first. `jax.checkpoint` wraps each
     frame (config.remat), so the backward pass keeps one frame's activations at a time plus the
     bank.
Every output (each correction step included) gets the loss with all M masks (a single-mask
output is repeated M times, which leaves best-of-M and the IoU mean unchanged); the loss is
`losses.sam2_loss` over the stacked outputs, summed over frames, divided by the valid objects.

Training-mode differences from the tracker's inference step (SAM2Train's `self.training`, our
static `training=True`): memory masks are sigmoids, never binarised; pointers of all conditioning
frames are used, not only past ones. Dropout and drop-path are not applied (our model functions
have none). Memories are stored in bfloat16 as at inference; gradients pass through the cast.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from medsam2_jax.model import layers, sam2
from medsam2_jax.tracker import state as tracker_state
from medsam2_jax.tracker.policies import make_policy
from medsam2_jax.tracker.step import track_frame
from medsam2_jax.training import losses, prompts
from medsam2_jax.training.optimizer import learning_rate_schedule

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class LossOutputs(NamedTuple):
    """What the loss scores of one object's outputs (a prompt or correction step, a tracked frame),
    stacked along any leading axes."""

    masks: jax.Array  # (..., M, S, S) high-res logits of the M candidates
    ious: jax.Array  # (..., M) predicted IoUs
    scores: jax.Array  # (...) object-score logits
    valid: jax.Array  # (...) bool: the output counts in the loss


def _loss_outputs(config, low_res_multimasks, ious, scores, valid) -> LossOutputs:
    """One object's `LossOutputs` from what `sam2.multimask_candidates` gives, (4s, 4s, M) and (M,),
    the masks upsampled to the image size."""
    size = (config.image_size, config.image_size)
    masks = layers.resize_bilinear(low_res_multimasks[None], size, antialias=False)[0]  # (S, S, M)
    return LossOutputs(masks=jnp.moveaxis(masks, -1, 0).astype(jnp.float32), ious=ious.astype(jnp.float32),
                       scores=scores, valid=jnp.asarray(valid))


def _prompted_heads(params, config, pix, hr, points, labels, mask_inputs=None):
    """forward_sam_heads on a conditioning frame's prompt (one decoder run, padded points with label
    -1); returns its outputs and their `LossOutputs`."""
    coords, labels = points[None], labels[None]
    point_mask = labels >= 0
    multimask = sam2.use_multimask(config, True, point_mask.sum())
    sam = sam2.forward_sam_heads(params, pix, config, point_coords=coords, point_labels=labels, high_res_features=hr,
                                 multimask_output=multimask, point_mask=point_mask,
                                 **sam2.box_mask_prompt(config, coords, labels, point_mask, mask_inputs))
    masks, ious = sam2.multimask_candidates(sam, multimask)
    return sam, _loss_outputs(config, masks[0], ious[0], sam["object_score_logits"][0, 0], True)


def _cond_object(params, config, pcfg, *, frame, frame_idx, write, kind, points, labels, gt, key, num_corrections):
    """One object on one conditioning frame (`frame`, its features with a batch axis, at `frame_idx`;
    `write` False: an unused slot): prompt, corrections, memory.

    points (2, 2), labels (2,) from the simulated prompt of `kind`; gt (S, S). Returns what the bank
    pins, a `state.CondFrames` row, and the `LossOutputs` of every step, (K, ...) with
    K = 1 + num_corrections (correction steps in a lax.scan: one compiled decoder pair)."""
    vf, hr = frame.vision_features, frame.high_res_features
    is_mask = kind == prompts.MASK
    total = 2 + num_corrections
    pts = jnp.zeros((total, 2), jnp.float32).at[:2].set(points)
    lab = jnp.full((total,), -1, jnp.int32).at[:2].set(labels)
    pix = sam2.add_no_mem_embed(params, vf)
    sam, heads_loss = _prompted_heads(params, config, pix, hr, pts, lab)
    # A mask prompt is the output itself (use_mask_as_output); it gets no corrections.
    mask_out = sam2.use_mask_as_output(params, vf, hr, gt.astype(jnp.float32)[None, :, :, None], config)
    m = config.mask_decoder.num_multimask_outputs
    mask_loss = LossOutputs(
        masks=jnp.broadcast_to(mask_out["high_res_masks"][0, :, :, 0], (m, *gt.shape)).astype(jnp.float32),
        ious=jnp.broadcast_to(mask_out["iou"][0], (m,)).astype(jnp.float32),
        scores=mask_out["object_score_logits"][0, 0], valid=jnp.asarray(True))
    first = jax.tree.map(lambda a, b: jnp.where(is_mask, a, b), mask_loss, heads_loss)
    keys = ("low_res_masks", "high_res_masks", "obj_ptr", "object_score_logits")
    sam = {k: sam[k] for k in keys}
    gt_bool = gt > 0

    def correct(carry, xs):
        sam, pts, lab = carry
        index, sub = xs
        xy, label, valid = prompts.correction_click(sub, gt_bool, sam["high_res_masks"][0, :, :, 0] > 0,
                                                    pcfg.prob_from_gt)
        valid = valid & ~is_mask
        pts = pts.at[index].set(xy)
        lab = lab.at[index].set(jnp.where(valid, label, -1))
        new, loss = _prompted_heads(params, config, pix, hr, pts, lab, mask_inputs=sam["low_res_masks"])
        return ({k: new[k] for k in keys}, pts, lab), loss._replace(valid=~is_mask)

    steps = [jax.tree.map(lambda x: x[None], first)]
    if num_corrections:
        (sam, pts, lab), corrections = jax.lax.scan(
            correct, (sam, pts, lab), (2 + jnp.arange(num_corrections), jax.random.split(key, num_corrections)))
        steps.append(corrections)
    final = {k: jnp.where(is_mask, mask_out[k], sam[k]) for k in keys}
    mem, _ = sam2.encode_new_memory(params, vf, final["high_res_masks"], final["object_score_logits"], ~is_mask,
                                    config, training=True)
    pinned = tracker_state.CondFrames(frame=frame_idx, mem=mem[0], ptr=final["obj_ptr"][0],
                                      mask=final["low_res_masks"][0], score=final["object_score_logits"][0],
                                      valid=write)
    loss = jax.tree.map(lambda *x: jnp.concatenate(x), *steps)
    return pinned, loss._replace(valid=loss.valid & write)


def _track_object(params, config, policy, state, frame, frame_idx, num_frames):
    """One object on a frame tracked from memory (`tracker.step.track_frame` in training mode):
    the policy decides what enters the bank; a conditioning frame replays its output and writes
    nothing. Returns the state, the `LossOutputs` and the chosen mask (S, S)."""
    state, out = track_frame(params, config, state, frame, frame_idx, num_frames, False, policy=policy,
                             training=True)
    loss = _loss_outputs(config, out["sam"]["low_res_multimasks"], out["sam"]["ious"], out["object_score_logits"][0],
                         valid=True)  # the clip marks the replayed conditioning frames
    chosen = layers.resize_bilinear(out["low_res_masks"][None], (config.image_size,) * 2, antialias=False)
    return state, (loss, chosen[0, :, :, 0])


def clip_forward(params, config, tracker_config, pcfg, features, clip, key, *, num_corrections: int, remat=True):
    """One clip, all objects. `features` holds this clip's T frames; `clip` one record of the
    batch (data.py + prompts.py fields). Returns per-output arrays stacked as
    (F, N, ...) with F = C * (1 + num_corrections) + T, the tracked frames' chosen masks, and
    `bank_frames` (N, slots): the frames the memory policy holds at the end of the clip."""
    masks_gt = clip["masks"]  # (T, N, S, S)
    num_frames, n = masks_gt.shape[:2]
    policy = make_policy(config, tracker_config)

    def cond_slot(carry, xs):
        t, write, points, labels, k = xs
        cond = functools.partial(_cond_object, params, config, pcfg, frame=features.frame(t).batched(), frame_idx=t,
                                 write=write, kind=clip["prompt_kind"], num_corrections=num_corrections)
        fn = lambda p_, l_, g_, k_: cond(points=p_, labels=l_, gt=g_, key=k_)  # noqa: E731
        pinned, loss = jax.vmap(fn)(points, labels, masks_gt[t], jax.random.split(k, n))
        return carry, (pinned, loss, masks_gt[t])

    if remat:
        cond_slot = jax.checkpoint(cond_slot)
    num_cond = clip["cond_frames"].shape[0]
    _, (pinned, cond_loss, cgt) = jax.lax.scan(
        cond_slot, None, (clip["cond_frames"], clip["cond_valid"], clip["prompt_points"], clip["prompt_labels"],
                          jax.random.split(key, num_cond)))
    # Every object's bank: its conditioning frames pinned in slot order, nothing tracked yet.
    by_object = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731  (C, N, ...) -> (N, C, ...)
    state = jax.vmap(lambda p_: tracker_state.state_from_history(config, tracker_config, policy, p_))(
        jax.tree.map(by_object, pinned))
    # (C, N, K, ...) -> (C*K, N, ...): one loss output per conditioning frame and step.
    per_step = lambda x: jnp.moveaxis(x, 2, 1).reshape(-1, *x.shape[1:2], *x.shape[3:])  # noqa: E731
    cond_loss = jax.tree.map(per_step, cond_loss)
    cgt = jnp.repeat(cgt, 1 + num_corrections, axis=0)

    is_cond_frame = jnp.any((clip["cond_frames"][None] == jnp.arange(num_frames)[:, None]) & clip["cond_valid"][None],
                            axis=1)

    def body(st, t):
        frame = features.frame(t)
        track = lambda s_: _track_object(params, config, policy, s_, frame, t, num_frames)  # noqa: E731
        return jax.vmap(track)(st)

    if remat:
        body = jax.checkpoint(body)
    state, (tracked_loss, chosen) = jax.lax.scan(body, state, jnp.arange(num_frames))
    tracked_valid = jnp.broadcast_to(~is_cond_frame[:, None], (num_frames, n))
    loss = jax.tree.map(lambda c, t: jnp.concatenate([c, t]), cond_loss, tracked_loss._replace(valid=tracked_valid))
    gt = jnp.concatenate([cgt, masks_gt])
    return {"masks": loss.masks, "ious": loss.ious, "scores": loss.scores, "valid": loss.valid, "gt": gt,
            "tracked_masks": chosen, "tracked_valid": tracked_valid,
            "bank_frames": jax.vmap(policy.held_frames)(state)}


def dice_score(pred, gt, valid):
    """Mean Dice of binary (..., S, S) masks over `valid` entries; empty vs empty counts as 1."""
    pred, gt = pred.astype(jnp.float32), gt.astype(jnp.float32)
    inter = (pred * gt).sum((-2, -1))
    total = pred.sum((-2, -1)) + gt.sum((-2, -1))
    dice = jnp.where(total > 0, 2 * inter / jnp.maximum(total, 1.0), 1.0)
    valid = valid.astype(jnp.float32)
    return jnp.sum(dice * valid) / jnp.maximum(valid.sum(), 1.0)


def batch_forward(params, config, tracker_config, pcfg, batch, key, *, num_corrections, compute_dtype=jnp.float32,
                  remat=True):
    """Every clip of a batch: image features for all B*T frames at once, then clip_forward."""
    images = batch["image"]  # (B, T, S, S) grey in [0, 1]
    b, t, s = images.shape[:3]
    rgb = jnp.broadcast_to(images.reshape(b * t, s, s, 1), (b * t, s, s, 3))
    cparams = jax.tree.map(lambda x: x.astype(compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    feats = sam2.forward_image(cparams, sam2.preprocess(rgb, config).astype(compute_dtype), config)
    # Per clip (B, T, ...); the positional encoding, the same for every frame, stays out of the vmap.
    per_clip = feats.map_frames(lambda x: x.reshape(b, t, *x.shape[1:])).replace(vision_pos_enc=None)
    pos = feats.vision_pos_enc
    clip_keys = jax.random.split(key, b)
    fields = ("masks", "cond_frames", "cond_valid", "prompt_kind", "prompt_points", "prompt_labels")

    def one(f, clip, k):
        f = f.replace(vision_pos_enc=pos)
        return clip_forward(cparams, config, tracker_config, pcfg, f, clip, k, num_corrections=num_corrections,
                            remat=remat)

    return jax.vmap(one)(per_clip, {k: batch[k] for k in fields}, clip_keys)


def _flatten_objects(x):
    """(B, F, N, ...) -> (F, B*N, ...)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def loss_fn(params, config, tracker_config, pcfg, loss_kwargs, batch, key, *, num_corrections, compute_dtype, remat):
    out = batch_forward(params, config, tracker_config, pcfg, batch, key, num_corrections=num_corrections,
                        compute_dtype=compute_dtype, remat=remat)
    object_valid = batch["object_valid"].reshape(-1)
    terms = losses.sam2_loss(_flatten_objects(out["masks"]), _flatten_objects(out["ious"]),
                             _flatten_objects(out["scores"]), _flatten_objects(out["gt"]), object_valid,
                             frame_valid=_flatten_objects(out["valid"]), **loss_kwargs)
    tracked_valid = out["tracked_valid"] & batch["object_valid"][:, None, :]
    terms["train_dice"] = dice_score(out["tracked_masks"] > 0, batch["masks"] > 0, tracked_valid)
    return terms["core_loss"], terms


class Steps:
    """The jitted train and eval steps for one training config (built once, reused)."""

    def __init__(self, config, tracker_config=None, *, state_shardings=None, batch_sharding=None):
        from medsam2_jax.tracker.config import get_tracker_config

        self.config = config
        self.model_config = config.model_config.copy_and_resolve_references()
        self.tracker_config = tracker_config or get_tracker_config()
        self.prompt_config = prompts.PromptConfig.from_config(config.prompts)
        if self.tracker_config.max_cond_frames < self.prompt_config.num_init_cond_frames:
            raise ValueError("tracker max_cond_frames must hold prompts.num_init_cond_frames")
        self.schedule = learning_rate_schedule(config)
        common = dict(compute_dtype=DTYPES[config.compute_dtype], remat=config.remat)
        self._loss = functools.partial(loss_fn, config=self.model_config, tracker_config=self.tracker_config,
                                       pcfg=self.prompt_config, loss_kwargs=losses.weights_from_config(config.loss),
                                       **common)
        self._num_corrections = config.prompts.num_correction_points
        jit_kwargs = {}
        if state_shardings is not None:
            jit_kwargs = dict(in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None))
        self.train_step = jax.jit(self._train_step, donate_argnums=0, **jit_kwargs)
        eval_kwargs = {}
        if state_shardings is not None:
            eval_kwargs = dict(in_shardings=(state_shardings.params, batch_sharding, None), out_shardings=None)
        self.eval_step = jax.jit(self._eval_step, **eval_kwargs)

    def _train_step(self, state, batch):
        state, key = state.next_rng()
        grad_fn = jax.value_and_grad(lambda p: self._loss(p, batch=batch, key=key,
                                                          num_corrections=self._num_corrections), has_aux=True)
        (_, metrics), grads = grad_fn(state.params)
        trainable = jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, self._frozen(state.params))
        metrics["grad_norm"] = optax.global_norm(trainable)
        metrics["lr"] = self.schedule(state.step)
        return state.apply_gradients(grads), metrics

    def _frozen(self, params):
        from medsam2_jax.training.optimizer import param_groups

        return param_groups(params, self.config).frozen

    def _eval_step(self, params, batch, key):
        """Losses and tracked-frame Dice without corrections (the simulated prompts only)."""
        _, metrics = self._loss(params, batch=batch, key=key, num_corrections=0)
        return metrics


def make_steps(config, tracker_config=None, **kwargs) -> Steps:
    return Steps(config, tracker_config, **kwargs)

"""One-Prompt 2D segmentation (memory-bank.md section 5).

A list of unrelated 2D images of one task is tracked as a pseudo-video: the template (frame 0)
carries the prompt and becomes a pinned conditioning entry; every other image is segmented from
memory alone and, under `self_sorting`, may enter the bank. Images may have any size and be grey
or RGB; each is scaled to [0, 1] by its own min and max [choice: medical intensities have no
common range], resized to the model resolution, and its mask comes back at its own size.

    masks = segment_one_prompt(images, template, {"box": [x0, y0, x1, y1]}, params=p, config=c)

`segment_one_prompt_batch` runs several such streams (equal lengths) in parallel with `vmap`;
`segment_one_prompt_sweep` runs one stream for a grid of a policy's numeric knob (`lambda_conf`,
`conf_threshold`, `temperature` of `self_sorting`) in one compiled call, `vmap` over the values;
`one_prompt_scan` is the pure function underneath (prompt step, then `lax.scan` of `step`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from medsam2_jax.model import layers, sam2
from medsam2_jax.tracker import config as tracker_config_lib
from medsam2_jax.tracker import propagate
from medsam2_jax.tracker import step as step_lib
from medsam2_jax.tracker.policies.base import check_knobs, with_knobs
from medsam2_jax.tracker.prompts import make_prompt
from medsam2_jax.tracker.state import CondFrames, state_from_history


def one_prompt_scan(params, config, policy, frames, prompt, knobs=None):
    """frames (N+1, S, S, 3) normalised, template first; prompt a `Prompt`; `knobs` a dict of the
    policy's traced knobs (`with_knobs`), else the tracker config's values.

    Returns (final state, outputs of frames 1..N with a leading frame axis: low_res_masks,
    object_score_logits, bank_frames, ...) and the template's low-res mask logits.
    """
    n = frames.shape[0]
    feats = propagate.compute_features(params, config, frames, 1)
    first = step_lib.prompted_outputs(params, config, feats.frame(0), prompt, 0, n)
    template = CondFrames(frame=jnp.zeros((1,), jnp.int32), mem=first["maskmem_features"][None],
                          ptr=first["obj_ptr"][None], mask=first["low_res_masks"][None],
                          score=first["object_score_logits"][None], valid=jnp.ones((1,), bool))
    state = state_from_history(config, policy.tracker_config, policy, template)
    if knobs:
        state = with_knobs(policy, state, **knobs)

    def body(st, i):
        st, out = step_lib.track_frame(params, config, st, feats.frame(i), i, n, False, True, policy)
        out.pop("entry_extras")  # what a stored history would need: nothing replays this scan
        return st, out

    state, outs = jax.lax.scan(body, state, jnp.arange(1, n))
    return state, outs, first["low_res_masks"]


def _compiled(config, tracker_config, batched):
    """The jitted one-prompt scan (vmapped over streams when `batched`), kept with the tracker's
    other compiled functions for this config pair."""
    fns = propagate.compiled(config, tracker_config)

    def build():
        fn = lambda params, frames, prompt: one_prompt_scan(params, fns.config, fns.policy, frames, prompt)
        return jax.jit(jax.vmap(fn, in_axes=(None, 0, 0)) if batched else fn)

    return fns.get(("one_prompt", batched), build)


def prepare_image(image, image_size, config):
    """Any 2D image (H, W) or (H, W, C) -> (S, S, 3) ImageNet-normalised, and its (H, W)."""
    x = np.asarray(image, np.float32)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    x = x[..., :3]
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    small = layers.resize_bilinear(jnp.asarray(x)[None], (image_size, image_size), antialias=True)[0]
    return np.asarray(sam2.preprocess(small, config)), x.shape[:2]


def _prompt(prompt, hw, config, tracker_config):
    """Template-pixel prompt (points/labels/box/mask) -> a `Prompt` in model pixels."""
    h, w = hw
    s = config.image_size
    scale = np.array([s / w, s / h], np.float32)
    pts = None if prompt.get("points") is None else np.asarray(prompt["points"], np.float32).reshape(-1, 2) * scale
    box = prompt.get("box")
    box = None if box is None else (np.asarray(box, np.float32).reshape(2, 2) * scale).reshape(4)
    mask = prompt.get("mask")
    if mask is not None:
        m = layers.resize_bilinear(jnp.asarray(mask, jnp.float32)[None, :, :, None], (s, s), antialias=True)
        mask = (np.asarray(m[0]) >= 0.5).astype(np.float32)
    return make_prompt(s, tracker_config.max_points, points=pts, labels=prompt.get("labels"), box=box, mask=mask)


def _masks(low_res, sizes):
    out = []
    for logits, hw in zip(low_res, sizes):
        up = layers.resize_bilinear(jnp.asarray(logits)[None], hw, antialias=False)[0, ..., 0]
        out.append(np.asarray(up) > 0)
    return out


def _stream(images, template_image, prompt, config, tracker_config):
    prepared = [prepare_image(x, config.image_size, config) for x in [template_image, *images]]
    frames = np.stack([p[0] for p in prepared])
    return frames, _prompt(prompt, prepared[0][1], config, tracker_config), [p[1] for p in prepared[1:]]


def segment_one_prompt(images, template_image, prompt, *, params, config, tracker_config=None,
                       return_outputs=False, with_template=False):
    """Boolean masks, one per image at its own size, from one prompted template.

    prompt: a dict with any of `points` (N, 2) xy + `labels` (N,), `box` (x0, y0, x1, y1) in
    template pixels, or `mask` (H, W) of the template. With `with_template`, the template's own
    mask (the decoder's answer to the prompt) comes first. With `return_outputs`, also the
    per-image outputs (object scores, which frames the bank held after each image, ...).
    """
    tracker_config = tracker_config or tracker_config_lib.get_tracker_config()
    frames, p, sizes = _stream(images, template_image, prompt, config, tracker_config)
    fn = _compiled(config, tracker_config, False)
    _, outs, first = fn(params, frames, p)
    outs = jax.tree.map(np.asarray, outs)
    masks = _masks(outs["low_res_masks"], sizes)
    if with_template:
        masks = _masks(np.asarray(first)[None], [np.shape(template_image)[:2]]) + masks
    return (masks, outs) if return_outputs else masks


def segment_one_prompt_batch(streams, *, params, config, tracker_config=None):
    """Several (images, template_image, prompt) streams of equal length, run in parallel (vmap)."""
    tracker_config = tracker_config or tracker_config_lib.get_tracker_config()
    prepared = [_stream(*s, config, tracker_config) for s in streams]
    if len({len(p[2]) for p in prepared}) != 1:
        raise ValueError("batched streams must hold the same number of images")
    frames = np.stack([p[0] for p in prepared])
    prompts = jax.tree.map(lambda *xs: np.stack(xs), *[p[1] for p in prepared])
    fn = _compiled(config, tracker_config, True)
    _, outs, _ = fn(params, frames, prompts)
    low = np.asarray(outs["low_res_masks"])
    return [_masks(low[b], p[2]) for b, p in enumerate(prepared)]


def segment_one_prompt_sweep(images, template_image, prompt, knobs, *, params, config, tracker_config=None,
                             return_outputs=False):
    """Masks of one stream for every value of a grid of traced knobs, in one compiled call.

    knobs: {name: (G,) values}, names from the policy's `traced_knobs` (for `self_sorting`:
    conf_threshold, lambda_conf, temperature), all of one length G; the other knobs come from
    `tracker_config`. Returns G lists of masks (one per image), as `segment_one_prompt` gives for
    each value: the scan is `vmap`ped over the values and the images are encoded once. The
    executable depends on G, not on the values, so a new grid of the same size does not recompile.
    """
    tracker_config = tracker_config or tracker_config_lib.get_tracker_config()
    fns = propagate.compiled(config, tracker_config)
    values = {k: np.asarray(v, np.float32).reshape(-1) for k, v in knobs.items()}
    if not values or len({v.shape[0] for v in values.values()}) != 1:
        raise ValueError("knobs must name at least one knob, every one with the same number of values")
    check_knobs(fns.policy, values)  # before the images are prepared
    frames, p, sizes = _stream(images, template_image, prompt, config, tracker_config)

    def build():
        def fn(params, frames, prompt, knobs):
            propagate.TRACE_COUNTS["one_prompt_sweep"] += 1
            return one_prompt_scan(params, fns.config, fns.policy, frames, prompt, knobs)

        return jax.jit(jax.vmap(fn, in_axes=(None, None, None, 0)))

    _, outs, _ = fns.get(("one_prompt_sweep", tuple(sorted(values))), build)(params, frames, p, values)
    outs = jax.tree.map(np.asarray, outs)
    masks = [_masks(low, sizes) for low in outs["low_res_masks"]]
    return (masks, outs) if return_outputs else masks

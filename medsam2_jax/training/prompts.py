"""Prompt simulation as SAM 2 trains (`SAM2Train.prepare_prompt_inputs`, sam2-architecture.md 6).

Per clip (numpy, in the data pipeline, from the record's own rng so it is deterministic):
  conditioning frames  frame 0, plus with `rand_init_cond_frames` 0 or 1 other random frame
                       (1 to `num_init_cond_frames` in all, uniformly), as SAM 2 draws them
  prompt kind          a GT mask with p = 1 - prob_point_input; else a noisy box with
                       p = prob_box_input, else one click uniform inside the object
  box noise            each corner moves by U(-1, 1) * min(noise * box side, noise_bound) px
Correction clicks need the model's prediction, so they are drawn in jnp inside the train step
(`correction_click`): a click uniform in the error region of the current high-res mask
(positive on a false negative, negative on a false positive), or with p = prob_from_gt uniform
inside the GT; SAM 2 adds `num_correction_points` of them, one after another, on the
conditioning frames of clips with point input.

Record fields (C = num_init_cond_frames, N objects; xy in model pixels):
  cond_frames         (C,) int32, frame 0 first; unused slots repeat frame 0
  cond_valid          (C,) bool
  prompt_kind         () int32: MASK, BOX or CLICK
  prompt_points       (C, N, 2, 2) float32: box corners, or the click in slot 0
  prompt_labels       (C, N, 2) int32: 2/3 box corners, 1 click, -1 padding
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

MASK, BOX, CLICK = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    num_init_cond_frames: int = 2
    rand_init_cond_frames: bool = True
    prob_point_input: float = 0.5
    prob_box_input: float = 0.5
    box_noise: float = 0.1
    box_noise_bound: float = 20.0
    num_correction_points: int = 7
    prob_from_gt: float = 0.1

    @classmethod
    def from_config(cls, prompt_config) -> PromptConfig:
        return cls(**{f.name: prompt_config[f.name] for f in dataclasses.fields(cls)})


def mask_box(mask: np.ndarray):
    """(x0, y0, x1, y1) of a (S, S) mask in pixel indices, or None when it is empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], np.float32)


def simulate_prompts(masks: np.ndarray, rng: np.random.Generator, cfg: PromptConfig) -> dict:
    """Prompts for one clip; `masks` (T, N, S, S). Objects absent from a conditioning frame get
    no points (a mask prompt is then an empty mask)."""
    t, n, size = masks.shape[0], masks.shape[1], masks.shape[-1]
    c = cfg.num_init_cond_frames
    count = int(rng.integers(1, c + 1)) if cfg.rand_init_cond_frames else c
    count = min(count, t)
    cond_frames = np.zeros((c,), np.int32)
    cond_frames[1:count] = np.sort(rng.choice(np.arange(1, t), size=count - 1, replace=False)) if count > 1 else []
    cond_valid = np.arange(c) < count
    if rng.random() >= cfg.prob_point_input:
        kind = MASK
    else:
        kind = BOX if rng.random() < cfg.prob_box_input else CLICK
    points = np.zeros((c, n, 2, 2), np.float32)
    labels = -np.ones((c, n, 2), np.int32)
    for slot in range(count):
        for obj in range(n):
            mask = masks[cond_frames[slot], obj] > 0
            if kind == BOX and (box := mask_box(mask)) is not None:
                w, h = box[2] - box[0], box[3] - box[1]
                bound = np.minimum(np.array([w, h, w, h]) * cfg.box_noise, cfg.box_noise_bound)
                box = np.clip(box + rng.uniform(-1, 1, 4) * bound, 0, size - 1)
                # Corners stay ordered after noise (SAM 2 clamps to the image only).
                points[slot, obj] = [[min(box[0], box[2]), min(box[1], box[3])],
                                     [max(box[0], box[2]), max(box[1], box[3])]]
                labels[slot, obj] = (2, 3)
            elif kind == CLICK and mask.any():
                index = rng.choice(np.flatnonzero(mask))
                points[slot, obj, 0] = (index % size, index // size)
                labels[slot, obj, 0] = 1
    return {"cond_frames": cond_frames, "cond_valid": cond_valid, "prompt_kind": np.int32(kind),
            "prompt_points": points, "prompt_labels": labels}


def correction_click(key, gt, pred, prob_from_gt: float):
    """One corrective click (jnp): gt, pred (S, S) bool -> (xy (2,), label (), valid ()).

    Uniform over the error region (label = GT at the click: 1 on a miss, 0 on a false
    positive); from the GT instead with p = prob_from_gt or when there is no error. No click
    (valid False) when the chosen region is empty."""
    k_gt, k_pick = jax.random.split(key)
    errors = gt ^ pred
    from_gt = (jax.random.uniform(k_gt) < prob_from_gt) | ~errors.any()
    region = jnp.where(from_gt, gt, errors)
    noise = jax.random.gumbel(k_pick, region.shape)
    index = jnp.argmax(jnp.where(region, noise, -jnp.inf).reshape(-1))
    size = region.shape[-1]
    row, col = index // size, index % size
    xy = jnp.stack([col, row]).astype(jnp.float32)
    return xy, gt[row, col].astype(jnp.int32), region.any()

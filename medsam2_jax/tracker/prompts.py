"""Fixed-size prompts: padded points (a box is two points labelled 2 and 3) or a mask with a flag.

Coordinates are in model pixels (the frame resized to `image_size`). Padding points have label
-1 and `point_valid = False`; they are masked out of the decoder, so a padded prompt gives
exactly what the unpadded one gives.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import struct


@struct.dataclass
class Prompt:
    points: jax.Array  # (N, 2) float32 xy in model pixels
    labels: jax.Array  # (N,) int32; 1 positive, 0 negative, 2/3 box corners, -1 padding
    point_valid: jax.Array  # (N,) bool
    mask: jax.Array  # (S, S, 1) float32 binary mask at model resolution
    has_mask: jax.Array  # () bool array (never a Python bool); a mask prompt replaces the points


def _padded_size(n: int, max_points: int) -> int:
    return max_points * max(1, -(-n // max_points))


def make_prompt(image_size: int, max_points: int = 8, points=None, labels=None, box=None, mask=None) -> Prompt:
    """Host-side builder. `box` = (x0, y0, x1, y1) goes first, as in `add_new_points_or_box`."""
    pts = np.zeros((0, 2), np.float32) if points is None else np.asarray(points, np.float32).reshape(-1, 2)
    lab = np.zeros((0,), np.int32) if labels is None else np.asarray(labels, np.int32).reshape(-1)
    if box is not None:
        pts = np.concatenate([np.asarray(box, np.float32).reshape(2, 2), pts])
        lab = np.concatenate([np.array([2, 3], np.int32), lab])
    n = len(pts)
    size = _padded_size(n, max_points)
    points_p = np.zeros((size, 2), np.float32)
    labels_p = -np.ones((size,), np.int32)
    points_p[:n], labels_p[:n] = pts, lab
    valid = np.arange(size) < n
    if mask is None:
        mask_a, has_mask = np.zeros((image_size, image_size, 1), np.float32), False
    else:
        mask_a = np.asarray(mask, np.float32).reshape(image_size, image_size, 1)
        has_mask = True
    return Prompt(points_p, labels_p, valid, mask_a, np.asarray(has_mask))

"""A thin stateful image predictor with the official `SAM2ImagePredictor` contract.

    predictor = SAM2ImagePredictor(params, config)
    predictor.set_image(image)                   # H x W x 3 RGB or H x W grayscale, any size
    masks, ious, low_res = predictor.predict(point_coords=[[x, y]], point_labels=[1])

Masks come back in the input image's frame. Images are resized to the model resolution with
antialiased bilinear on floats (what torchvision's Resize does on the official path), so the
same picture gives the same network input as the official predictor.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from medsam2_jax.model import layers
from medsam2_jax.model.mask_decoder import mask_decoder
from medsam2_jax.model.prompt_encoder import dense_pe, prompt_encoder
from medsam2_jax.model.sam2 import add_no_mem_embed, forward_image, preprocess


def to_model_input(image, config) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) uint8 or float in [0, 1] -> (S, S, 3) normalised float32.

    Grayscale medical slices are replicated to three channels.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"expected an H x W or H x W x 3 image, got shape {img.shape}")
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    elif not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"expected uint8 or float pixels, got {img.dtype}; scale integer images to [0, 1] first")
    img = jnp.asarray(img, jnp.float32)[None]
    s = config.image_size
    img = layers.resize_bilinear(img, (s, s), antialias=True)
    return np.asarray(preprocess(img, config)[0])


@partial(jax.jit, static_argnums=(1,))
def _encode(params, config, images):
    feats = forward_image(params, images, config)
    return add_no_mem_embed(params, feats.vision_features), feats.high_res_features


@partial(jax.jit, static_argnums=(1, 7))
def _decode(params, config, image_embed, high_res, coords, labels, mask_input, multimask_output):
    pe = params["sam_prompt_encoder"]
    b = image_embed.shape[0] if coords is None else coords.shape[0]
    sparse, dense = prompt_encoder(pe, config, coords, labels, mask_input, batch=b)
    embed = jnp.broadcast_to(image_embed, (b,) + image_embed.shape[1:])
    high_res = [jnp.broadcast_to(h, (b,) + h.shape[1:]) for h in high_res]
    masks, iou, _, _ = mask_decoder(params["sam_mask_decoder"], embed, dense_pe(pe, config), sparse, dense,
                                    multimask_output, config, high_res)
    return masks, iou


class SAM2ImagePredictor:
    def __init__(self, params, config, mask_threshold: float = 0.0):
        self.params = params
        # Hashable, so it can be a static argument of the jitted encode/decode.
        self.config = ml_collections.FrozenConfigDict(config)
        self.mask_threshold = mask_threshold
        self.reset_predictor()

    def reset_predictor(self) -> None:
        self._features = None
        self._orig_hw: list[tuple[int, int]] = []
        self._is_image_set = False
        self._is_batch = False

    # ------------------------------------------------------------------------------------------
    def set_image(self, image) -> None:
        """Encode one image (H x W x 3 RGB or H x W grayscale, uint8 or float in [0, 1])."""
        self.reset_predictor()
        x = to_model_input(image, self.config)[None]
        embed, high_res = _encode(self.params, self.config, jnp.asarray(x))
        self._features = {"image_embed": embed, "high_res_feats": high_res}
        self._orig_hw = [tuple(np.asarray(image).shape[:2])]
        self._is_image_set = True

    def set_image_batch(self, images) -> None:
        """Encode a list of images (sizes may differ) in one batch."""
        self.reset_predictor()
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("set_image_batch expects a non-empty list of images")
        x = np.stack([to_model_input(im, self.config) for im in images])
        embed, high_res = _encode(self.params, self.config, jnp.asarray(x))
        self._features = {"image_embed": embed, "high_res_feats": high_res}
        self._orig_hw = [tuple(np.asarray(im).shape[:2]) for im in images]
        self._is_image_set = True
        self._is_batch = True

    def get_image_embedding(self):
        """(B, s, s, 256) embeddings (stride-16 features + no_mem_embed) of the set image(s)."""
        self._require_image()
        return self._features["image_embed"]

    # ------------------------------------------------------------------------------------------
    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                multimask_output: bool = True, return_logits: bool = False, normalize_coords: bool = True):
        """Masks (C, H, W) (or (B, C, H, W) for B prompts), IoU predictions, low-res logits.

        point_coords (N, 2) or (B, N, 2) xy, point_labels (N,) or (B, N) (1 fg, 0 bg), box
        (4,) or (B, 4) xyxy, mask_input (1, 256, 256) or (B, 1, 256, 256) low-res logits from an
        earlier call. With normalize_coords, coordinates are pixels of the original image;
        otherwise already normalised to [0, 1].
        """
        self._require_image()
        if self._is_batch:
            raise RuntimeError("images were set with set_image_batch; use predict_batch")
        return self._predict(0, point_coords, point_labels, box, mask_input, multimask_output,
                             return_logits, normalize_coords)

    def predict_batch(self, point_coords_batch=None, point_labels_batch=None, box_batch=None,
                      mask_input_batch=None, multimask_output: bool = True, return_logits: bool = False,
                      normalize_coords: bool = True):
        """Per-image lists of (masks, ious, low_res_masks) after `set_image_batch`."""
        self._require_image()
        n = len(self._orig_hw)
        pick = lambda xs, i: None if xs is None else xs[i]
        masks, ious, lows = [], [], []
        for i in range(n):
            m, q, low = self._predict(i, pick(point_coords_batch, i), pick(point_labels_batch, i),
                                      pick(box_batch, i), pick(mask_input_batch, i), multimask_output,
                                      return_logits, normalize_coords)
            masks.append(m)
            ious.append(q)
            lows.append(low)
        return masks, ious, lows

    # ------------------------------------------------------------------------------------------
    def _require_image(self):
        if not self._is_image_set:
            raise RuntimeError("an image must be set with set_image or set_image_batch before predicting")

    def _predict(self, img_idx, point_coords, point_labels, box, mask_input, multimask_output,
                 return_logits, normalize_coords):
        h, w = self._orig_hw[img_idx]
        s = self.config.image_size
        coords, labels, squeeze = self._prompt_points(point_coords, point_labels, box, (h, w), normalize_coords)
        if mask_input is not None:
            m = np.asarray(mask_input, np.float32)
            squeeze = squeeze if coords is not None else m.ndim == 3
            m = m.reshape(-1, *m.shape[-2:])[..., None]
            mask_input = jnp.asarray(m)
        if coords is None and mask_input is None:
            raise ValueError("predict needs at least one of point_coords, box or mask_input")
        if coords is not None:
            coords = jnp.asarray(coords * s)
            labels = jnp.asarray(labels)
        embed = self._features["image_embed"][img_idx : img_idx + 1]
        high_res = [f[img_idx : img_idx + 1] for f in self._features["high_res_feats"]]
        low, iou = _decode(self.params, self.config, embed, high_res, coords, labels, mask_input,
                           bool(multimask_output))
        masks = layers.resize_bilinear(jnp.moveaxis(low, 1, -1), (h, w), antialias=False)
        masks = np.moveaxis(np.asarray(masks), -1, 1)
        low = np.clip(np.asarray(low), -32.0, 32.0)
        iou = np.asarray(iou)
        if not return_logits:
            masks = masks > self.mask_threshold
        if squeeze:
            return masks[0], iou[0], low[0]
        return masks, iou, low

    @staticmethod
    def _prompt_points(point_coords, point_labels, box, hw, normalize_coords):
        """Points and box as (B, N, 2) coords in [0, 1] and (B, N) labels; box first (labels 2, 3)."""
        h, w = hw
        squeeze = True
        coords = labels = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            coords = np.asarray(point_coords, np.float32)
            labels = np.asarray(point_labels, np.int32)
            if coords.shape[-1] != 2 or labels.shape != coords.shape[:-1]:
                raise ValueError(f"point_coords {coords.shape} and point_labels {labels.shape} do not match")
            squeeze = coords.ndim == 2
            coords = coords.reshape(-1, *coords.shape[-2:])
            labels = labels.reshape(-1, labels.shape[-1])
        if box is not None:
            b = np.asarray(box, np.float32)
            squeeze = squeeze and b.ndim == 1
            b = b.reshape(-1, 2, 2)
            bl = np.tile(np.array([[2, 3]], np.int32), (b.shape[0], 1))
            if coords is not None:
                coords = np.concatenate([b, coords], axis=1)
                labels = np.concatenate([bl, labels], axis=1)
            else:
                coords, labels = b, bl
        if coords is not None and normalize_coords:
            coords = coords / np.array([w, h], np.float32)
        return coords, labels, squeeze

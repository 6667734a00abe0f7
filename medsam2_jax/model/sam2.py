"""SAM2Base as pure functions: parameters, image encoding, SAM heads, memory encoding.

The names follow `sam2/modeling/sam2_base.py` so the two can be read side by side. Images and
feature maps are NHWC; masks are (B, H, W, 1) where the official code has (B, 1, H, W).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from medsam2_jax.model import layers
from medsam2_jax.model.image_encoder import image_encoder, init_image_encoder
from medsam2_jax.model.mask_decoder import (
    dynamic_multimask_via_stability,
    init_mask_decoder,
    predict_masks,
)
from medsam2_jax.model.memory_attention import init_memory_attention
from medsam2_jax.model.memory_encoder import init_memory_encoder, memory_encoder
from medsam2_jax.model.prompt_encoder import dense_pe, init_prompt_encoder, prompt_encoder

NO_OBJ_SCORE = -1024.0


def _trunc_normal(key, shape, std=0.02):
    return layers.random_init(key, shape, "truncated", std)


def init_params(key, config) -> dict:
    """A full parameter pytree with the official initialisation scheme (random weights).

    Use `jax.eval_shape(lambda: init_params(key, config))` for shapes only (large models).
    """
    ks = iter(layers.split_key(key, 16))
    d, m = config.hidden_dim, config.mem_dim
    p = {
        "image_encoder": init_image_encoder(next(ks), config),
        "sam_prompt_encoder": init_prompt_encoder(next(ks), config),
        "sam_mask_decoder": init_mask_decoder(next(ks), config),
        "memory_encoder": init_memory_encoder(next(ks), config),
        "memory_attention": init_memory_attention(next(ks), config),
        "maskmem_tpos_enc": _trunc_normal(next(ks), (config.num_maskmem, 1, 1, m)),
        "no_mem_embed": _trunc_normal(next(ks), (1, 1, d)),
        "no_mem_pos_enc": _trunc_normal(next(ks), (1, 1, d)),
    }
    if config.use_obj_ptrs_in_encoder:
        p["mask_downsample"] = layers.init_conv(next(ks), 1, 1, 4)
        if config.use_mlp_for_obj_ptr_proj:
            p["obj_ptr_proj"] = layers.init_mlp(next(ks), d, d, d, 3)
        else:
            p["obj_ptr_proj"] = layers.init_linear(next(ks), d, d)
        if config.proj_tpos_enc_in_obj_ptrs:
            p["obj_ptr_tpos_proj"] = layers.init_linear(next(ks), d, m)
    if config.pred_obj_scores and config.use_obj_ptrs_in_encoder:
        p["no_obj_ptr"] = _trunc_normal(next(ks), (1, d))
    if config.no_obj_embed_spatial:
        p["no_obj_embed_spatial"] = _trunc_normal(next(ks), (1, m))
    return p


def preprocess(images, config):
    """float RGB in [0, 1], (B, S, S, 3) at the model resolution -> ImageNet-normalised."""
    mean = jnp.asarray(config.pixel_mean, jnp.float32)
    std = jnp.asarray(config.pixel_std, jnp.float32)
    return (images - mean) / std


@struct.dataclass
class FrameFeatures:
    """What the image encoder gives the heads and the tracker, for a stack of frames or one frame
    (as TAPIR passes its `FeatureGrids`): the raw stride-16 features, their positional encoding
    (the same for every frame, so never stacked) and the two high-resolution maps the mask decoder
    upsamples with, already through conv_s0/s1 (None without `use_high_res_features_in_sam`).

    `frame(i)` takes frame i of a stack; `batched()` adds the batch axis of one frame that the
    SAM heads expect.
    """

    vision_features: jax.Array  # ([T,] s, s, 256)
    vision_pos_enc: jax.Array  # (s, s, 256)
    high_res_features: tuple | None  # (([T,] 4s, 4s, 32), ([T,] 2s, 2s, 64))

    def map_frames(self, fn):
        """`fn` applied to every per-frame array (not the shared positional encoding)."""
        hr = self.high_res_features
        return self.replace(vision_features=fn(self.vision_features),
                            high_res_features=None if hr is None else tuple(fn(h) for h in hr))

    def frame(self, i) -> FrameFeatures:
        return self.map_frames(lambda x: x[i])

    def batched(self) -> FrameFeatures:
        return self.map_frames(lambda x: x[None])


def forward_image(params, images, config) -> FrameFeatures:
    """`forward_image` + `_prepare_backbone_features` for normalised (B, S, S, 3) images.

    Returns vision_features (B, s, s, 256) raw stride-16 features, vision_pos_enc (s, s, 256),
    and high_res_features (s0 (B, 4s, 4s, 32), s1 (B, 2s, 2s, 64)) already through conv_s0/s1.
    """
    fpn, pos = image_encoder(params["image_encoder"], images, config)
    high_res = None
    if config.use_high_res_features_in_sam:
        dec = params["sam_mask_decoder"]
        high_res = (layers.conv(dec["conv_s0"], fpn[0]), layers.conv(dec["conv_s1"], fpn[1]))
    return FrameFeatures(vision_features=fpn[-1], vision_pos_enc=pos[-1], high_res_features=high_res)


def add_no_mem_embed(params, vision_features):
    """Features of an image with no memory: what the image predictor and first frames use."""
    return vision_features + params["no_mem_embed"][0, 0]


def _obj_ptr(params, token, is_obj_appearing, object_score_logits, config):
    """The object pointer from a mask token, blended towards `no_obj_ptr` where no object appears."""
    proj = params["obj_ptr_proj"]
    obj_ptr = layers.mlp(proj, token) if "layers" in proj else layers.linear(proj, token)
    if config.soft_no_obj_ptr:
        lambda_is_obj_appearing = jax.nn.sigmoid(object_score_logits)
    else:
        lambda_is_obj_appearing = is_obj_appearing.astype(jnp.float32)
    return _mix_no_obj_ptr(params, obj_ptr, lambda_is_obj_appearing, config)


def _mix_no_obj_ptr(params, obj_ptr, lambda_is_obj_appearing, config):
    """With `pred_obj_scores`, the pointer of an absent object (lambda 0) becomes `no_obj_ptr`."""
    if config.pred_obj_scores:
        if config.fixed_no_obj_ptr:
            obj_ptr = lambda_is_obj_appearing * obj_ptr
        obj_ptr = obj_ptr + (1 - lambda_is_obj_appearing) * params["no_obj_ptr"]
    return obj_ptr


def forward_sam_heads(params, backbone_features, config, point_coords=None, point_labels=None,
                      mask_inputs=None, high_res_features=None, multimask_output=False,
                      point_mask=None, mask_valid=None):
    """`_forward_sam_heads`. `multimask_output` may be a Python bool or a traced bool scalar.

    point_coords (B, N, 2) xy in the model frame, point_labels (B, N) int; mask_inputs
    (B, H, W, 1) logits at any size (resized to the decoder's mask-input size with antialias).
    For prompts of a fixed size: point_mask (B, N) marks real points, mask_valid (B,) real
    mask inputs (the others get the "no mask" embedding, as with no mask_inputs).

    Returns a dict with the same keys and shapes whether `multimask_output` is static or traced:
    the chosen mask, low_res_masks (B, 4s, 4s, 1), high_res_masks (B, S, S, 1), iou (B,),
    obj_ptr (B, 256), object_score_logits (B, 1); and the decoder's M multimask candidates,
    candidate_masks (B, 4s, 4s, M) and candidate_ious (B, M), whatever the flag
    (`multimask_candidates` gives the official `low_res_multimasks` and `ious` from them).
    The decoder runs once.
    """
    b = backbone_features.shape[0]
    s = backbone_features.shape[1]
    if point_coords is None:
        point_coords = jnp.zeros((b, 1, 2), jnp.float32)
        point_labels = -jnp.ones((b, 1), jnp.int32)
    if mask_inputs is not None and mask_inputs.shape[1:3] != (4 * s, 4 * s):
        mask_inputs = layers.resize_bilinear(mask_inputs.astype(jnp.float32), (4 * s, 4 * s), antialias=True)
    pe_params = params["sam_prompt_encoder"]
    sparse, dense = prompt_encoder(pe_params, config, point_coords, point_labels, mask_inputs)
    if mask_valid is not None:
        no_mask = jnp.broadcast_to(pe_params["no_mask_embed"][0], dense.shape).astype(dense.dtype)
        dense = jnp.where(mask_valid[:, None, None, None], dense, no_mask)
    token_mask = None
    if point_mask is not None:  # the padding point appended by the prompt encoder is real
        token_mask = jnp.concatenate([point_mask, jnp.ones((b, 1), bool)], axis=1)
    all_masks, all_ious, tokens, obj_logits = predict_masks(
        params["sam_mask_decoder"], backbone_features, dense_pe(pe_params, config), sparse, dense, config,
        high_res_features, token_mask,
    )
    is_obj = obj_logits > 0

    # Multimask: best-IoU of masks 1..3 and its token (use_multimask_token_for_obj_ptr).
    multi_best = jnp.argmax(all_ious[:, 1:], axis=-1) + 1
    multi_mask = jnp.take_along_axis(all_masks, multi_best[:, None, None, None], axis=1)[:, 0]
    multi_iou = jnp.take_along_axis(all_ious, multi_best[:, None], axis=1)[:, 0]
    multi_token_idx = multi_best if config.use_multimask_token_for_obj_ptr else jnp.zeros_like(multi_best)
    multi_token = jnp.take_along_axis(tokens, multi_token_idx[:, None, None], axis=1)[:, 0]
    # Single mask: token 0, mask 0 or the dynamic-stability fallback.
    if config.mask_decoder.dynamic_multimask_via_stability:
        single_mask, single_iou = dynamic_multimask_via_stability(all_masks, all_ious, config)
        single_mask, single_iou = single_mask[:, 0], single_iou[:, 0]
    else:
        single_mask, single_iou = all_masks[:, 0], all_ious[:, 0]
    single_token = tokens[:, 0]

    mm = jnp.asarray(multimask_output)
    low_res = jnp.where(mm, multi_mask, single_mask)[..., None].astype(jnp.float32)
    if config.pred_obj_scores:
        # The stability fallback above sees the raw logits, as in the official decoder; the
        # "no object" override comes after it.
        low_res = jnp.where(is_obj[:, :, None, None], low_res, NO_OBJ_SCORE)
        all_masks = jnp.where(is_obj[:, :, None, None], all_masks, NO_OBJ_SCORE)
    iou = jnp.where(mm, multi_iou, single_iou)
    token = jnp.where(mm, multi_token, single_token)
    high_res = layers.resize_bilinear(low_res, (config.image_size, config.image_size), antialias=False)
    return {
        "low_res_masks": low_res,
        "high_res_masks": high_res,
        "iou": iou,
        "obj_ptr": _obj_ptr(params, token, is_obj, obj_logits, config),
        "object_score_logits": obj_logits,
        "candidate_masks": jnp.moveaxis(all_masks[:, 1:], 1, -1).astype(jnp.float32),
        "candidate_ious": all_ious[:, 1:],
    }


def multimask_candidates(sam, multimask_output):
    """The official `_forward_sam_heads`' `low_res_multimasks` (B, 4s, 4s, M) and `ious` (B, M)
    from `forward_sam_heads`' outputs, at one width M: the M candidates with multimask output,
    else the chosen mask repeated M times (which leaves SAM2Train's best-of-M loss and its IoU
    mean unchanged). `multimask_output` static or traced, as forward_sam_heads got it."""
    mm = jnp.asarray(multimask_output)
    masks, ious = sam["candidate_masks"], sam["candidate_ious"]
    return (jnp.where(mm, masks, jnp.broadcast_to(sam["low_res_masks"], masks.shape)),
            jnp.where(mm, ious, jnp.broadcast_to(sam["iou"][:, None], ious.shape)))


def use_multimask(config, is_init_cond_frame, num_points):
    """`_use_multimask`: whether the SAM heads output the best of M candidates. A Python bool when
    `is_init_cond_frame` and `num_points` are Python values, else a traced bool."""
    if not (config.multimask_output_in_sam and (is_init_cond_frame or config.multimask_output_for_tracking)):
        return False
    return (config.multimask_min_pt_num <= num_points) & (num_points <= config.multimask_max_pt_num)


def box_mask_prompt(config, point_coords=None, point_labels=None, point_mask=None, mask_inputs=None) -> dict:
    """The mask-input arguments of `forward_sam_heads` for a prompt (`mask_inputs`, `mask_valid`):
    `mask_inputs` as given; for a model trained with `config.box_mask_prompt` and no mask input,
    the box drawn as one (`box_mask_input`), valid where the prompt holds a box, so that a click
    gets SAM 2's `no_mask_embed` as without the option; without points (a tracked frame) no mask
    input at all, which gives that embedding too."""
    if not config.get("box_mask_prompt", False) or mask_inputs is not None or point_coords is None:
        return {"mask_inputs": mask_inputs}  # no points (a tracked frame): no box, nothing to draw
    size = 4 * (config.image_size // config.backbone_stride)
    return {"mask_inputs": box_mask_input(point_coords, point_labels, point_mask, config, size),
            "mask_valid": _has_box(point_labels, _valid_points(point_labels, point_mask))}


def box_mask_input(point_coords, point_labels, point_mask, config, size: int):
    """(B, size, size, 1) mask-input logits: +10 inside the box (the points labelled 2 and 3),
    -10 elsewhere and everywhere when there is no box (`box_mask_prompt` then marks the mask
    input invalid, so a tracked frame is not read as "a box around nothing").

    Only for models trained with `config.box_mask_prompt` (the shipped demo model): the box then
    also enters as a dense mask prompt, spatially aligned with the image features, which a model
    trained from scratch learns much faster than the sparse corner tokens alone (in a 150-step
    probe on box-prompted slices only the dense box learned). Official SAM 2 weights do not use this.
    """
    valid = _valid_points(point_labels, point_mask)
    corner = lambda label: jnp.sum(jnp.where(((point_labels == label) & valid)[..., None], point_coords, 0.0), 1)  # noqa: E731
    has_box = _has_box(point_labels, valid)
    (x0, y0), (x1, y1) = jnp.moveaxis(corner(2), -1, 0), jnp.moveaxis(corner(3), -1, 0)
    centres = (jnp.arange(size, dtype=jnp.float32) + 0.5) * (config.image_size / size)
    inside_x = (centres[None, :] >= x0[:, None]) & (centres[None, :] <= x1[:, None] + 1.0)
    inside_y = (centres[None, :] >= y0[:, None]) & (centres[None, :] <= y1[:, None] + 1.0)
    inside = inside_y[:, :, None] & inside_x[:, None, :] & has_box[:, None, None]
    return jnp.where(inside, 10.0, -10.0)[..., None].astype(jnp.float32)


def _valid_points(point_labels, point_mask):
    """(B, N) real, non-padding points."""
    return point_labels >= 0 if point_mask is None else point_mask & (point_labels >= 0)


def _has_box(point_labels, valid):
    """(B,) whether the prompt holds a box (valid points labelled 2 and 3)."""
    return jnp.any((point_labels == 2) & valid, 1) & jnp.any((point_labels == 3) & valid, 1)


def use_mask_as_output(params, backbone_features, high_res_features, mask_inputs, config):
    """`_use_mask_as_output`: a binary (B, S, S, 1) mask prompt becomes the output (+-10 logits)."""
    out_scale, out_bias = 20.0, -10.0
    m = mask_inputs.astype(jnp.float32)
    high_res = m * out_scale + out_bias
    h, w = high_res.shape[1:3]
    low_res = layers.resize_bilinear(high_res, (h // 4, w // 4), antialias=True)
    b = m.shape[0]
    is_obj = jnp.any(m.reshape(b, -1) > 0.0, axis=1)[:, None]
    if config.use_obj_ptrs_in_encoder:
        small = layers.conv(params["mask_downsample"], m, stride=4)
        sam = forward_sam_heads(params, backbone_features, config, mask_inputs=small,
                                high_res_features=high_res_features, multimask_output=False)
        obj_ptr = sam["obj_ptr"]
    else:
        obj_ptr = jnp.zeros((b, config.hidden_dim), jnp.float32)
    # As the official code: whether the object appears is read from the mask, not the decoder.
    lam = is_obj.astype(jnp.float32)
    obj_ptr = _mix_no_obj_ptr(params, obj_ptr, lam, config)
    return {
        "low_res_masks": low_res,
        "high_res_masks": high_res,
        "iou": jnp.ones((b,), jnp.float32),
        "obj_ptr": obj_ptr,
        "object_score_logits": out_scale * lam + out_bias,
    }


def encode_new_memory(params, pix_feat, high_res_masks, object_score_logits, is_mask_from_pts, config,
                      training: bool = False):
    """`_encode_new_memory`: (maskmem_features (B, s, s, 64), maskmem_pos_enc (s, s, 64)).

    `is_mask_from_pts` may be traced: with `binarize_mask_from_pts_for_mem_enc` (eval) a mask that
    came from clicks is binarised instead of passed through a sigmoid.
    """
    soft = jax.nn.sigmoid(high_res_masks)
    if config.binarize_mask_from_pts_for_mem_enc and not training:
        hard = (high_res_masks > 0).astype(jnp.float32)
        mask = jnp.where(jnp.asarray(is_mask_from_pts), hard, soft)
    else:
        mask = soft
    mask = mask * config.sigmoid_scale_for_mem_enc + config.sigmoid_bias_for_mem_enc
    feats, pos = memory_encoder(params["memory_encoder"], pix_feat, mask, config)
    if config.no_obj_embed_spatial:
        is_obj = (object_score_logits > 0).astype(jnp.float32)  # (B, 1)
        feats = feats + (1 - is_obj)[:, None, None, :] * params["no_obj_embed_spatial"][0]
    return feats, pos

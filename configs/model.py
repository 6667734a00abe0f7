"""Model configs for SAM 2 / SAM 2.1 in every size, MedSAM2's 512-px tiny, and a small test model.

One file serves all variants (big_vision style): `configs/model.py:sam2.1_tiny`, or from Python
`get_config("sam2.1_tiny")`. Every SAM 2 flag that changes what the model computes is a field
here; the values mirror the official YAMLs plus the overrides that `build_sam2` /
`build_sam2_video_predictor` inject (dynamic multimask, binarised memory masks, hole filling).

Variants:
  sam2_{tiny,small,base_plus,large}     SAM 2 (07/2024)
  sam2.1_{tiny,small,base_plus,large}   SAM 2.1 (09/2024)
  medsam2                               SAM 2.1 tiny at 512 px (bowang-lab MedSAM2 fine-tunes)
  test, test_sam2                       10 M-parameter model at 256 px for fast tests
  demo                                  the 5 M-parameter model trained here and shipped
                                        (medsam2_jax/weights/medsam2_jax_demo): test trunk, one
                                        decoder and one memory-attention layer, 128 px
"""

from __future__ import annotations

import ml_collections

SIZES = {
    # embed_dim, num_heads, stages, global_att_blocks, window_pos_embed_bkg_spatial_size, window_spec
    "tiny": (96, 1, (1, 2, 7, 2), (5, 7, 9), (7, 7), (8, 4, 14, 7)),
    "small": (96, 1, (1, 2, 11, 2), (7, 10, 13), (7, 7), (8, 4, 14, 7)),
    "base_plus": (112, 2, (2, 3, 16, 3), (12, 16, 20), (14, 14), (8, 4, 14, 7)),
    "large": (144, 2, (2, 6, 36, 4), (23, 33, 43), (7, 7), (8, 4, 16, 8)),
}

VARIANTS = tuple(
    [f"sam2_{s}" for s in SIZES] + [f"sam2.1_{s}" for s in SIZES] + ["medsam2", "test", "test_sam2", "demo"]
)


def _trunk(size: str) -> ml_collections.ConfigDict:
    embed_dim, num_heads, stages, global_att, bkg, window_spec = SIZES[size]
    return ml_collections.ConfigDict(
        dict(
            embed_dim=embed_dim,
            num_heads=num_heads,
            stages=stages,
            global_att_blocks=global_att,
            window_pos_embed_bkg_spatial_size=bkg,
            window_spec=window_spec,
            q_pool=3,
            q_stride=(2, 2),
            dim_mul=2.0,
            head_mul=2.0,
            mlp_ratio=4.0,
            drop_path_rate=0.0,
        )
    )


def _base(version: str, size: str, image_size: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = f"{version}_{size}"
    c.version = version
    c.image_size = image_size
    c.backbone_stride = 16
    c.hidden_dim = 256
    c.mem_dim = 64
    # ImageNet normalisation applied to [0, 1] RGB.
    c.pixel_mean = (0.485, 0.456, 0.406)
    c.pixel_std = (0.229, 0.224, 0.225)

    c.trunk = _trunk(size)
    embed_dim = c.trunk.embed_dim
    c.neck = ml_collections.ConfigDict(
        dict(
            d_model=256,
            backbone_channel_list=tuple(embed_dim * 2**i for i in (3, 2, 1, 0)),
            fpn_top_down_levels=(2, 3),
            fpn_interp_model="nearest",
            fuse_type="sum",
            scalp=1,
        )
    )
    c.prompt_encoder = ml_collections.ConfigDict(dict(mask_in_chans=16))
    c.mask_decoder = ml_collections.ConfigDict(
        dict(
            num_multimask_outputs=3,
            transformer_depth=2,
            transformer_mlp_dim=2048,
            transformer_num_heads=8,
            attention_downsample_rate=2,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            # Injected by build_sam2(apply_postprocessing=True).
            dynamic_multimask_via_stability=True,
            dynamic_multimask_stability_delta=0.05,
            dynamic_multimask_stability_thresh=0.98,
        )
    )
    c.memory_attention = ml_collections.ConfigDict(
        dict(
            d_model=256,
            num_layers=4,
            num_heads=1,
            dim_feedforward=2048,
            rope_theta=10000.0,
            pos_enc_at_input=True,
            pos_enc_at_attn=False,
            pos_enc_at_cross_attn_keys=True,
            pos_enc_at_cross_attn_queries=False,
            dropout=0.1,
        )
    )
    c.memory_encoder = ml_collections.ConfigDict(
        dict(
            out_dim=64,
            mask_downsampler_kernel=3,
            mask_downsampler_stride=2,
            mask_downsampler_padding=1,
            mask_downsampler_total_stride=16,
            fuser_num_layers=2,
            fuser_kernel=7,
            fuser_layer_scale_init=1e-6,
        )
    )

    v21 = version == "sam2.1"
    # SAM2Base flags (sam2-architecture.md section 1.8), released-config values.
    c.num_maskmem = 7
    c.sigmoid_scale_for_mem_enc = 20.0
    c.sigmoid_bias_for_mem_enc = -10.0
    c.binarize_mask_from_pts_for_mem_enc = True  # build_sam2_video_predictor override
    c.use_mask_input_as_output_without_sam = True
    c.max_cond_frames_in_attn = -1
    c.directly_add_no_mem_embed = True
    c.use_high_res_features_in_sam = True
    c.multimask_output_in_sam = True
    c.multimask_min_pt_num = 0
    c.multimask_max_pt_num = 1
    c.multimask_output_for_tracking = True
    c.use_multimask_token_for_obj_ptr = True
    c.iou_prediction_use_sigmoid = True
    c.memory_temporal_stride_for_eval = 1
    c.non_overlap_masks_for_mem_enc = False
    c.use_obj_ptrs_in_encoder = True
    c.max_obj_ptrs_in_encoder = 16
    c.add_tpos_enc_to_obj_ptrs = v21
    c.proj_tpos_enc_in_obj_ptrs = v21
    c.use_signed_tpos_enc_to_obj_ptrs = v21
    c.only_obj_ptrs_in_the_past_for_eval = True
    c.pred_obj_scores = True
    c.box_mask_prompt = False  # ours, not SAM 2's: a box also as a dense mask prompt (demo model only)
    c.pred_obj_scores_mlp = True
    c.fixed_no_obj_ptr = True
    c.soft_no_obj_ptr = False
    c.use_mlp_for_obj_ptr_proj = True
    c.no_obj_embed_spatial = v21
    c.fill_hole_area = 8  # build_sam2_video_predictor override; needs connected components

    # Numerics: "auto" picks chunked online-softmax attention on CPU and the fused
    # jax.nn.dot_product_attention elsewhere (see medsam2_jax/model/attention.py).
    c.attention_impl = "auto"
    return c


def _test(version: str) -> ml_collections.ConfigDict:
    """The 10 M-parameter model of testing-against-sam2.md; its numbers match the hydra overrides."""
    c = _base(version, "tiny", 256)
    c.name = "test" if version == "sam2.1" else "test_sam2"
    c.trunk.embed_dim = 32
    c.trunk.num_heads = 1
    c.trunk.stages = (1, 1, 2, 1)
    c.trunk.global_att_blocks = (3,)
    c.trunk.window_pos_embed_bkg_spatial_size = (4, 4)
    c.neck.backbone_channel_list = (256, 128, 64, 32)
    c.memory_attention.num_layers = 2
    return c


def _demo() -> ml_collections.ConfigDict:
    """Small enough to train on two CPU cores in well under an hour and to ship (about 21 MB)."""
    c = _test("sam2.1")
    c.name = "demo"
    c.image_size = 128
    c.mask_decoder.transformer_depth = 1
    c.mask_decoder.transformer_mlp_dim = 256
    c.memory_attention.num_layers = 1
    c.memory_attention.dim_feedforward = 256
    # A box also enters as a dense mask prompt (sam2.box_mask_input): learnable from scratch.
    c.box_mask_prompt = True
    # Tracked frames use the single-mask token, as SAM 2 (not 2.1) does. With three candidates a
    # from-scratch IoU head, trained towards 0 while tracked masks are still empty, kept picking
    # an empty candidate although another held the object (measured here, stage-2 probes).
    c.multimask_output_for_tracking = False
    return c


def get_config(variant: str = "sam2.1_tiny") -> ml_collections.ConfigDict:
    if variant == "demo":
        return _demo()
    if variant == "medsam2":
        c = _base("sam2.1", "tiny", 512)
        c.name = "medsam2"
        return c
    if variant == "test":
        return _test("sam2.1")
    if variant == "test_sam2":
        return _test("sam2")
    version, _, size = variant.partition("_")
    if version not in ("sam2", "sam2.1") or size not in SIZES:
        raise ValueError(f"unknown model variant {variant!r}; choose one of: {', '.join(VARIANTS)}")
    return _base(version, size, 1024)

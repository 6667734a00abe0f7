"""Two-way transformer and mask decoder (official `sam/transformer.py`, `sam/mask_decoder.py`).

`token_mask` (B, N_sparse) lets fixed-size padded prompts behave exactly like the ragged prompts
of the official model: masked sparse tokens are dropped as attention keys everywhere, so they
do not change the output tokens (the tracker pads prompts to a fixed size to avoid recompiles).
"""

from __future__ import annotations

import jax.numpy as jnp

from medsam2_jax.model import layers
from medsam2_jax.model.attention import dot_product_attention

TRANSFORMER_LN_EPS = 1e-5
LN2D_EPS = 1e-6


def init_attention(key, dim: int, num_heads: int, downsample_rate: int = 1, kv_in_dim: int | None = None):
    internal = dim // downsample_rate
    kv_in = dim if kv_in_dim is None else kv_in_dim
    ks = layers.split_key(key, 4)
    return {
        "q_proj": layers.init_linear(ks[0], dim, internal),
        "k_proj": layers.init_linear(ks[1], kv_in, internal),
        "v_proj": layers.init_linear(ks[2], kv_in, internal),
        "out_proj": layers.init_linear(ks[3], internal, dim),
    }


def attention(p, q, k, v, num_heads: int, impl: str, key_mask=None):
    """SAM's `Attention`: project, split heads, SDPA, merge heads, project out."""
    q = layers.linear(p["q_proj"], q)
    k = layers.linear(p["k_proj"], k)
    v = layers.linear(p["v_proj"], v)
    split = lambda x: x.reshape(*x.shape[:2], num_heads, -1)
    out = dot_product_attention(split(q), split(k), split(v), key_mask=key_mask, impl=impl)
    return layers.linear(p["out_proj"], out.reshape(*out.shape[:2], -1))


def init_two_way_transformer(key, config) -> dict:
    md = config.mask_decoder
    d = config.hidden_dim
    ks = layers.split_key(key, md.transformer_depth + 1)
    blocks = []
    for i in range(md.transformer_depth):
        kk = layers.split_key(ks[i], 4)
        blocks.append(
            {
                "self_attn": init_attention(kk[0], d, md.transformer_num_heads),
                "norm1": layers.init_layer_norm(d),
                "cross_attn_token_to_image": init_attention(
                    kk[1], d, md.transformer_num_heads, md.attention_downsample_rate
                ),
                "norm2": layers.init_layer_norm(d),
                "mlp": layers.init_mlp(kk[2], d, md.transformer_mlp_dim, d, 2),
                "norm3": layers.init_layer_norm(d),
                "norm4": layers.init_layer_norm(d),
                "cross_attn_image_to_token": init_attention(
                    kk[3], d, md.transformer_num_heads, md.attention_downsample_rate
                ),
            }
        )
    return {
        "layers": blocks,
        "final_attn_token_to_image": init_attention(
            ks[-1], d, md.transformer_num_heads, md.attention_downsample_rate
        ),
        "norm_final_attn": layers.init_layer_norm(d),
    }


def two_way_transformer(p, image_embedding, image_pe, point_embedding, config, token_mask=None):
    """image_embedding/image_pe (B, h, w, C), point_embedding (B, N, C) -> (queries, keys)."""
    heads = config.mask_decoder.transformer_num_heads
    impl = config.attention_impl
    b, h, w, c = image_embedding.shape
    keys = image_embedding.reshape(b, h * w, c)
    key_pe = jnp.broadcast_to(image_pe, image_embedding.shape).reshape(b, h * w, c)
    queries = point_embedding
    ln = lambda pp, x: layers.layer_norm(pp, x, TRANSFORMER_LN_EPS)
    for i, lp in enumerate(p["layers"]):
        if i == 0:  # skip_first_layer_pe: no PE and no residual
            queries = attention(lp["self_attn"], queries, queries, queries, heads, impl, token_mask)
        else:
            q = queries + point_embedding
            queries = queries + attention(lp["self_attn"], q, q, queries, heads, impl, token_mask)
        queries = ln(lp["norm1"], queries)
        q = queries + point_embedding
        k = keys + key_pe
        queries = queries + attention(lp["cross_attn_token_to_image"], q, k, keys, heads, impl)
        queries = ln(lp["norm2"], queries)
        queries = ln(lp["norm3"], queries + layers.mlp(lp["mlp"], queries))
        q = queries + point_embedding
        k = keys + key_pe
        keys = keys + attention(lp["cross_attn_image_to_token"], k, q, queries, heads, impl, token_mask)
        keys = ln(lp["norm4"], keys)
    q = queries + point_embedding
    k = keys + key_pe
    queries = queries + attention(p["final_attn_token_to_image"], q, k, keys, heads, impl)
    return ln(p["norm_final_attn"], queries), keys


def num_mask_tokens(config) -> int:
    return config.mask_decoder.num_multimask_outputs + 1


def init_mask_decoder(key, config) -> dict:
    md = config.mask_decoder
    d = config.hidden_dim
    n = num_mask_tokens(config)
    ks = layers.split_key(key, 12 + n)
    emb = lambda k, rows: layers.random_init(k, (rows, d), "normal", 1.0)
    p = {
        "transformer": init_two_way_transformer(ks[0], config),
        "iou_token": emb(ks[1], 1),
        "mask_tokens": emb(ks[2], n),
        # Keys follow the official Sequential indices; 2 and 4 are parameter-free GELUs.
        "output_upscaling": {
            "0": layers.init_conv_transpose(ks[3], d, d // 4, 2),
            "1": layers.init_layer_norm(d // 4),
            "3": layers.init_conv_transpose(ks[4], d // 4, d // 8, 2),
        },
        "output_hypernetworks_mlps": [layers.init_mlp(ks[12 + i], d, d, d // 8, 3) for i in range(n)],
        "iou_prediction_head": layers.init_mlp(ks[5], d, md.iou_head_hidden_dim, n, md.iou_head_depth),
    }
    if config.use_high_res_features_in_sam:
        p["conv_s0"] = layers.init_conv(ks[6], d, d // 8, 1)
        p["conv_s1"] = layers.init_conv(ks[7], d, d // 4, 1)
    if config.pred_obj_scores:
        p["obj_score_token"] = emb(ks[8], 1)
        if config.pred_obj_scores_mlp:
            p["pred_obj_score_head"] = layers.init_mlp(ks[9], d, d, 1, 3)
        else:
            p["pred_obj_score_head"] = layers.init_linear(ks[9], d, 1)
    return p


def predict_masks(p, image_embeddings, image_pe, sparse, dense, config, high_res_features=None, token_mask=None):
    """All mask tokens: (masks (B, 4, 4s, 4s), iou (B, 4), mask tokens (B, 4, C), object logit (B, 1))."""
    b = sparse.shape[0]
    n = num_mask_tokens(config)
    toks = [p["iou_token"], p["mask_tokens"]]
    s = 0
    if config.pred_obj_scores:
        toks = [p["obj_score_token"]] + toks
        s = 1
    output_tokens = jnp.broadcast_to(jnp.concatenate(toks, 0)[None], (b, n + 1 + s, config.hidden_dim))
    tokens = jnp.concatenate([output_tokens, sparse.astype(output_tokens.dtype)], axis=1)
    if token_mask is not None:
        token_mask = jnp.concatenate([jnp.ones((b, n + 1 + s), bool), token_mask], axis=1)
    src = image_embeddings + dense
    hs, src = two_way_transformer(p["transformer"], src, image_pe, tokens, config, token_mask)
    iou_token_out = hs[:, s]
    mask_tokens_out = hs[:, s + 1 : s + 1 + n]
    _, h, w, c = image_embeddings.shape
    src = src.reshape(b, h, w, c)
    up = p["output_upscaling"]
    x = layers.conv_transpose_2x2(up["0"], src)
    if config.use_high_res_features_in_sam:
        feat_s0, feat_s1 = high_res_features
        x = layers.gelu(layers.layer_norm(up["1"], x + feat_s1, LN2D_EPS))
        x = layers.gelu(layers.conv_transpose_2x2(up["3"], x) + feat_s0)
    else:
        x = layers.gelu(layers.layer_norm(up["1"], x, LN2D_EPS))
        x = layers.gelu(layers.conv_transpose_2x2(up["3"], x))
    hyper = jnp.stack(
        [layers.mlp(p["output_hypernetworks_mlps"][i], mask_tokens_out[:, i]) for i in range(n)], axis=1
    )
    masks = jnp.einsum("bnc,bhwc->bnhw", hyper, x)
    iou_pred = layers.mlp(p["iou_prediction_head"], iou_token_out, sigmoid_output=config.iou_prediction_use_sigmoid)
    if config.pred_obj_scores:
        head = p["pred_obj_score_head"]
        obj = layers.mlp(head, hs[:, 0]) if "layers" in head else layers.linear(head, hs[:, 0])
    else:
        obj = 10.0 * jnp.ones((b, 1), iou_pred.dtype)
    return masks, iou_pred, mask_tokens_out, obj


def stability_scores(mask_logits, delta: float):
    flat = mask_logits.reshape(*mask_logits.shape[:-2], -1)
    area_i = jnp.sum(flat > delta, axis=-1).astype(jnp.float32)
    area_u = jnp.sum(flat > -delta, axis=-1).astype(jnp.float32)
    return jnp.where(area_u > 0, area_i / jnp.maximum(area_u, 1.0), 1.0)


def dynamic_multimask_via_stability(all_masks, all_ious, config):
    """Keep the single-mask output if it is stable, else the best of the multimask outputs."""
    md = config.mask_decoder
    multi_masks, multi_ious = all_masks[:, 1:], all_ious[:, 1:]
    best = jnp.argmax(multi_ious, axis=-1)
    best_masks = jnp.take_along_axis(multi_masks, best[:, None, None, None], axis=1)
    best_ious = jnp.take_along_axis(multi_ious, best[:, None], axis=1)
    single_masks, single_ious = all_masks[:, :1], all_ious[:, :1]
    stable = (stability_scores(single_masks, md.dynamic_multimask_stability_delta)
              >= md.dynamic_multimask_stability_thresh)
    masks = jnp.where(stable[..., None, None], single_masks, best_masks)
    ious = jnp.where(stable, single_ious, best_ious)
    return masks, ious


def mask_decoder(p, image_embeddings, image_pe, sparse, dense, multimask_output, config,
                 high_res_features=None, token_mask=None, training: bool = False):
    """MaskDecoder.forward with a static `multimask_output`.

    Returns (masks (B, M, 4s, 4s), iou_pred (B, M), sam_tokens_out, object_score_logits (B, 1)).
    The tracker, which decides multimask per frame inside a scan, uses `predict_masks` directly.
    """
    masks, iou, tokens, obj = predict_masks(p, image_embeddings, image_pe, sparse, dense, config, high_res_features,
                                            token_mask)
    md = config.mask_decoder
    if multimask_output:
        masks, iou = masks[:, 1:], iou[:, 1:]
    elif md.dynamic_multimask_via_stability and not training:
        masks, iou = dynamic_multimask_via_stability(masks, iou, config)
    else:
        masks, iou = masks[:, :1], iou[:, :1]
    if multimask_output and config.use_multimask_token_for_obj_ptr:
        sam_tokens = tokens[:, 1:]
    else:
        sam_tokens = tokens[:, :1]
    return masks, iou, sam_tokens, obj

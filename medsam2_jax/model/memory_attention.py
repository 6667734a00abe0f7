"""Memory attention (official `memory_attention.py` with `RoPEAttention`).

Current-frame tokens self-attend with axial RoPE, then cross-attend to the memory: spatial
memory tokens (rotated with the same per-frame RoPE table, tiled per memory frame) followed by
object-pointer tokens (never rotated; they must come last). `memory_mask` (B, Nk) marks valid
memory tokens so a fixed-size, partly empty bank attends exactly like the official ragged one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from medsam2_jax.model import layers
from medsam2_jax.model.attention import dot_product_attention
from medsam2_jax.model.mask_decoder import init_attention
from medsam2_jax.model.position_encoding import apply_rope, axial_rope_tables

LN_EPS = 1e-5


def init_memory_attention(key, config) -> dict:
    ma = config.memory_attention
    d = ma.d_model
    ks = layers.split_key(key, ma.num_layers)
    layer_params = []
    for k in ks:
        kk = layers.split_key(k, 4)
        layer_params.append(
            {
                "self_attn": init_attention(kk[0], d, ma.num_heads),
                "cross_attn_image": init_attention(kk[1], d, ma.num_heads, kv_in_dim=config.mem_dim),
                "linear1": layers.init_linear(kk[2], d, ma.dim_feedforward),
                "linear2": layers.init_linear(kk[3], ma.dim_feedforward, d),
                "norm1": layers.init_layer_norm(d),
                "norm2": layers.init_layer_norm(d),
                "norm3": layers.init_layer_norm(d),
            }
        )
    return {"layers": layer_params, "norm": layers.init_layer_norm(d)}


def _rope_attention(p, q, k, v, num_heads, rope, num_k_rope: int, impl, key_mask=None, skip_masked=False):
    """RoPEAttention: rotate q and the first `num_k_rope` keys (table tiled along the keys)."""
    q = layers.linear(p["q_proj"], q)
    k = layers.linear(p["k_proj"], k)
    v = layers.linear(p["v_proj"], v)
    b, nq, _ = q.shape
    split = lambda x: x.reshape(x.shape[0], x.shape[1], num_heads, -1).swapaxes(1, 2)  # B, H, N, D
    q, k, v = split(q), split(k), split(v)
    q = apply_rope(q, *rope)
    if num_k_rope > 0:
        k_rot = apply_rope(k[:, :, :num_k_rope], *rope)
        k = jnp.concatenate([k_rot, k[:, :, num_k_rope:]], axis=2)
    out = dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), key_mask=key_mask, impl=impl,
                                skip_masked=skip_masked)
    return layers.linear(p["out_proj"], out.reshape(b, nq, -1))


def memory_attention(p, curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens: int, config,
                     memory_mask=None, skip_empty: bool = False):
    """curr/curr_pos (B, HW, 256); memory/memory_pos (B, Nk, 64) -> (B, HW, 256).

    The last `num_obj_ptr_tokens` memory tokens are object pointers and skip RoPE.
    `skip_empty` (inference only, see `attention.dot_product_attention`'s `skip_masked`): key
    chunks where `memory_mask` holds nothing are not computed.
    """
    ma = config.memory_attention
    impl = config.attention_impl
    heads = ma.num_heads
    nq = curr.shape[1]
    side = int(math.isqrt(nq))  # RoPEAttention assumes a square grid
    rope = axial_rope_tables(ma.d_model // heads, side, side, ma.rope_theta)
    num_k_rope = memory.shape[1] - num_obj_ptr_tokens
    x = curr
    if ma.pos_enc_at_input:
        x = x + 0.1 * curr_pos
    ln = lambda pp, t: layers.layer_norm(pp, t, LN_EPS)
    for lp in p["layers"]:
        t = ln(lp["norm1"], x)
        qk = t + curr_pos if ma.pos_enc_at_attn else t
        x = x + _rope_attention(lp["self_attn"], qk, qk, t, heads, rope, nq, impl)
        t = ln(lp["norm2"], x)
        q = t + curr_pos if ma.pos_enc_at_cross_attn_queries else t
        k = memory + memory_pos if ma.pos_enc_at_cross_attn_keys else memory
        x = x + _rope_attention(lp["cross_attn_image"], q, k, memory, heads, rope, num_k_rope, impl, memory_mask,
                                   skip_empty)
        t = ln(lp["norm3"], x)
        x = x + layers.linear(lp["linear2"], jax.nn.relu(layers.linear(lp["linear1"], t)))
    return ln(p["norm"], x)


def local_cross_attention_init(params, config, magnitude: float = 6.0, pairs_per_axis: int = 8) -> dict:
    """`params` with every memory-attention layer's cross-attention query and key biases set so
    that, through RoPE alone, each current-frame position attends mostly to the same position of
    each spatial memory. For training the memory path from scratch (the demo model): with random
    projections the cross-attention is near-uniform, its output the same at every position, and
    the tracker has to discover spatial correspondence by gradient descent, which two CPU cores do
    not afford. Not used for, or needed by, official SAM 2 weights.

    Both biases get `magnitude` on the real part of the `pairs_per_axis` highest-frequency RoPE
    pairs of each axis, in every head. A query at p and a key at p' then score
    magnitude**2 / sqrt(head_dim) * sum over those pairs of cos(freq * (p - p')) from the biases,
    largest at p = p' (with the defaults and 256-wide heads: 36 at p = p', 3.8 less one step along
    an axis, 13 less two steps). The projections' weights stay as they are.
    """
    ma = config.memory_attention
    head_dim = ma.d_model // ma.num_heads
    quarter = head_dim // 4  # RoPE pairs per axis: x pairs first, then y pairs (axial_rope_tables)
    if not 0 < pairs_per_axis <= quarter:
        raise ValueError(f"pairs_per_axis must be in 1..{quarter} for {head_dim}-wide heads, got {pairs_per_axis}")
    real = jnp.concatenate([2 * jnp.arange(pairs_per_axis), 2 * (quarter + jnp.arange(pairs_per_axis))])
    head = jnp.zeros((head_dim,), jnp.float32).at[real].set(magnitude)
    bias = jnp.tile(head, ma.num_heads)

    def set_biases(layer):
        cross = dict(layer["cross_attn_image"])
        for name in ("q_proj", "k_proj"):
            cross[name] = dict(cross[name], bias=bias.astype(cross[name]["bias"].dtype))
        return dict(layer, cross_attn_image=cross)

    memory_attention = dict(params["memory_attention"],
                            layers=[set_biases(lp) for lp in params["memory_attention"]["layers"]])
    return dict(params, memory_attention=memory_attention)

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
    ks = jax.random.split(key, ma.num_layers)
    layer_params = []
    for k in ks:
        kk = jax.random.split(k, 4)
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


def _rope_attention(p, q, k, v, num_heads, rope, num_k_rope: int, impl, key_mask=None):
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
    out = dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), key_mask=key_mask, impl=impl)
    return layers.linear(p["out_proj"], out.reshape(b, nq, -1))


def memory_attention(p, curr, curr_pos, memory, memory_pos, num_obj_ptr_tokens: int, config,
                     memory_mask=None):
    """curr/curr_pos (B, HW, 256); memory/memory_pos (B, Nk, 64) -> (B, HW, 256).

    The last `num_obj_ptr_tokens` memory tokens are object pointers and skip RoPE.
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
        x = x + _rope_attention(lp["cross_attn_image"], q, k, memory, heads, rope, num_k_rope, impl, memory_mask)
        t = ln(lp["norm3"], x)
        x = x + layers.linear(lp["linear2"], jax.nn.relu(layers.linear(lp["linear1"], t)))
    return ln(p["norm"], x)

"""Scaled dot-product attention: the one swappable function every SAM 2 attention goes through.

Layout is (batch, tokens, heads, head_dim) like `jax.nn.dot_product_attention`. Implementations:
  "xla"      plain softmax(q k^T / sqrt(d)) v; materialises the score matrix.
  "chunked"  online softmax over key chunks (flash-attention recurrence in plain JAX). On CPU the
             score matrix of memory attention (4096 x ~29k at 1024 px) is what makes "xla" slow;
             chunking keeps it in cache.
  "fused"    jax.nn.dot_product_attention (cuDNN / TPU kernels where available).
  "auto"     "chunked" on CPU, "fused" on GPU/TPU.
`key_mask` (batch, keys) marks valid keys; masked keys contribute exactly zero.

`skip_masked=True` (inference only: a dynamic trip count is not reverse-differentiable) lets the
chunked implementation compute only the key chunks that hold a valid key in some batch row, so
empty memory slots of a fixed-size bank cost (almost) nothing. The other implementations ignore it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "chunked", "fused")
KEY_CHUNK = 1024


def resolve_impl(impl: str) -> str:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        return "chunked" if jax.default_backend() == "cpu" else "fused"
    return impl


def dot_product_attention(q, k, v, key_mask=None, impl: str = "auto", skip_masked: bool = False):
    impl = resolve_impl(impl)
    if impl == "fused":
        # jax.nn.dot_product_attention wants one dtype; the einsum paths promote, so promote here
        # too (a bfloat16 run adds float32 positional encodings to its keys).
        dtype = jnp.result_type(q, k, v)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask=mask)
    if impl == "chunked" and k.shape[1] > KEY_CHUNK:
        return _chunked_attention(q, k, v, key_mask, KEY_CHUNK, skip_masked and key_mask is not None)
    return _xla_attention(q, k, v, key_mask)


def _xla_attention(q, k, v, key_mask):
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k)
    if key_mask is not None:
        s = jnp.where(key_mask[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _chunked_attention(q, k, v, key_mask, chunk: int, skip_masked: bool = False):
    """Online softmax over whole key chunks, then the remainder (`nk mod chunk` keys) as one more
    step: nothing is padded, so a memory of spatial slots plus a few pointer tokens computes no
    padding keys."""
    b, nk, h, d = k.shape
    n_full = nk // chunk
    whole = n_full * chunk
    valid = jnp.ones((b, nk), bool) if key_mask is None else key_mask
    kc = k[:, :whole].reshape(b, n_full, chunk, h, d).swapaxes(0, 1)
    vc = v[:, :whole].reshape(b, n_full, chunk, h, v.shape[-1]).swapaxes(0, 1)
    mc = valid[:, :whole].reshape(b, n_full, chunk).swapaxes(0, 1)
    qs = q * (1.0 / math.sqrt(d))
    nq = q.shape[1]

    def update(carry, kb, vb, mb):
        m_prev, l_prev, acc = carry
        s = jnp.einsum("bqhd,bkhd->bhqk", qs, kb).astype(jnp.float32)
        s = jnp.where(mb[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m_prev, s.max(-1))
        # A chunk with no valid key leaves m at -inf; keep the arithmetic finite.
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(jnp.where(jnp.isfinite(m_prev), m_prev, 0.0) - m_safe)
        corr = jnp.where(jnp.isfinite(m_prev), corr, 0.0)
        l_new = l_prev * corr + p.sum(-1)
        acc = acc * corr[..., None] + jnp.einsum("bhqk,bkhd->bhqd", p.astype(vb.dtype), vb)
        return m_new, l_new, acc

    carry = (
        jnp.full((b, h, nq), -jnp.inf, jnp.float32),
        jnp.zeros((b, h, nq), jnp.float32),
        jnp.zeros((b, h, nq, v.shape[-1]), jnp.float32),
    )
    if skip_masked:
        # Chunks holding a valid key, in key order, then the rest; only the first `count` run.
        # A fully masked chunk is an exact identity of the update, so skipping it changes nothing.
        used = mc.any(axis=(1, 2))
        order = jnp.argsort(~used, stable=True)
        count = used.sum()

        def body(state):
            i, carry = state
            j = order[i]
            return i + 1, update(carry, kc[j], vc[j], mc[j])

        _, carry = jax.lax.while_loop(lambda state: state[0] < count, body, (jnp.int32(0), carry))
    else:
        carry, _ = jax.lax.scan(lambda c, xs: (update(c, *xs), None), carry, (kc, vc, mc))
    if whole < nk:
        carry = update(carry, k[:, whole:], v[:, whole:], valid[:, whole:])
    _, denominator, acc = carry
    out = acc / denominator[..., None]
    return out.swapaxes(1, 2).astype(q.dtype)

"""Position encodings of SAM 2: 2-D sine, random Fourier, 1-D sine, and axial RoPE.

Orderings are the easy thing to get wrong (sam2-architecture.md sections 1.3, 1.4, 1.7):
  2-D sine     channels [y-features, x-features], sin/cos interleaved within each
  1-D sine     [sin block | cos block]
  random PE    [sin block | cos block] of 2*pi*(2c-1) @ G, coords (x, y)
  RoPE         interleaved (re, im) pairs, first half rotated by x position, second half by y
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def sine_2d(h: int, w: int, num_pos_feats: int, temperature: float = 10000.0):
    """PositionEmbeddingSine(num_pos_feats, normalize=True, scale=2*pi) as an (h, w, C) array.

    Depends only on the grid, so it is a constant: computed in NumPy float32 like torch does.
    """
    f = num_pos_feats // 2
    eps = np.float32(1e-6)
    scale = np.float32(2 * math.pi)
    y = np.arange(1, h + 1, dtype=np.float32)[:, None].repeat(w, 1)
    x = np.arange(1, w + 1, dtype=np.float32)[None, :].repeat(h, 0)
    y = y / (np.float32(h) + eps) * scale
    x = x / (np.float32(w) + eps) * scale
    dim_t = np.arange(f, dtype=np.float32)
    dim_t = np.float32(temperature) ** (2 * (dim_t // 2) / np.float32(f))
    px = x[..., None] / dim_t
    py = y[..., None] / dim_t
    px = np.stack([np.sin(px[..., 0::2]), np.cos(px[..., 1::2])], axis=-1).reshape(h, w, f)
    py = np.stack([np.sin(py[..., 0::2]), np.cos(py[..., 1::2])], axis=-1).reshape(h, w, f)
    return jnp.asarray(np.concatenate([py, px], axis=-1))


def sine_1d(pos, dim: int, temperature: float = 10000.0):
    """`get_1d_sine_pe`: (..., dim) with the sin block then the cos block."""
    pe_dim = dim // 2
    dim_t = jnp.arange(pe_dim, dtype=jnp.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / pe_dim)
    p = pos[..., None].astype(jnp.float32) / dim_t
    return jnp.concatenate([jnp.sin(p), jnp.cos(p)], axis=-1)


def random_fourier(coords01, gaussian_matrix):
    """PositionEmbeddingRandom._pe_encoding on normalised (x, y) coordinates in [0, 1]."""
    c = 2.0 * coords01 - 1.0
    c = c @ gaussian_matrix
    c = 2.0 * np.pi * c
    return jnp.concatenate([jnp.sin(c), jnp.cos(c)], axis=-1)


def random_fourier_grid(h: int, w: int, gaussian_matrix):
    """`get_dense_pe()` as (h, w, C): the random PE at pixel centres of an h x w grid."""
    y = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
    x = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
    grid = jnp.stack(jnp.meshgrid(x, y, indexing="xy"), axis=-1)
    return random_fourier(grid, gaussian_matrix)


def axial_rope_tables(dim: int, end_x: int, end_y: int, theta: float = 10000.0):
    """(cos, sin), each (end_x*end_y, dim//2), of `compute_axial_cis` (x half, then y half).

    Constants of the grid: computed once in NumPy float32 (torch.polar works in float32).
    """
    freqs = 1.0 / (theta ** (np.arange(0, dim, 4)[: dim // 4].astype(np.float32) / dim))
    t = np.arange(end_x * end_y, dtype=np.float32)
    t_x = t % end_x
    t_y = np.floor(t / end_x)
    ang = np.concatenate([np.outer(t_x, freqs), np.outer(t_y, freqs)], axis=-1).astype(np.float32)
    return np.cos(ang), np.sin(ang)


def apply_rope(x, cos, sin):
    """Rotate interleaved (re, im) pairs of x (..., N, D) by the (N, D/2) tables, in float32.

    x may hold several memory frames back to back (..., F*N, D): every frame gets the same
    rotations (`rope_k_repeat`).
    """
    dtype = x.dtype
    n = cos.shape[0]
    frames = x.shape[-2] // n
    xf = x.astype(jnp.float32).reshape(*x.shape[:-2], frames, n, -1, 2)
    re, im = xf[..., 0], xf[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(dtype)

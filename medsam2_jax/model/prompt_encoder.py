"""SAM prompt encoder (official `sam/prompt_encoder.py`), NHWC.

Points carry labels: -1 padding ("not a point"), 0 negative, 1 positive, 2 box top-left,
3 box bottom-right. SAM 2 always sends boxes as two points, so the encoder appends one padding
point, as the official one does when `boxes is None`.
"""

from __future__ import annotations

import jax.numpy as jnp

from medsam2_jax.model import layers
from medsam2_jax.model.position_encoding import random_fourier, random_fourier_grid

LN2D_EPS = 1e-6


def init_prompt_encoder(key, config) -> dict:
    d = config.hidden_dim
    m = config.prompt_encoder.mask_in_chans
    ks = layers.split_key(key, 10)
    emb = lambda k: layers.random_init(k, (1, d), "normal", 1.0)  # nn.Embedding init: N(0, 1)
    return {
        "pe_layer": {"positional_encoding_gaussian_matrix": layers.random_init(ks[0], (2, d // 2), "normal", 1.0)},
        "point_embeddings": [emb(ks[1 + i]) for i in range(4)],
        "not_a_point_embed": emb(ks[5]),
        "no_mask_embed": emb(ks[6]),
        # Keys are the official Sequential indices (the GELUs at 2 and 5 have no parameters).
        "mask_downscaling": {
            "0": layers.init_conv(ks[7], 1, m // 4, 2),
            "1": layers.init_layer_norm(m // 4),
            "3": layers.init_conv(ks[8], m // 4, m, 2),
            "4": layers.init_layer_norm(m),
            "6": layers.init_conv(ks[9], m, d, 1),
        },
    }


def embedding_grid_size(config) -> int:
    return config.image_size // config.backbone_stride


def dense_pe(p, config):
    """get_dense_pe(): (1, h, w, C) random-Fourier PE of the image-embedding grid."""
    s = embedding_grid_size(config)
    return random_fourier_grid(s, s, p["pe_layer"]["positional_encoding_gaussian_matrix"])[None]


def embed_points(p, coords, labels, config, pad: bool = True):
    """coords (B, N, 2) xy pixels in the model's input frame, labels (B, N) -> (B, N(+1), C)."""
    coords = coords.astype(jnp.float32) + 0.5
    if pad:
        b = coords.shape[0]
        coords = jnp.concatenate([coords, jnp.zeros((b, 1, 2), coords.dtype)], axis=1)
        labels = jnp.concatenate([labels, -jnp.ones((b, 1), labels.dtype)], axis=1)
    size = config.image_size
    emb = random_fourier(coords / size, p["pe_layer"]["positional_encoding_gaussian_matrix"])
    lab = labels[..., None]
    emb = jnp.where(lab == -1, jnp.zeros_like(emb) + p["not_a_point_embed"][0], emb)
    for i in range(4):
        emb = jnp.where(lab == i, emb + p["point_embeddings"][i][0], emb)
    return emb


def embed_mask(p, masks):
    """masks (B, 4s, 4s, 1) low-res logits -> (B, s, s, C)."""
    md = p["mask_downscaling"]
    x = layers.gelu(layers.layer_norm(md["1"], layers.conv(md["0"], masks, stride=2), LN2D_EPS))
    x = layers.gelu(layers.layer_norm(md["4"], layers.conv(md["3"], x, stride=2), LN2D_EPS))
    return layers.conv(md["6"], x)


def prompt_encoder(p, config, coords=None, labels=None, masks=None, batch: int | None = None):
    """Returns (sparse (B, N, C), dense (B, s, s, C)), like PromptEncoder.forward(boxes=None)."""
    if coords is not None:
        batch = coords.shape[0]
        sparse = embed_points(p, coords, labels, config, pad=True)
    else:
        batch = masks.shape[0] if masks is not None else batch
        sparse = jnp.zeros((batch, 0, config.hidden_dim), jnp.float32)
    s = embedding_grid_size(config)
    if masks is not None:
        dense = embed_mask(p, masks)
    else:
        dense = jnp.broadcast_to(p["no_mask_embed"][0], (batch, s, s, config.hidden_dim))
    return sparse, dense

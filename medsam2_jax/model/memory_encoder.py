"""Memory encoder (official `memory_encoder.py`): mask downsampler, pixel-feature fuser, projections.

Input masks are already scaled logits (SAM2Base passes skip_mask_sigmoid=True after its own
sigmoid/binarise x20 - 10), so this module never applies a sigmoid.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from medsam2_jax.model import layers
from medsam2_jax.model.position_encoding import sine_2d

LN2D_EPS = 1e-6


def _downsampler_layout(config):
    """(in, out) channels of each strided conv: 1 -> 4 -> 16 -> 64 -> 256 for stride 2, total 16."""
    me = config.memory_encoder
    n = int(math.log2(me.mask_downsampler_total_stride) // math.log2(me.mask_downsampler_stride))
    chans, c = [], 1
    for _ in range(n):
        chans.append((c, c * me.mask_downsampler_stride**2))
        c = c * me.mask_downsampler_stride**2
    return chans


def init_memory_encoder(key, config) -> dict:
    me = config.memory_encoder
    d = config.hidden_dim
    ks = iter(layers.split_key(key, 16))
    encoder = {}
    for i, (cin, cout) in enumerate(_downsampler_layout(config)):
        # Official Sequential indices: conv 3i, LayerNorm2d 3i+1, GELU 3i+2.
        encoder[str(3 * i)] = layers.init_conv(next(ks), cin, cout, me.mask_downsampler_kernel)
        encoder[str(3 * i + 1)] = layers.init_layer_norm(cout)
    n = len(_downsampler_layout(config))
    encoder[str(3 * n)] = layers.init_conv(next(ks), _downsampler_layout(config)[-1][1], d, 1)
    fuser = []
    for _ in range(me.fuser_num_layers):
        fuser.append(
            {
                "dwconv": layers.init_conv(next(ks), d, d, me.fuser_kernel, groups=d),
                "norm": layers.init_layer_norm(d),
                "pwconv1": layers.init_linear(next(ks), d, 4 * d),
                "pwconv2": layers.init_linear(next(ks), 4 * d, d),
                "gamma": jnp.asarray(np.full((d,), me.fuser_layer_scale_init, np.float32)),
            }
        )
    return {
        "mask_downsampler": {"encoder": encoder},
        "pix_feat_proj": layers.init_conv(next(ks), d, d, 1),
        "fuser": {"layers": fuser},
        "out_proj": layers.init_conv(next(ks), d, me.out_dim, 1),
    }


def mask_downsampler(p, masks, config):
    me = config.memory_encoder
    enc = p["encoder"]
    n = len(_downsampler_layout(config))
    x = masks
    for i in range(n):
        x = layers.conv(enc[str(3 * i)], x, stride=me.mask_downsampler_stride, padding=me.mask_downsampler_padding)
        x = layers.gelu(layers.layer_norm(enc[str(3 * i + 1)], x, LN2D_EPS))
    return layers.conv(enc[str(3 * n)], x)


def cx_block(p, x, config):
    k = config.memory_encoder.fuser_kernel
    y = layers.depthwise_conv(p["dwconv"], x, padding=k // 2)
    y = layers.layer_norm(p["norm"], y, LN2D_EPS)
    y = layers.linear(p["pwconv2"], layers.gelu(layers.linear(p["pwconv1"], y)))
    return x + p["gamma"].astype(y.dtype) * y


def memory_encoder(p, pix_feat, masks, config):
    """pix_feat (B, s, s, 256) raw stride-16 features, masks (B, S, S, 1) scaled logits.

    Returns (memory features (B, s, s, mem_dim), their sine position encoding (s, s, mem_dim)).
    """
    m = mask_downsampler(p["mask_downsampler"], masks, config)
    x = layers.conv(p["pix_feat_proj"], pix_feat) + m
    for lp in p["fuser"]["layers"]:
        x = cx_block(lp, x, config)
    x = layers.conv(p["out_proj"], x)
    pos = sine_2d(x.shape[1], x.shape[2], x.shape[3]).astype(x.dtype)
    return x, pos

"""HieraDet trunk and FPN neck (official `backbones/hieradet.py`, `backbones/image_encoder.py`).

Feature maps are NHWC. Traps reproduced on purpose (sam2-architecture.md 1.1, 1.2):
window padding tokens are zeros after norm1 and are *not* masked; the window size of a stage's
first (q-pool) block lags one stage behind; the background position embedding is resized with
PyTorch's bicubic (A = -0.75); the FPN top-down path is nearest x2 into the stride-16 level only.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from medsam2_jax.model import layers
from medsam2_jax.model.attention import dot_product_attention
from medsam2_jax.model.position_encoding import sine_2d

HIERA_LN_EPS = 1e-6


@dataclass(frozen=True)
class BlockSpec:
    dim: int
    dim_out: int
    num_heads: int
    window_size: int
    q_pool: bool


def block_specs(trunk) -> list[BlockSpec]:
    """Per-block (dim, dim_out, heads, window, q-pool) exactly as Hiera.__init__ lays them out."""
    stages = list(trunk.stages)
    depth = sum(stages)
    stage_ends = list(np.cumsum(stages) - 1)
    q_pool_blocks = [e + 1 for e in stage_ends[:-1]][: trunk.q_pool]
    embed_dim, num_heads, cur_stage = trunk.embed_dim, trunk.num_heads, 1
    specs = []
    for i in range(depth):
        dim_out = embed_dim
        # The window is read before the stage counter moves: the q-pool block keeps the
        # previous stage's window.
        window = trunk.window_spec[cur_stage - 1]
        if i in trunk.global_att_blocks:
            window = 0
        if i - 1 in stage_ends:
            dim_out = int(embed_dim * trunk.dim_mul)
            num_heads = int(num_heads * trunk.head_mul)
            cur_stage += 1
        specs.append(BlockSpec(embed_dim, dim_out, num_heads, window, i in q_pool_blocks))
        embed_dim = dim_out
    return specs


def stage_ends(trunk) -> list[int]:
    return [int(e) for e in np.cumsum(trunk.stages) - 1]


def init_image_encoder(key, config) -> dict:
    t = config.trunk
    specs = block_specs(t)
    keys = iter(layers.split_key(key, 8 + 6 * len(specs)))
    bkg = tuple(t.window_pos_embed_bkg_spatial_size)
    w0 = t.window_spec[0]
    trunk = {
        "patch_embed": {"proj": layers.init_conv(next(keys), 3, t.embed_dim, 7)},
        # PyTorch stores these (1, C, H, W) zeros-initialised then trained; we keep NHWC.
        "pos_embed": layers.random_init(next(keys), (1, bkg[0], bkg[1], t.embed_dim), "normal", 0.02),
        "pos_embed_window": layers.random_init(next(keys), (1, w0, w0, t.embed_dim), "normal", 0.02),
        "blocks": [],
    }
    for s in specs:
        blk = {
            "norm1": layers.init_layer_norm(s.dim),
            "attn": {
                "qkv": layers.init_linear(next(keys), s.dim, 3 * s.dim_out),
                "proj": layers.init_linear(next(keys), s.dim_out, s.dim_out),
            },
            "norm2": layers.init_layer_norm(s.dim_out),
            "mlp": layers.init_mlp(next(keys), s.dim_out, int(s.dim_out * t.mlp_ratio), s.dim_out, 2),
        }
        if s.dim != s.dim_out:
            blk["proj"] = layers.init_linear(next(keys), s.dim, s.dim_out)
        trunk["blocks"].append(blk)
    neck = {
        "convs": [
            {"conv": layers.init_conv(next(keys), c, config.neck.d_model, 1)}
            for c in config.neck.backbone_channel_list
        ]
    }
    return {"trunk": trunk, "neck": neck}


def _max_pool_2x2(x):
    """nn.MaxPool2d(2, 2, ceil_mode=False) on NHWC: odd trailing rows/cols are dropped."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _window_partition(x, ws: int):
    b, h, w, c = x.shape
    ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws, ws, c), (hp, wp)


def _window_unpartition(x, ws: int, pad_hw, hw, batch: int):
    hp, wp = pad_hw
    c = x.shape[-1]
    x = x.reshape(batch, hp // ws, wp // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, hp, wp, c)[:, : hw[0], : hw[1]]


def _multiscale_attention(p, x, spec: BlockSpec, attention_impl: str):
    b, h, w, _ = x.shape
    qkv = layers.linear(p["qkv"], x).reshape(b, h * w, 3, spec.num_heads, -1)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if spec.q_pool:
        q = _max_pool_2x2(q.reshape(b, h, w, -1))
        h, w = q.shape[1:3]
        q = q.reshape(b, h * w, spec.num_heads, -1)
    out = dot_product_attention(q, k, v, impl=attention_impl)
    return layers.linear(p["proj"], out.reshape(b, h, w, -1))


def _block(p, x, spec: BlockSpec, attention_impl: str):
    batch = x.shape[0]
    shortcut = x
    x = layers.layer_norm(p["norm1"], x, HIERA_LN_EPS)
    if spec.dim != spec.dim_out:
        shortcut = _max_pool_2x2(layers.linear(p["proj"], x))
    ws = spec.window_size
    h, w = x.shape[1:3]
    if ws > 0:
        x, pad_hw = _window_partition(x, ws)
    x = _multiscale_attention(p["attn"], x, spec, attention_impl)
    if spec.q_pool:
        ws = spec.window_size // 2
        h, w = shortcut.shape[1:3]
        pad_hw = (h + (ws - h % ws) % ws, w + (ws - w % ws) % ws) if ws > 0 else (h, w)
    if spec.window_size > 0:
        x = _window_unpartition(x, ws, pad_hw, (h, w), batch)
    x = shortcut + x
    y = layers.mlp(p["mlp"], layers.layer_norm(p["norm2"], x, HIERA_LN_EPS), activation=layers.gelu)
    return x + y


def trunk_pos_embed(p_trunk, hw: tuple[int, int]):
    """Background embedding resized to the token grid plus the tiled window embedding."""
    pos = layers.resize_bicubic_torch(p_trunk["pos_embed"], hw)
    win = p_trunk["pos_embed_window"]
    reps = (1, hw[0] // win.shape[1], hw[1] // win.shape[2], 1)
    return pos + jnp.tile(win, reps)


def hiera_trunk(p, images, config):
    """images (B, S, S, 3) normalised -> list of NHWC maps, high resolution first."""
    t = config.trunk
    x = layers.conv(p["patch_embed"]["proj"], images, stride=4, padding=3)
    x = x + trunk_pos_embed(p, x.shape[1:3]).astype(x.dtype)
    ends = stage_ends(t)
    outs = []
    for i, (bp, spec) in enumerate(zip(p["blocks"], block_specs(t))):
        x = _block(bp, x, spec, config.attention_impl)
        if i in ends:
            outs.append(x)
    return outs


def fpn_neck(p, feats, config):
    """FpnNeck: 1x1 laterals, nearest x2 top-down into `fpn_top_down_levels`, sine PEs."""
    n = len(p["convs"]) - 1
    out = [None] * (n + 1)
    prev = None
    for i in range(n, -1, -1):
        lateral = layers.conv(p["convs"][n - i]["conv"], feats[i])
        if i in config.neck.fpn_top_down_levels and prev is not None:
            if config.neck.fpn_interp_model != "nearest":
                raise NotImplementedError("only fpn_interp_model='nearest' (all released configs)")
            top_down = jnp.repeat(jnp.repeat(prev.astype(jnp.float32), 2, axis=1), 2, axis=2)
            prev = lateral + top_down.astype(lateral.dtype)
            if config.neck.fuse_type == "avg":
                prev = prev / 2
        else:
            prev = lateral
        out[i] = prev
    pos = [sine_2d(o.shape[1], o.shape[2], config.neck.d_model).astype(o.dtype) for o in out]
    return out, pos


def image_encoder(p, images, config):
    """ImageEncoder: returns (backbone_fpn maps, their position encodings), scalp applied."""
    feats = hiera_trunk(p["trunk"], images, config)
    fpn, pos = fpn_neck(p["neck"], feats, config)
    scalp = config.neck.scalp
    if scalp > 0:
        fpn, pos = fpn[:-scalp], pos[:-scalp]
    return fpn, pos

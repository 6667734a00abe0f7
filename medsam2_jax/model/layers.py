"""Small pure building blocks over parameter dicts (NHWC layout, Flax naming: kernel/bias/scale).

Each `init_*` returns the parameter dict a module needs; each apply function takes that dict.
Initialisers follow PyTorch's defaults (uniform +-1/sqrt(fan_in)) so a model trained from scratch
starts like the official one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def gelu(x):
    # SAM 2 uses nn.GELU() (exact erf form) everywhere; jax.nn.gelu defaults to the tanh form.
    return jax.nn.gelu(x, approximate=False)


# Random initialisation in blocks of one size. An eager `jax.random.*` call compiles once per
# shape, and a model has a hundred parameter shapes (SAM 2.1 tiny took 24 s to initialise, and
# longer under `jax.jit`, whose program grew with every parameter); drawing fixed-size blocks
# compiles each distribution once. Eager, jitted and `jax.eval_shape` calls give the same values.
_BLOCK = 1 << 16
_BLOCKS = {
    "uniform": jax.jit(lambda key, i: jax.random.uniform(jax.random.fold_in(key, i), (_BLOCK,), jnp.float32,
                                                         -1.0, 1.0)),
    "normal": jax.jit(lambda key, i: jax.random.normal(jax.random.fold_in(key, i), (_BLOCK,), jnp.float32)),
    # Truncated at +-2 in units of the parameter (`std * N(0, 1)` cut at `-2 / std, 2 / std`).
    "truncated": jax.jit(lambda key, i, std: jax.random.truncated_normal(
        jax.random.fold_in(key, i), -2.0 / std, 2.0 / std, (_BLOCK,), jnp.float32)),
}


_fold_in = jax.jit(jax.random.fold_in)


def split_key(key, n: int) -> list:
    """`n` keys from `key` for initialisers: `fold_in(key, i)`, one compiled function whatever
    `n` (an eager `jax.random.split` compiles once per count, and indexing its result once per
    shape)."""
    return [_fold_in(key, i) for i in range(n)]


def random_init(key, shape, kind: str, scale: float):
    """`scale` times `kind` ("uniform" on [-1, 1], "normal", or "truncated" normal) of `shape`."""
    n = math.prod(shape)
    extra = (jnp.float32(scale),) if kind == "truncated" else ()
    count = -(-n // _BLOCK)
    if isinstance(key, jax.core.Tracer):  # one vmapped draw per parameter keeps the program small
        blocks = jax.vmap(lambda i: _BLOCKS[kind](key, i, *extra))(jnp.arange(count))
        return (blocks.reshape(-1)[:n] * jnp.float32(scale)).reshape(shape)
    blocks = [np.asarray(_BLOCKS[kind](key, i, *extra)) for i in range(count)]
    flat = np.concatenate(blocks + [np.zeros((0,), np.float32)])
    return jnp.asarray((flat[:n] * np.float32(scale)).reshape(shape))


def _uniform(key, shape, bound):
    return random_init(key, shape, "uniform", bound)


# ----------------------------------------------------------------------------------------------
# Linear


def init_linear(key, in_dim: int, out_dim: int, bias: bool = True) -> dict:
    k1, k2 = split_key(key, 2)
    bound = 1.0 / math.sqrt(in_dim)
    p = {"kernel": _uniform(k1, (in_dim, out_dim), bound)}
    if bias:
        p["bias"] = _uniform(k2, (out_dim,), bound)
    return p


def linear(p: dict, x):
    y = x @ p["kernel"].astype(x.dtype)
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y


def init_mlp(key, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> dict:
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    keys = split_key(key, num_layers)
    return {"layers": [init_linear(k, a, b) for k, a, b in zip(keys, dims[:-1], dims[1:])]}


def mlp(p: dict, x, activation=jax.nn.relu, sigmoid_output: bool = False):
    """SAM 2's `MLP`: Linear layers with an activation between them (ReLU by default)."""
    n = len(p["layers"])
    for i, layer in enumerate(p["layers"]):
        x = linear(layer, x)
        if i < n - 1:
            x = activation(x)
    if sigmoid_output:
        x = jax.nn.sigmoid(x)
    return x


# ----------------------------------------------------------------------------------------------
# Normalisation


def init_layer_norm(dim: int) -> dict:
    return {"scale": jnp.asarray(np.ones((dim,), np.float32)), "bias": jnp.asarray(np.zeros((dim,), np.float32))}


def layer_norm(p: dict, x, eps: float):
    """LayerNorm over the last axis with a two-pass biased variance, as PyTorch computes it.

    eps differs across SAM 2: 1e-6 in Hiera and LayerNorm2d, 1e-5 in the two transformers.
    """
    mean = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    y = xc * lax.rsqrt(var + eps)
    return y * p["scale"].astype(x.dtype) + p["bias"].astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Convolutions (NHWC, kernels HWIO)


def init_conv(key, in_ch: int, out_ch: int, kernel: int, groups: int = 1, bias: bool = True) -> dict:
    k1, k2 = split_key(key, 2)
    fan_in = in_ch // groups * kernel * kernel
    bound = 1.0 / math.sqrt(fan_in)
    p = {"kernel": _uniform(k1, (kernel, kernel, in_ch // groups, out_ch), bound)}
    if bias:
        p["bias"] = _uniform(k2, (out_ch,), bound)
    return p


def conv(p: dict, x, stride: int = 1, padding: int = 0, groups: int = 1):
    """Conv2d with PyTorch's explicit symmetric padding (never 'SAME', which pads asymmetrically)."""
    y = lax.conv_general_dilated(
        x,
        p["kernel"].astype(x.dtype),
        window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y


def depthwise_conv(p: dict, x, padding: int):
    """Depthwise Conv2d (groups == channels, stride 1) as a sum of shifted, scaled copies.

    XLA's CPU grouped convolution is ~10x slower than this fused elementwise form at the
    memory encoder's 7x7 x 256-channel shape (measured: 18 ms vs 2 ms at 32x32).
    """
    k = p["kernel"].astype(x.dtype)  # (kh, kw, 1, C)
    kh, kw = k.shape[:2]
    h = x.shape[1] + 2 * padding - kh + 1
    w = x.shape[2] + 2 * padding - kw + 1
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out = sum(xp[:, i : i + h, j : j + w, :] * k[i, j, 0] for i in range(kh) for j in range(kw))
    if "bias" in p:
        out = out + p["bias"].astype(x.dtype)
    return out


def init_conv_transpose(key, in_ch: int, out_ch: int, kernel: int) -> dict:
    k1, k2 = split_key(key, 2)
    # PyTorch computes the ConvTranspose2d fan-in from weight dim 1 (out_ch) * k * k.
    bound = 1.0 / math.sqrt(out_ch * kernel * kernel)
    return {
        "kernel": _uniform(k1, (kernel, kernel, in_ch, out_ch), bound),
        "bias": _uniform(k2, (out_ch,), bound),
    }


def conv_transpose_2x2(p: dict, x):
    """ConvTranspose2d(kernel 2, stride 2): each input pixel writes its own 2x2 output block.

    With stride == kernel there is no overlap, so it is one matmul and a pixel shuffle; the
    kernel is stored unflipped in (kh, kw, in, out) order (PyTorch's (in, out, kh, kw) permuted).
    """
    b, h, w, _ = x.shape
    k = p["kernel"].astype(x.dtype)
    kh, kw, _, out_ch = k.shape
    y = jnp.einsum("bhwi,yxio->bhywxo", x, k)
    y = y.reshape(b, h * kh, w * kw, out_ch)
    return y + p["bias"].astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Resampling matching PyTorch's F.interpolate


def _cubic_weights(t, a: float = -0.75):
    # Keys cubic convolution with PyTorch's A = -0.75 (jax.image uses -0.5).
    def near(d):
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int):
    """(out, in) matrix of F.interpolate(mode='bicubic', align_corners=False) along one axis."""
    scale = in_size / out_size
    src = (np.arange(out_size) + 0.5) * scale - 0.5
    i0 = np.floor(src)
    t = src - i0
    w = _cubic_weights(t)
    m = np.zeros((out_size, in_size), np.float64)
    for tap in range(4):
        idx = np.clip(i0 - 1 + tap, 0, in_size - 1).astype(int)
        np.add.at(m, (np.arange(out_size), idx), w[:, tap])
    return jnp.asarray(m, jnp.float32)


def resize_bicubic_torch(x, out_hw: tuple[int, int]):
    """NHWC bicubic resize equal to PyTorch's (A=-0.75, half-pixel, clamped taps, no antialias)."""
    my = bicubic_matrix(x.shape[1], out_hw[0])
    mx = bicubic_matrix(x.shape[2], out_hw[1])
    hp = lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", my, x, precision=hp)
    return jnp.einsum("pw,bowc->bopc", mx, x, precision=hp)


def resize_bilinear(x, out_hw: tuple[int, int], antialias: bool):
    """NHWC bilinear resize, align_corners=False; antialias only matters when downsampling.

    Matches F.interpolate(mode='bilinear', align_corners=False, antialias=...) (spec section 4).
    """
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, out_hw[0], out_hw[1], c), "bilinear", antialias=antialias)

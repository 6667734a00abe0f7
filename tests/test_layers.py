"""Numeric building blocks against the PyTorch operations SAM 2 uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsam2_jax.model import layers
from tests.reference import max_abs, nchw, nhwc


@pytest.mark.parametrize("src,dst", [((7, 7), (64, 64)), ((14, 14), (256, 256)), ((4, 4), (16, 16)), ((9, 5), (3, 7))])
def test_bicubic_matches_torch(src, dst):
    """PyTorch bicubic uses A = -0.75 and clamped taps; jax.image's differs by up to 0.3."""
    x = np.random.default_rng(0).standard_normal((1, *src, 5)).astype(np.float32)
    ref = nhwc(F.interpolate(nchw(x), size=dst, mode="bicubic", align_corners=False))
    assert max_abs(layers.resize_bicubic_torch(jnp.asarray(x), dst), ref) < 1e-5


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("src,dst", [((64, 64), (256, 256)), ((256, 256), (64, 64)), ((300, 200), (128, 128))])
def test_bilinear_matches_torch(src, dst, antialias):
    x = np.random.default_rng(1).standard_normal((2, *src, 1)).astype(np.float32)
    ref = nhwc(F.interpolate(nchw(x), size=dst, mode="bilinear", align_corners=False, antialias=antialias))
    assert max_abs(layers.resize_bilinear(jnp.asarray(x), dst, antialias), ref) < 1e-5


def test_conv_transpose_matches_torch():
    """ConvTranspose2d(k=2, s=2): kernel (in, out, kh, kw) permuted without flipping."""
    torch.manual_seed(0)
    m = torch.nn.ConvTranspose2d(6, 4, 2, 2)
    x = np.random.default_rng(2).standard_normal((2, 5, 7, 6)).astype(np.float32)
    p = {"kernel": jnp.asarray(m.weight.detach().numpy().transpose(2, 3, 0, 1)),
         "bias": jnp.asarray(m.bias.detach().numpy())}
    assert max_abs(layers.conv_transpose_2x2(p, jnp.asarray(x)), nhwc(m(nchw(x)))) < 1e-5


@pytest.mark.parametrize("stride,padding,groups", [(4, 3, 1), (2, 1, 1), (1, 3, 8), (1, 0, 1)])
def test_conv_explicit_padding_matches_torch(stride, padding, groups):
    torch.manual_seed(0)
    m = torch.nn.Conv2d(8, 16, 7 if padding == 3 else 3 if padding == 1 else 1, stride, padding, groups=groups)
    x = np.random.default_rng(3).standard_normal((1, 33, 32, 8)).astype(np.float32)
    p = {"kernel": jnp.asarray(m.weight.detach().numpy().transpose(2, 3, 1, 0)),
         "bias": jnp.asarray(m.bias.detach().numpy())}
    assert max_abs(layers.conv(p, jnp.asarray(x), stride, padding, groups), nhwc(m(nchw(x)))) < 1e-5


def test_gelu_is_exact_and_layer_norm_eps():
    x = np.linspace(-5, 5, 101).astype(np.float32)
    assert max_abs(layers.gelu(jnp.asarray(x)), F.gelu(torch.from_numpy(x)).numpy()) < 1e-6
    y = np.random.default_rng(4).standard_normal((3, 16)).astype(np.float32) * 1e-3
    for eps in (1e-5, 1e-6):
        ref = F.layer_norm(torch.from_numpy(y), (16,), eps=eps).numpy()
        assert max_abs(layers.layer_norm(layers.init_layer_norm(16), jnp.asarray(y), eps), ref) < 1e-4


def test_depthwise_conv_matches_torch():
    torch.manual_seed(0)
    m = torch.nn.Conv2d(16, 16, 7, 1, 3, groups=16)
    x = np.random.default_rng(5).standard_normal((2, 12, 10, 16)).astype(np.float32)
    p = {"kernel": jnp.asarray(m.weight.detach().numpy().transpose(2, 3, 1, 0)),
         "bias": jnp.asarray(m.bias.detach().numpy())}
    assert max_abs(layers.depthwise_conv(p, jnp.asarray(x), 3), nhwc(m(nchw(x)))) < 1e-5


def test_init_params_same_eager_and_jitted():
    """Random initialisation is drawn in fixed-size blocks (one compile per distribution, so
    eager `init_params` is fast); eager, jitted and abstract calls agree on every leaf."""
    from medsam2_jax.configs.model import get_config
    from medsam2_jax.model.sam2 import init_params

    config = get_config("demo")
    key = jax.random.PRNGKey(3)
    eager = init_params(key, config)
    jitted = jax.jit(lambda k: init_params(k, config))(key)
    shapes = jax.eval_shape(lambda k: init_params(k, config), key)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted) == jax.tree.structure(shapes)
    for a, b, s in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), jax.tree.leaves(shapes)):
        assert a.shape == b.shape == s.shape and a.dtype == b.dtype == s.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other = init_params(jax.random.PRNGKey(4), config)
    assert not np.array_equal(np.asarray(jax.tree.leaves(other)[0]), np.asarray(jax.tree.leaves(eager)[0]))

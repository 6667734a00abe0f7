"""Hiera trunk and FPN neck against the official modules on the same inputs (float32).

Tolerance 1e-4 absolute on features of magnitude ~1-10: accumulated float32 rounding through
~5 transformer blocks; a real porting error (eps, GELU form, window padding) is >1e-3.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medsam2_jax.model.image_encoder import block_specs, fpn_neck, hiera_trunk
from tests.reference import max_abs, nchw, nhwc, reference_image_model

TOL = 1e-4


@pytest.fixture(scope="module")
def ref():
    return reference_image_model("test")


def _image(config, seed=0):
    s = config.image_size
    return np.random.default_rng(seed).standard_normal((2, s, s, 3)).astype(np.float32)


def test_block_layout_matches_official(ref):
    model, _, config = ref
    trunk = model.image_encoder.trunk
    for spec, blk in zip(block_specs(config.trunk), trunk.blocks):
        assert (spec.dim, spec.dim_out, spec.window_size) == (blk.dim, blk.dim_out, blk.window_size)
        assert spec.num_heads == blk.attn.num_heads
        assert spec.q_pool == (blk.q_stride is not None)


def test_trunk_stage_outputs(ref):
    model, params, config = ref
    x = _image(config)
    with torch.no_grad():
        expected = [nhwc(t) for t in model.image_encoder.trunk(nchw(x))]
    ours = jax.jit(lambda p, x: hiera_trunk(p, x, config))(params["image_encoder"]["trunk"], jnp.asarray(x))
    assert len(ours) == len(expected) == 4
    for o, e in zip(ours, expected):
        assert o.shape == e.shape
        assert max_abs(o, e) < TOL


def test_neck_outputs_and_position_encodings(ref):
    model, params, config = ref
    r = np.random.default_rng(1)
    s = config.image_size // 4
    feats = [r.standard_normal((1, s >> i, s >> i, c)).astype(np.float32)
             for i, c in enumerate(reversed(config.neck.backbone_channel_list))]
    with torch.no_grad():
        e_out, e_pos = model.image_encoder.neck([nchw(f) for f in feats])
    out, pos = fpn_neck(params["image_encoder"]["neck"], [jnp.asarray(f) for f in feats], config)
    for o, e in zip(out, e_out):
        assert max_abs(o, nhwc(e)) < 1e-5
    for p, e in zip(pos, e_pos):
        assert max_abs(p, nhwc(e)[0]) < 1e-6

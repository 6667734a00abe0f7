"""Prompt encoder against the official one: points (all labels, padding), masks, dense PE."""

import jax.numpy as jnp
import numpy as np
import torch

from medsam2_jax.model.prompt_encoder import dense_pe, prompt_encoder
from tests.reference import max_abs, nchw, nhwc, reference_image_model


def test_points_with_every_label():
    model, params, config = reference_image_model("test")
    s = config.image_size
    r = np.random.default_rng(0)
    coords = (r.random((2, 5, 2)) * s).astype(np.float32)
    labels = np.array([[1, 0, 2, 3, -1], [0, 0, 1, -1, 1]], np.int32)
    with torch.no_grad():
        sp, de = model.sam_prompt_encoder((torch.from_numpy(coords), torch.from_numpy(labels)), None, None)
    osp, ode = prompt_encoder(params["sam_prompt_encoder"], config, jnp.asarray(coords), jnp.asarray(labels))
    assert osp.shape == sp.shape == (2, 6, 256)  # one padding point appended
    assert max_abs(osp, sp.detach()) < 1e-5
    assert max_abs(ode, nhwc(de)) == 0.0


def test_mask_prompt_and_dense_pe():
    model, params, config = reference_image_model("test")
    s4 = config.image_size // 4
    m = (np.random.default_rng(1).standard_normal((2, s4, s4, 1)) * 4).astype(np.float32)
    with torch.no_grad():
        _, de = model.sam_prompt_encoder(None, None, nchw(m))
        pe = model.sam_prompt_encoder.get_dense_pe()
    _, ode = prompt_encoder(params["sam_prompt_encoder"], config, masks=jnp.asarray(m))
    assert max_abs(ode, nhwc(de)) < 1e-5
    assert max_abs(dense_pe(params["sam_prompt_encoder"], config), nhwc(pe)) < 1e-5

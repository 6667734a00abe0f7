"""Position encodings against the official functions (orderings are the usual trap)."""

import numpy as np
import torch

from medsam2_jax.model.position_encoding import axial_rope_tables, sine_1d, sine_2d


def test_sine_1d_matches_get_1d_sine_pe():
    from sam2.modeling.sam2_utils import get_1d_sine_pe

    pos = np.array([0.0, 1.0, 0.5, -0.25, 3.0], np.float32)
    for dim in (64, 256):
        ref = get_1d_sine_pe(torch.from_numpy(pos), dim).numpy()
        assert np.abs(np.asarray(sine_1d(pos, dim)) - ref).max() < 1e-6


def test_sine_2d_matches_position_embedding_sine():
    from sam2.modeling.position_encoding import PositionEmbeddingSine

    for h, w, c in [(16, 16, 256), (32, 24, 64)]:
        ref = PositionEmbeddingSine(c)(torch.zeros(1, c, h, w))[0].permute(1, 2, 0).numpy()
        assert np.abs(np.asarray(sine_2d(h, w, c)) - ref).max() < 1e-6


def test_rope_tables_match_compute_axial_cis():
    from sam2.modeling.position_encoding import compute_axial_cis

    cis = compute_axial_cis(256, 16, 16, 10000.0)
    cos, sin = axial_rope_tables(256, 16, 16)
    assert np.abs(cos - cis.real.numpy()).max() < 1e-6 and np.abs(sin - cis.imag.numpy()).max() < 1e-6

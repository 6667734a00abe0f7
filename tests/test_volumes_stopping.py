"""The stop rule (volumes/stopping.py): its pieces, and on the real path that ending objects online
gives what cutting a full propagation gives, while tracking fewer slices."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from medsam2_jax.tracker.step import object_embedding
from medsam2_jax.volumes import stopping
from medsam2_jax.volumes.stopping import FEATURES, StopRule


def test_rule_round_trips_and_refuses_what_it_cannot_read():
    rule = StopRule((1.0, -2.0, -0.5, -0.25, 0.0), 3.0, 0.6, 2, "self_sorting")
    assert StopRule.from_dict(rule.to_dict()) == rule
    with pytest.raises(ValueError, match="weights"):
        StopRule((1.0,), 0.0)
    with pytest.raises(ValueError, match="threshold"):
        StopRule((0.0,) * len(FEATURES), 0.0, threshold=1.0)
    with pytest.raises(ValueError, match="run"):
        StopRule((0.0,) * len(FEATURES), 0.0, run=0)
    with pytest.raises(ValueError, match="features"):
        StopRule.from_dict({**rule.to_dict(), "features": ["similarity"]})


def test_ends_at_the_first_run_of_absent_slices():
    rule = StopRule((0.0,) * len(FEATURES), 0.0, threshold=0.5, run=2)
    assert stopping.ends(np.array([0.9, 0.4, 0.9, 0.3, 0.2, 0.9]), rule) == 3  # one low slice is not a run
    assert stopping.ends(np.array([0.9, 0.8, 0.4]), rule) is None
    assert stopping.ends(np.array([0.1, 0.1]), StopRule((0.0,) * len(FEATURES), 0.0, run=1)) == 0


def test_kept_slices_cut_each_pass_at_its_end():
    """Prompt on slice 4 of 10; presence falls with the distance only (feature dist_mm): a rule
    that ends 3 mm out keeps slices 2..6 on a 1 mm grid; the prompted slice is always kept."""
    f = np.zeros((10, len(FEATURES)))
    f[:, 4] = np.abs(np.arange(10) - 4)
    rule = StopRule((0.0, 0.0, 0.0, 0.0, -1.0), 2.5, 0.5, 1)
    np.testing.assert_array_equal(np.flatnonzero(stopping.kept_slices(f, 4, rule)), [2, 3, 4, 5, 6])
    assert stopping.kept_slices(f, 4, None).all()
    f[:, 4] = np.arange(10)  # prompted on slice 0: one pass only
    assert stopping.kept_slices(f, 0, rule).tolist() == [True, True, True] + [False] * 7


def test_features_of_a_slice_from_the_reference():
    mask = np.zeros((20, 30), bool)
    mask[5:9, 10:20] = True  # 4 rows x 10 columns
    ref = stopping.reference(np.array([1.0, 0.0]), mask, spacing=(2.0, 0.5))
    assert (ref.height_mm, ref.width_mm) == (8.0, 5.0)
    assert ref.diameter_mm == pytest.approx(np.sqrt(4 * 40 * 1.0 / np.pi))
    f = stopping.slice_features(ref, np.array([1.0, 1.0]), 10.0)
    np.testing.assert_allclose(f, [np.sqrt(0.5), 2.0, 1.25, 10.0 / ref.diameter_mm, 10.0])
    assert stopping.slice_features(ref, None, 0.0)[0] == 0.0  # no embedding: nothing alike


def test_fit_finds_the_separating_direction():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, len(FEATURES)))
    present = x[:, 0] - x[:, 1] > 0.3
    w, b = stopping.fit(x, present)
    rule = StopRule(tuple(w), b)
    assert w[0] > 1 and w[1] < -1 and abs(w[2]) < 0.3 * w[0]
    assert ((rule.presence(x) > 0.5) == present).mean() > 0.95
    with pytest.raises(ValueError, match="with and without"):
        stopping.fit(x, np.ones(len(x), bool))


def test_object_embedding_pools_features_under_the_mask():
    feats = jnp.asarray(np.random.default_rng(1).normal(size=(4, 4, 3)), jnp.float32)
    logits = np.full((16, 16, 1), -50.0, np.float32)
    logits[4:8, 8:12] = 50.0  # exactly feature cell (1, 2)
    np.testing.assert_allclose(object_embedding(feats, jnp.asarray(logits)), feats[1, 2], rtol=1e-5)
    everywhere = object_embedding(feats, jnp.full((16, 16, 1), 50.0))
    np.testing.assert_allclose(everywhere, feats.mean((0, 1)), rtol=1e-5)


@pytest.fixture(scope="module")
def blob():
    """A bright ellipsoid in 40 slices of noise, one box on its middle slice."""
    from medsam2_jax.volumes.io import make_volume
    from medsam2_jax.volumes.prompts import build_prompts

    rng = np.random.default_rng(0)
    data = rng.normal(0.2, 0.05, (64, 64, 40)).astype(np.float32)
    x, y, z = np.mgrid[:64, :64, :40]
    data[((x - 32) / 12) ** 2 + ((y - 30) / 9) ** 2 + ((z - 20) / 8) ** 2 <= 1] = 0.9
    volume = make_volume(data, np.eye(4), source_path=Path("blob.nii.gz"), source_format="nifti")
    prompts = build_prompts(volume, [{"id": 1, "boxes": [[[20, 21, 20], [44, 39, 20]]]}], space="canonical")
    return volume, prompts


def _cut(result, prompts, rule):
    """`result` (a run without a rule) cut after the fact where `rule` ends the object."""
    keep = stopping.kept_slices(result.slice_features[1], prompts.prompts[0].slice_index, rule)
    return np.where(keep[None, None, :], result.labels, 0)


def test_ending_online_equals_cutting_a_full_run_and_tracks_fewer_slices(demo_predictor, blob):
    """With the shipped model: a rule (here one that ends 6 slices out, by distance alone) gives the
    labels of the unstopped run cut at its ends, and its passes stop early; a slice range wins over
    the rule; features are recorded on every tracked slice either way."""
    from medsam2_jax.volumes.prompts import with_slice_ranges
    from medsam2_jax.volumes.segment import segment_volume

    volume, prompts = blob
    full_count, stopped_count = [], []
    full = segment_volume(volume, prompts, demo_predictor, progress=full_count.append)
    # presence = sigmoid(6 - d_mm): below 0.5 from 7 mm on; a run of 2 ends it at 7 mm.
    rule = StopRule((0.0, 0.0, 0.0, 0.0, -1.0), 6.5, 0.5, 2)
    stopped = segment_volume(volume, prompts, demo_predictor, stop=rule, progress=stopped_count.append)
    np.testing.assert_array_equal(stopped.labels, _cut(full, prompts, rule))
    kept = np.flatnonzero(stopped.labels.any(axis=(0, 1)))
    assert full.labels.any(axis=(0, 1)).sum() > len(kept) and kept.min() >= 14 and kept.max() <= 26
    assert len(stopped_count) < len(full_count)
    f = full.slice_features[1]
    assert np.isfinite(f[np.arange(40) != 20]).all() and np.isnan(f[20]).all()  # the prompted slice has none
    assert f[25, 4] == 5.0 and f[14, 4] == 6.0  # the distance in mm
    assert (f[:, 0][np.arange(40) != 20] <= 1 + 1e-6).all()
    ranged = with_slice_ranges(prompts, {1: (5, 35)})
    np.testing.assert_array_equal(segment_volume(volume, ranged, demo_predictor, stop=rule).labels,
                                  segment_volume(volume, ranged, demo_predictor).labels)

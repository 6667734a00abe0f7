"""medsam2_jax.evaluation: metrics on shapes with known answers and against MONAI, the baselines,
the prompt protocols, slice ranges, and the runner on one real held-out structure at small size."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsam2_jax.evaluation import evaluate as E
from medsam2_jax.evaluation import metrics
from medsam2_jax.evaluation.sets import Structure


def ball(shape, centre_mm, radius_mm, spacing):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= radius_mm**2


def test_concentric_spheres_have_every_surface_distance_equal_to_the_gap():
    """Radii 10 and 14 mm: every border voxel of one lies ~4 mm from the other's border, so HD95
    is ~4 mm, NSD is 1 at a 5 mm tolerance and ~0 at 2.5 mm; on an anisotropic grid too."""
    for spacing in ((1.0, 1.0, 1.0), (0.8, 1.0, 2.0)):
        shape = tuple(int(40 / s) for s in spacing)
        inner, outer = ball(shape, (20, 20, 20), 10, spacing), ball(shape, (20, 20, 20), 14, spacing)
        assert metrics.hd95(inner, outer, spacing) == pytest.approx(4.0, abs=max(spacing))
        assert metrics.nsd(inner, outer, spacing, 5.0 + max(spacing)) == 1.0
        assert metrics.nsd(inner, outer, spacing, 2.5) < 0.05
        assert metrics.dice(inner, outer) == pytest.approx(2 * 10**3 / (10**3 + 14**3), rel=0.05)


def test_offset_spheres_hausdorff_is_the_offset():
    """Two 10 mm balls 6 mm apart along the coarse axis: the largest surface distance is the offset
    (at the poles), HD95 a little below it; Dice and NSD agree with the overlap."""
    spacing = (1.0, 1.0, 2.0)
    shape = (40, 40, 24)
    a, b = ball(shape, (20, 20, 20), 10, spacing), ball(shape, (20, 20, 26), 10, spacing)
    d_ab, d_ba = metrics.surface_distances(a, b, spacing)
    assert max(d_ab.max(), d_ba.max()) == pytest.approx(6.0, abs=1.0)
    assert 3.0 < metrics.hd95(a, b, spacing) <= 6.5
    # A sphere shifted by s overlaps with volume fraction 1 - 3s/4r + s^3/16r^3.
    assert metrics.dice(a, b) == pytest.approx(1 - 3 * 6 / 40 + 6**3 / (16 * 10**3), abs=0.04)
    assert metrics.nsd(a, b, spacing, 6.5) == 1.0


def test_empty_masks():
    empty, some = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    some[2:5, 2:5, 2:5] = True
    assert metrics.dice(empty, empty) == 1.0 and metrics.dice(empty, some) == 0.0
    assert metrics.nsd(empty, empty, (1, 1, 1), 1.0) == 1.0 and metrics.nsd(some, empty, (1, 1, 1), 1.0) == 0.0
    assert metrics.hd95(empty, empty, (1, 1, 1)) == 0.0 and np.isnan(metrics.hd95(empty, some, (1, 1, 1)))


def test_surface_metrics_match_monai():
    """A second implementation: MONAI's compute_hausdorff_distance (95th percentile) and
    compute_surface_dice, on random blobs with anisotropic spacing."""
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    from scipy import ndimage

    rng = np.random.default_rng(0)
    spacing = (0.7, 1.0, 2.5)
    for _ in range(3):
        masks = [ndimage.binary_opening(ndimage.gaussian_filter(rng.normal(size=(36, 30, 20)), 2.5) > 0.05,
                                        iterations=1) for _ in range(2)]
        for m in masks:
            m[0], m[-1], m[:, 0], m[:, -1], m[:, :, 0], m[:, :, -1] = (False,) * 6  # off the volume border
        pred, ref = masks
        onehot = lambda m: torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))  # noqa: E731
        hd = monai_metrics.compute_hausdorff_distance(onehot(pred), onehot(ref), include_background=False,
                                                      percentile=95, spacing=spacing)
        for tol in (1.0, 2.5):
            sd = monai_metrics.compute_surface_dice(onehot(pred), onehot(ref), [tol], include_background=False,
                                                    spacing=spacing)
            assert metrics.nsd(pred, ref, spacing, tol) == pytest.approx(float(sd), abs=1e-6)
        assert metrics.hd95(pred, ref, spacing) == pytest.approx(float(hd), rel=1e-6)


def test_slice_range_and_tolerance():
    ref = np.zeros((6, 6, 40), bool)
    ref[2:4, 2:4, 10:30] = True  # 20 slices
    pred = np.zeros_like(ref)
    pred[2:4, 2:4, 6:33] = True  # 4 early, 3 late: within 25% (5 slices)
    pred[1, 1, 0] = True  # a stray slice far away
    r = metrics.slice_range(pred, ref, axis=2)
    assert (r.true_first, r.true_last, r.pred_first, r.pred_last) == (10, 29, 0, 32)
    assert r.predicted_outside == 1 + 4 + 3 and r.missed_inside == 0 and not r.within(0.25)
    pred[1, 1, 0] = False
    assert metrics.slice_range(pred, ref, axis=2).within(0.25)
    assert not metrics.slice_range(np.zeros_like(ref), ref, axis=2).within(0.25)
    d = metrics.per_slice_dice(pred, ref, axis=2)
    assert np.isnan(d[0]) and d[6] == 0.0 and d[15] == 1.0


def _synthetic_structure(axis=2):
    from pathlib import Path

    from medsam2_jax.volumes.io import make_volume

    rng = np.random.default_rng(0)
    image = rng.normal(size=(24, 20, 30)).astype(np.float32)
    target = np.zeros(image.shape, bool)
    target[5:15, 6:12, 8:20] = True
    target[7:10, 8:10, 20:23] = True  # a thin tail: the largest and central slices differ
    image[target] += 3
    volume = make_volume(image, np.diag([1.0, 1.0, 2.0, 1.0]), source_path=Path("synthetic.nii.gz"),
                         source_format="nifti")
    return Structure("box", "synthetic", 1, volume, target, axis=axis)


def test_protocols_and_baselines():
    s = _synthetic_structure()
    assert E.prompt_slice(s.target, 2, "box_largest") in range(8, 20)
    assert E.prompt_slice(s.target, 2, "box_central") == 15  # (8 + 22) // 2
    rng = np.random.default_rng(0)
    entry = E.make_prompt(s, E.Options(protocol="box_central"), rng)
    assert entry["boxes"][0] == [[5.0, 6.0, 15.0], [14.0, 11.0, 15.0]]
    jittered = E.make_prompt(s, E.Options(protocol="box_central", jitter=0.2, seed=1), np.random.default_rng(1))
    assert jittered["boxes"][0] != entry["boxes"][0]
    assert jittered == E.make_prompt(s, E.Options(protocol="box_central", jitter=0.2), np.random.default_rng(1))
    click = E.make_prompt(s, E.Options(protocol="click"), rng)["points"][0]
    assert s.target[tuple(int(c) for c in click)]
    base = E.baselines(s, 15, entry)
    assert base["copy_mask"].sum() == 30 * s.target[:, :, 15].sum()
    assert base["copy_mask_in_range"].sum() == 15 * s.target[:, :, 15].sum()  # slices 8..22
    assert metrics.dice(base["box"], s.target) < metrics.dice(base["copy_mask_in_range"], s.target)
    with pytest.raises(ValueError, match="protocol"):
        E.Options(protocol="lasso")


def test_runner_on_a_real_held_out_structure(tmp_path, demo_predictor):
    """The real path at small size: the shipped model on one held-out AAL structure, both
    protocols; the report files are written and the numbers are consistent."""
    from medsam2_jax.evaluation import sets

    structures = sets.built_in("aal_held_out", limit=1)
    results = E.evaluate(structures, demo_predictor, E.Options(protocol="box_central"))
    row = results["rows"][0]
    assert row["structure"] == "Hippocampus_L"
    for m in ("model", "model_z_range", "copy_mask", "copy_mask_in_range", "box"):
        assert 0.0 <= row[m]["dice"] <= 1.0 and 0.0 <= row[m]["nsd"] <= 1.0
    # The range run predicts nothing outside the true range; the copy baselines are exact on the prompt.
    assert row["model_z_range"]["range"]["predicted_outside"] == 0
    assert row["copy_mask"]["prompted_slice_dice"] == 1.0
    assert row["copy_mask_in_range"]["dice"] >= row["copy_mask"]["dice"]
    paths = E.write_report(results, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["summary"]["model"]["dice"] == pytest.approx(row["model"]["dice"])
    assert "| model (one box) |" in paths["markdown"].read_text()
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

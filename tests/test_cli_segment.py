"""`medsam2-jax segment` / `demo` end to end on real volumes, with random weights at 256 px.

With untrained weights only the pipeline can be checked: outputs on the input's grid, forward
and backward passes reaching every slice, several objects in one label volume, and every bad
input answered with one line, exit status 2 and no output file left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsam2_jax import cli, datasets
from tests.reference import reference_image_model

MODEL = ["--config", "test", "--no-montage"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A converted checkpoint of the decisive random `test` model (masks are not empty)."""
    from medsam2_jax.convert.checkpoint import save_params

    _, params, config = reference_image_model("test")
    path = tmp_path_factory.mktemp("ckpt") / "test_ckpt"
    save_params(params, path, config)
    return str(path)


def _run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_forward_backward_multi_object_on_lsa_volume(tmp_path, capsys, ckpt):
    """Two boxes on a middle slice of the LSA-oriented ITK T1: both objects, every slice reached."""
    src = datasets.itk_t1_lsa()
    out = tmp_path / "seg.nii.gz"
    argv = ["segment", str(src), "--out", str(out), "--checkpoint", ckpt, *MODEL, "--probabilities",
            "--box", "30,40,60,70@30", "--box", "70,40,100,70@30"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    seg, ref = nib.load(out), nib.load(src)
    assert seg.shape == ref.shape and np.allclose(seg.affine, ref.affine)
    assert nib.aff2axcodes(seg.affine) == nib.aff2axcodes(ref.affine) == ("L", "S", "A")
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    _, params, _ = reference_image_model("test")
    assert sidecar["checkpoint_sha256"] == cli.params_sha256(params) and sidecar["checkpoint"] == ckpt
    scores = sidecar["slice_object_scores"]
    assert set(scores) == {"1", "2"}
    # Forward and backward passes: every slice along the prompt axis has an object score.
    for per_slice in scores.values():
        assert len(per_slice) == ref.shape[2] and all(s is not None for s in per_slice)
    probs = nib.load(tmp_path / "seg_probabilities.nii.gz")
    assert probs.shape == (*ref.shape, 2)
    labels = np.asarray(seg.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_prompts_file_seed_labels_and_demo(tmp_path, capsys, ckpt):
    vol = datasets.nibabel_anatomical()
    seed = tmp_path / "seed.nii.gz"
    img = nib.load(vol)
    lab = np.zeros(img.shape, np.int16)
    lab[10:20, 10:25, 8:15] = 3
    lab[5:9, 30:36, 10:12] = 7
    nib.save(nib.Nifti1Image(lab, img.affine), seed)
    code, _, err = _run(["segment", str(vol), "--out", str(tmp_path / "a.nii.gz"), "--seed", str(seed),
                         "--checkpoint", ckpt, *MODEL], capsys)
    assert code == 0, err
    assert set(json.loads((tmp_path / "a.json").read_text())["slice_object_scores"]) == {"3", "7"}

    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"version": 1, "objects": [
        {"id": 5, "points": [[15, 20, 12], [3, 3, 12]], "point_labels": [1, 0]}]}))
    code, _, err = _run(["segment", str(vol), "--out", str(tmp_path / "b.nii.gz"), "--prompts", str(prompts),
                         "--checkpoint", ckpt, *MODEL, "--largest-component"], capsys)
    assert code == 0, err
    assert set(np.unique(np.asarray(nib.load(tmp_path / "b.nii.gz").dataobj))) <= {0, 5}


def test_multi_orientation_fusion(tmp_path, capsys, ckpt):
    vol = datasets.nibabel_anatomical()
    out = tmp_path / "m.nii.gz"
    code, _, err = _run(["segment", str(vol), "--out", str(out), "--box", "8,10,24,30@12", "--checkpoint", ckpt,
                         *MODEL, "--multi-orientation", "--fusion", "vote", "--probabilities"], capsys)
    assert code == 0, err
    assert nib.load(out).shape == nib.load(vol).shape
    probs = np.asarray(nib.load(tmp_path / "m_probabilities.nii.gz").dataobj)
    # Majority voting over three passes gives fractions of thirds (or halves if one pass lost it).
    assert np.all(np.isin(np.round(probs * 6), np.arange(7)))
    assert ((probs > 0) & (probs < 1)).any(), "the passes along the other axes must have run and disagreed somewhere"


def test_demo_runs_and_says_it_is_untrained(tmp_path, capsys, monkeypatch):
    """Without shipped weights and without --checkpoint the demo still runs, and says so."""
    from medsam2_jax import weights

    monkeypatch.setattr(weights, "default_checkpoint", lambda: None)
    code, out, err = _run(["demo", "--out-dir", str(tmp_path), "--config", "test"], capsys)
    assert code == 0
    assert "UNTRAINED" in err
    for name in ("demo_labels.nii.gz", "demo_labels.json", "demo_labels_montage.png", "demo_report.md"):
        assert (tmp_path / name).is_file()
    assert "| model (one box) |" in (tmp_path / "demo_report.md").read_text()


def test_z_range_keeps_propagation_inside(tmp_path, capsys, ckpt):
    """--z-range Z0:Z1: nothing outside the range, the sidecar records it, and only its slices are
    tracked (object scores elsewhere are null); a range that misses the prompt is one line, exit 2."""
    vol = datasets.nibabel_anatomical()  # 33 x 41 x 25, slices along the file's third axis
    out = tmp_path / "z.nii.gz"
    code, _, err = _run(["segment", str(vol), "--out", str(out), "--box", "8,10,24,30@12", "--z-range", "9:15",
                         "--checkpoint", ckpt, *MODEL], capsys)
    assert code == 0, err
    labels = np.asarray(nib.load(out).dataobj)
    assert labels.any() and not labels[:, :, :9].any() and not labels[:, :, 16:].any()
    sidecar = json.loads((tmp_path / "z.json").read_text())
    scores = sidecar["slice_object_scores"]["1"]
    # The file's third axis may run either way along the canonical axis: count, don't index.
    assert sum(s is not None for s in scores) == 7
    assert sidecar["prompts"]["slice_ranges"]["1"] in ([9, 15], [25 - 1 - 15, 25 - 1 - 9])
    for bad, message in (("20:24", "lies outside its slice range"), ("3-9", "expected Z0:Z1"),
                         ("0:99", "outside the volume")):
        code, _, err = _run(["segment", str(vol), "--out", str(tmp_path / "bad.nii.gz"), "--box", "8,10,24,30@12",
                             "--z-range", bad, "--checkpoint", ckpt, *MODEL], capsys)
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "bad.nii.gz").exists()
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"version": 1, "objects": [
        {"id": 2, "boxes": [[[8, 10, 12], [24, 30, 12]]], "z_range": [11, 13]}]}))
    code, _, err = _run(["segment", str(vol), "--out", str(tmp_path / "j.nii.gz"), "--prompts", str(prompts),
                         "--checkpoint", ckpt, *MODEL], capsys)
    assert code == 0, err
    labels = np.asarray(nib.load(tmp_path / "j.nii.gz").dataobj)
    assert not labels[:, :, :11].any() and not labels[:, :, 14:].any()


def test_crop_defaults_to_the_checkpoints_manifest(tmp_path, capsys, ckpt):
    """A checkpoint whose manifest says inference.crop = 3 is run in that window by default (the
    sidecar records it; nothing is labelled outside); --crop 0 shows whole slices; --crop 0.5 is
    one line, exit 2. Its config comes from the manifest too (no --config)."""
    import shutil

    windowed = tmp_path / "windowed"
    shutil.copytree(ckpt, windowed)
    manifest = json.loads((windowed / "manifest.json").read_text())
    (windowed / "manifest.json").write_text(json.dumps({**manifest, "inference": {"crop": 3.0}}))
    vol = datasets.nibabel_anatomical()  # 33 x 41 x 25
    base = ["segment", str(vol), "--box", "8,10,14,16@12", "--checkpoint", str(windowed), "--no-montage"]
    code, _, err = _run([*base, "--out", str(tmp_path / "w.nii.gz")], capsys)
    assert code == 0, err
    sidecar = json.loads((tmp_path / "w.json").read_text())
    assert sidecar["crop"] == 3.0 and sidecar["config"] == "test"
    labels = np.asarray(nib.load(tmp_path / "w.nii.gz").dataobj)
    outside = np.ones(labels.shape, bool)
    # The box is 7 x 7 voxels of 2 mm: the window 42 mm = 21 voxels, centred on the box (x 8..14 is
    # canonical 18..24 of this LAS file, so the window's canonical 11..31 is file x 1..21).
    outside[1:22, 3:24] = False
    assert labels.any() and not labels[outside].any()
    code, _, err = _run([*base, "--out", str(tmp_path / "f.nii.gz"), "--crop", "0"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "f.json").read_text())["crop"] is None
    code, _, err = _run([*base, "--out", str(tmp_path / "bad.nii.gz"), "--crop", "0.5"], capsys)
    assert code == 2 and "--crop 0.5" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad.nii.gz").exists()


def test_stop_rule_comes_from_the_checkpoints_manifest(tmp_path, capsys, ckpt):
    """A manifest with inference.stop ends each object where its rule says (here: 3 mm out, by
    distance alone), with the rule's policy, and the sidecar records both; --no-stop tracks every
    slice; a stop rule the code cannot read is one line, exit 2, nothing written."""
    import shutil

    from medsam2_jax.volumes.stopping import FEATURES, StopRule

    stopping = tmp_path / "stopping"
    shutil.copytree(ckpt, stopping)
    manifest = json.loads((stopping / "manifest.json").read_text())
    rule = StopRule((0.0,) * (len(FEATURES) - 1) + (-1.0,), 3.5, 0.5, 1, "self_sorting")  # ends at 4 mm
    (stopping / "manifest.json").write_text(json.dumps({**manifest, "inference": {"stop": rule.to_dict()}}))
    vol = datasets.nibabel_anatomical()  # 33 x 41 x 25, 2 mm voxels
    base = ["segment", str(vol), "--box", "8,10,14,16@12", "--checkpoint", str(stopping), "--no-montage"]
    code, _, err = _run([*base, "--out", str(tmp_path / "s.nii.gz")], capsys)
    assert code == 0, err
    sidecar = json.loads((tmp_path / "s.json").read_text())
    assert sidecar["stop"] == rule.to_dict() and sidecar["memory_policy"] == "self_sorting"
    labels = np.asarray(nib.load(tmp_path / "s.nii.gz").dataobj)
    assert not labels[:, :, :11].any() and not labels[:, :, 14:].any()  # slices 11..13 at most (2 mm apart)
    code, _, err = _run([*base, "--out", str(tmp_path / "n.nii.gz"), "--no-stop"], capsys)
    assert code == 0, err
    sidecar = json.loads((tmp_path / "n.json").read_text())
    assert sidecar["stop"] is None and sidecar["memory_policy"] == cli.POLICY_3D
    (stopping / "manifest.json").write_text(json.dumps({**manifest, "inference": {"stop": {"weights": [1.0],
                                                                                        "bias": 0.0}}}))
    code, _, err = _run([*base, "--out", str(tmp_path / "bad.nii.gz")], capsys)
    assert code == 2 and "inference.stop" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad.nii.gz").exists()


def test_demo_runs_the_shipped_model_and_beats_copying_the_prompted_mask(tmp_path, capsys):
    """`medsam2-jax demo` with no arguments runs the shipped demo model (scripts/train_demo_model.py),
    whose target, the left thalamus, was held out of its training. It reports Dice, NSD, HD95 and
    the slice range for the model and the baselines; its Dice must beat the naive baseline,
    computed here: the prompted slice's true mask copied to every slice."""
    import re

    from medsam2_jax import weights
    from medsam2_jax.volumes.io import load_label_volume, load_volume

    shipped = weights.default_checkpoint()
    assert shipped is not None, "no demo weights in medsam2_jax/weights/medsam2_jax_demo"
    code, out, err = _run(["demo", "--out-dir", str(tmp_path)], capsys)
    assert code == 0, err
    assert "UNTRAINED" not in err and f"weights: shipped:{shipped.name}" in out
    row = lambda name: re.search(rf"\| {re.escape(name)} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.na/]+) \| (.*) \|", out)  # noqa: E731
    model, copy = row("model (one box)"), row("copy prompted mask")
    target = load_label_volume(datasets.aal(), load_volume(datasets.colin27())) == cli.DEMO_STRUCTURE[0]
    z = int(np.argmax(target.sum(axis=(0, 1))))  # the demo's prompted slice
    copied = np.repeat(target[:, :, z : z + 1], target.shape[2], axis=2)
    baseline = 2 * (copied & target).sum() / (copied.sum() + target.sum())
    assert float(copy.group(1)) == pytest.approx(baseline, abs=5e-4)
    assert float(model.group(1)) > baseline, out
    assert "outside the truth" in model.group(4) and row("box on every slice") and row(
        "copy mask in true range (ceiling)")
    assert (tmp_path / "demo_labels_montage.png").is_file()


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def _bad(tmp_path, capsys, src, *prompt, extra=()):
    out = tmp_path / "out" / "seg.nii.gz"
    out.parent.mkdir(exist_ok=True)
    code, _, err = _run(["segment", str(src), "--out", str(out), *MODEL, *extra, *prompt], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("medsam2-jax segment: error:")
    assert not any(out.parent.iterdir()), list(out.parent.iterdir())
    return err


def _nifti(tmp_path, data, name="v.nii.gz"):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), path)
    return path


BOX = ("--box", "2,2,10,10@5")


def test_options_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    """A wrong window, a level without a width, a window with a level, an unknown policy or a
    non-NIfTI output name: one line and exit 2 before the volume is even read."""
    from medsam2_jax.volumes import io

    def no_read(*_, **__):
        raise AssertionError("the volume was read before the options were checked")

    monkeypatch.setattr(io, "load_volume", no_read)
    src = tmp_path / "never_read.nii.gz"
    cases = {("--window", "liver"): "unknown CT window", ("--level", "40"): "needs both a level and a width",
             ("--window", "brain", "--level", "40"): "not both", ("--policy", "lifo"): "unknown --policy"}
    for extra, message in cases.items():
        assert message in _bad(tmp_path, capsys, src, *BOX, extra=extra)
    code, _, err = _run(["segment", str(src), "--out", str(tmp_path / "x.png"), *BOX, *MODEL], capsys)
    assert code == 2 and ".nii.gz" in err and len(err.splitlines()) == 1


def test_outputs_follow_the_umask(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the file written must get the umask's mode."""
    import os

    from medsam2_jax.volumes.output import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_bad_inputs_each_fail_cleanly(tmp_path, capsys):
    rng = np.random.default_rng(0)
    good = rng.random((20, 20, 12)).astype(np.float32)
    errors = {}
    errors["missing"] = _bad(tmp_path, capsys, tmp_path / "nope.nii.gz", *BOX)
    txt = tmp_path / "notes.nii.gz"
    txt.write_text("this is not an image")
    errors["not image"] = _bad(tmp_path, capsys, txt, *BOX)
    full = _nifti(tmp_path, good, "full.nii.gz")
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    errors["truncated"] = _bad(tmp_path, capsys, cut, *BOX)
    errors["2d"] = _bad(tmp_path, capsys, _nifti(tmp_path, good[:, :, 0], "flat.nii.gz"), *BOX)
    errors["4d"] = _bad(tmp_path, capsys, _nifti(tmp_path, np.stack([good, good], -1), "four.nii.gz"), *BOX)
    nan = good.copy()
    nan[3, 3, 3] = np.nan
    errors["nan"] = _bad(tmp_path, capsys, _nifti(tmp_path, nan, "nan.nii.gz"), *BOX)
    errors["constant"] = _bad(tmp_path, capsys, _nifti(tmp_path, np.ones_like(good), "const.nii.gz"), *BOX)
    errors["outside"] = _bad(tmp_path, capsys, full, "--box", "2,2,10,10@40")
    errors["zero area"] = _bad(tmp_path, capsys, full, "--box", "4,4,4,10@5")
    empty = _nifti(tmp_path, np.zeros(good.shape, np.int16), "empty_seed.nii.gz")
    errors["empty seed"] = _bad(tmp_path, capsys, full, "--seed", str(empty))
    for what, err in errors.items():
        assert len(err) < 400, (what, err)


def test_checkpoint_that_does_not_fit(tmp_path, capsys, ckpt):
    src = _nifti(tmp_path, np.random.default_rng(1).random((20, 20, 12)).astype(np.float32))
    err = _bad(tmp_path, capsys, src, *BOX, extra=("--checkpoint", ckpt, "--config", "medsam2"))
    assert "does not fit" in err


def test_four_d_with_one_volume_is_accepted(tmp_path, capsys, ckpt):
    data = np.random.default_rng(2).random((20, 20, 12, 1)).astype(np.float32)
    src = _nifti(tmp_path, data, "one.nii.gz")
    code, _, err = _run(["segment", str(src), "--out", str(tmp_path / "s.nii.gz"), "--checkpoint", ckpt, *MODEL,
                         *BOX], capsys)
    assert code == 0, err
    assert nib.load(tmp_path / "s.nii.gz").shape[:3] == (20, 20, 12)


def test_unwritable_output_folder(tmp_path, capsys):
    src = _nifti(tmp_path, np.random.default_rng(3).random((20, 20, 12)).astype(np.float32))
    code, _, err = _run(["segment", str(src), "--out", "/proc/seg.nii.gz", *MODEL, *BOX], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    code, _, err = _run(["segment", str(src), "--out", str(tmp_path / "no" / "such" / "seg.nii.gz"), *MODEL, *BOX],
                        capsys)
    assert code == 2 and len(err.splitlines()) == 1


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["segment", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--box", "--point", "--prompts", "--seed", "--checkpoint", "--window", "--policy", "--out"):
        assert flag in text


def test_segment_2d_on_nuclei_crops(tmp_path, capsys, ckpt):
    """One-Prompt 2D from the CLI on real fluorescence nuclei (stardist), any crop sizes."""
    import tifffile
    from PIL import Image

    image_path, _ = datasets.stardist_nuclei()
    img = tifffile.imread(image_path).astype(np.float32)
    img = (255 * (img - img.min()) / (img.max() - img.min())).astype(np.uint8)
    paths = []
    for i, (y, x, h, w) in enumerate([(0, 0, 128, 128), (200, 100, 96, 160), (300, 300, 150, 120)]):
        p = tmp_path / f"crop{i}.png"
        Image.fromarray(img[y:y + h, x:x + w]).save(p)
        paths.append(str(p))
    out = tmp_path / "masks"
    out.mkdir()
    code, stdout, err = _run(["segment-2d", paths[0], *paths[1:], "--box", "20,20,70,70", "--out-dir", str(out),
                              "--checkpoint", ckpt, "--config", "test", "--policy", "self_sorting"], capsys)
    assert code == 0, err
    # Every image's mask at its own size, the template's too (its decoder answer), and a montage.
    for p, (h, w) in zip(paths, [(128, 128), (96, 160), (150, 120)]):
        mask = np.asarray(Image.open(out / (Path(p).stem + "_mask.png")))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
    assert "(the template)" in stdout
    assert Image.open(out / "montage.png").size[0] > 0
    code, _, err = _run(["segment-2d", paths[0], paths[1], "--box", "20,20,20,70", "--out-dir", str(out),
                         "--config", "test"], capsys)
    assert code == 2 and "zero area" in err

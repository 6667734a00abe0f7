"""Every entry point as a user meets it: options a command does not use are refused, outputs never
overwrite each other, what the command tidied in the user's input is said, and help says how."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from medsam2_jax import cli, datasets


@pytest.fixture
def no_model_run(monkeypatch):
    """`segment` up to and after the model, which draws nothing: what goes in and what is written
    are tested here, the segmentation itself in test_cli_segment.py."""
    from medsam2_jax import weights
    from medsam2_jax.volumes.segment import Segmentation

    def empty(volume, prompts, model, args):
        objects = list(prompts.object_ids)
        return Segmentation(np.zeros(volume.shape, np.int32), np.zeros((len(objects), *volume.shape), np.float32),
                            objects, {})

    monkeypatch.setattr(cli, "_run_segmentation", empty)
    monkeypatch.setattr(weights, "default_checkpoint", lambda: None)  # random `test` weights, no files


def _run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


@pytest.mark.parametrize("option", [
    ("--window", "brain"), ("--level", "40"), ("--width", "400"), ("--multi-orientation",), ("--fusion", "vote"),
    ("--probabilities",), ("--largest-component",), ("--axis", "coronal"),
])
def test_segment_2d_refuses_the_3d_options(tmp_path, capsys, option):
    """segment-2d has no window and no third axis: their options are refused, not ignored."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["segment-2d", "t.png", "a.png", "--box", "1,1,5,5", "--out-dir", str(tmp_path), *option])
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {' '.join(option)}" in capsys.readouterr().err


def test_segment_2d_refuses_two_images_with_one_mask_name(tmp_path, capsys, monkeypatch):
    """dir1/x.png and dir2/x.png would both write x_mask.png: one line, exit 2, before any image is read."""
    from medsam2_jax.volumes import io

    def no_read(*_, **__):
        raise AssertionError("an image was read before the mask names were checked")

    monkeypatch.setattr(io, "load_image_2d", no_read)
    out = tmp_path / "masks"
    out.mkdir()
    for first, second in (("dir1/x.png", "dir2/x.png"), ("a.v1.png", "a.v2.tif")):
        code, _, err = _run(["segment-2d", "t.png", "y.png", first, second, "--box", "1,1,5,5",
                             "--out-dir", str(out), "--config", "test"], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("medsam2-jax segment-2d: error:"), err
        assert f"{first} and {second} would both write" in err and "_mask.png" in err
        assert not any(out.iterdir())


def test_an_inverted_box_on_a_fractional_slice_is_sorted_rounded_and_said(tmp_path, capsys, no_model_run):
    """--box X1,Y1,X0,Y0@12.5 segments the box 8,10,24,30 on slice 12; each tidying is a one-line
    warning and a note in the sidecar, which also keeps the box as typed."""
    vol = datasets.nibabel_anatomical()  # 33 x 41 x 25
    typed = "24,30,8,10@12.5"
    code, _, err = _run(["segment", str(vol), "--out", str(tmp_path / "s.nii.gz"), f"--box={typed}",
                         "--z-range", "11:13", "--config", "test", "--no-montage"], capsys)
    assert code == 0, err
    notes = ["object 1: box corners given as X1<X0 and Y1<Y0; sorted", "object 1: box slice 12.5 rounded to 12"]
    assert [line for line in err.splitlines() if line.startswith("warning: object")] == [f"warning: {n}" for n in notes]
    sidecar = json.loads((tmp_path / "s.json").read_text())
    assert sidecar["prompts"]["notes"] == notes
    assert sidecar["given"] == {"space": "voxel", "box": [typed], "z_range": "11:13"}
    from medsam2_jax.volumes.io import load_volume
    from medsam2_jax.volumes.prompts import build_prompts, canonical_axis_of_file_axis

    volume = load_volume(vol)
    as_meant = build_prompts(volume, [{"id": 1, "boxes": [[[8, 10, 12], [24, 30, 12]]]}],
                             axis=canonical_axis_of_file_axis(volume, 2))
    assert sidecar["prompts"]["prompts"] == as_meant.to_json()["prompts"]


def test_a_prompt_file_is_kept_as_given(tmp_path, capsys, no_model_run):
    vol = datasets.nibabel_anatomical()
    content = {"version": 1, "objects": [{"id": 4, "boxes": [[[8, 10, 12], [24, 30, 12]]], "z_range": [12, 13]}]}
    (tmp_path / "p.json").write_text(json.dumps(content))
    code, _, err = _run(["segment", str(vol), "--out", str(tmp_path / "s.nii.gz"), "--prompts",
                         str(tmp_path / "p.json"), "--config", "test", "--no-montage"], capsys)
    assert code == 0 and "warning: object" not in err, err
    sidecar = json.loads((tmp_path / "s.json").read_text())
    assert sidecar["given"] == {"prompts": str(tmp_path / "p.json"), "content": content}
    assert "notes" not in sidecar["prompts"]


def test_space_help_says_what_each_space_is_and_how_to_give_negative_numbers(capsys):
    with pytest.raises(SystemExit):
        cli.main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "voxel, the file's voxel indices (default)" in text and "world_lps, millimetres LPS+" in text
    assert "--box=-23,40,10,60@12" in text
    args = cli.build_parser().parse_args(["segment", "v.nii.gz", "--out", "s.nii.gz", "--box=-23,40,10,60@12"])
    assert args.box == ["-23,40,10,60@12"]


@pytest.mark.parametrize("crop", ["inf", "1e308", "nan", "0.5"])
def test_a_crop_beyond_any_field_of_view_is_refused_before_the_work(tmp_path, capsys, no_model_run, crop):
    """--crop inf (or 1e308) passed the check and overflowed in prompt_crop (found by fuzzing)."""
    vol = datasets.nibabel_anatomical()
    code, _, err = _run(["segment", str(vol), "--out", str(tmp_path / "s.nii.gz"), "--box=8,10,24,30@12",
                         f"--crop={crop}", "--config", "test"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "give a window factor from 1" in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("crop", ["abc", -1, 0.5, True, [3], 1e308])
def test_a_manifest_crop_that_is_no_window_factor_is_a_user_error(crop):
    """A checkpoint manifest's inference crop reached float() or prompt_crop's ValueError as a
    traceback (found by reading what the fuzzed manifests could reach); --crop wins over it."""
    from types import SimpleNamespace

    model = cli.Model(params=None, config=None, checkpoint="ck", inference={"crop": crop})
    with pytest.raises(cli.UserError, match=r"ck: its manifest's inference crop .* is not a window factor"):
        cli._crop(SimpleNamespace(crop=None), model)
    assert cli._crop(SimpleNamespace(crop=0.0), model) is None
    assert cli._crop(SimpleNamespace(crop=None), cli.Model(None, None, "ck", {"crop": 3})) == 3.0


@pytest.mark.parametrize("env, expected", [({}, "home/.cache/medsam2_jax/xla"),
                                           ({"MEDSAM2_JAX_CACHE": "data"}, "data/xla"),
                                           ({"MEDSAM2_JAX_COMPILE_CACHE": "0"}, None),
                                           ({"MEDSAM2_JAX_COMPILE_CACHE": "xla2"}, "xla2"),
                                           ({"jax": "jax"}, "jax")])
def test_the_cli_keeps_compiled_functions_across_runs(tmp_path, monkeypatch, env, expected):
    """`jax` stands for JAX's own cache folder (JAX_COMPILATION_CACHE_DIR, read at import): it wins."""
    import jax

    for k in ("MEDSAM2_JAX_CACHE", "MEDSAM2_JAX_COMPILE_CACHE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for k, v in env.items():
        if k != "jax":
            monkeypatch.setenv(k, v if v == "0" else str(tmp_path / v))
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax") if "jax" in env else None)
    try:
        cli._persist_compilation()
        where = jax.config.jax_compilation_cache_dir
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert where == (None if expected is None else str(tmp_path / expected))


def test_default_policies_are_the_measured_best():
    """Issue 14 part 3: 3D commands default to fifo (or the policy of the checkpoint's stop rule),
    One-Prompt 2D to self_sorting, segment with a slice range on every object to self_sorting
    (cli.POLICY_*, with the measurements written beside them), and every policy can still be chosen."""
    parser = cli.build_parser()
    box3d, box2d = ["--box", "1,1,5,5@0"], ["--box", "1,1,5,5"]
    assert parser.parse_args(["segment", "v.nii.gz", *box3d, "--out", "o.nii.gz"]).policy is None  # by the prompts
    assert parser.parse_args(["demo"]).policy is None and parser.parse_args(["evaluate"]).policy is None
    # At run time: the policy the checkpoint's stop rule was fitted with, else fifo; a range wins.
    rule = {"weights": [0.0] * 5, "bias": 0.0, "policy": "medsam2_released"}
    for inference, ranged, want in (({"stop": rule}, False, "medsam2_released"), ({}, False, "fifo"),
                                    ({"stop": rule}, True, "self_sorting")):
        args = parser.parse_args(["demo"])
        prompts = types.SimpleNamespace(object_ids=[1], slice_ranges={1: (0, 3)} if ranged else {})
        cli._default_policy(args, cli.Model(None, None, "ckpt", inference), prompts)
        assert args.policy == want
    args = parser.parse_args(["demo", "--no-stop"])
    cli._default_policy(args, cli.Model(None, None, "ckpt", {"stop": rule}))
    assert args.policy == cli.POLICY_3D
    two_d = ["segment-2d", "t.png", "a.png", *box2d, "--out-dir", "o"]
    assert parser.parse_args(two_d).policy == "self_sorting"
    assert parser.parse_args([*two_d, "--policy", "fifo"]).policy == "fifo"


@pytest.mark.parametrize("extra, policy", [
    ((), "fifo"), (("--z-range", "11:13"), "self_sorting"),
    (("--z-range", "11:13", "--policy", "medsam2_released"), "medsam2_released"),
])
def test_segment_picks_its_policy_by_the_slice_range(tmp_path, capsys, no_model_run, extra, policy):
    vol = datasets.nibabel_anatomical()
    code, _, err = _run(["segment", str(vol), "--out", str(tmp_path / "s.nii.gz"), "--box=8,10,24,30@12",
                         *extra, "--config", "test", "--no-montage"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "s.json").read_text())["memory_policy"] == policy

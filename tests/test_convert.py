"""Checkpoint conversion: key sets of every official config, exact round trips, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medsam2_jax import cli
from medsam2_jax.configs.model import VARIANTS, get_config
from medsam2_jax.convert.checkpoint import (
    CheckpointError,
    abstract_params,
    flatten_params,
    load_params,
    params_to_torch,
    read_state_dict,
    save_params,
    torch_to_params,
    write_torch_state_dict,
)
from medsam2_jax.convert.table import our_path, torch_key
from tests.reference import hydra_overrides, reference_image_model, state_dict_numpy

OFFICIAL = [v for v in VARIANTS if not v.startswith("test") and v != "demo"]  # 8 official configs + medsam2


@pytest.mark.parametrize("name", OFFICIAL)
def test_key_sets_and_shapes_match_official(name):
    """Every official key maps to exactly one of our parameters with the transformed shape.

    The official model is built on the meta device: shapes only, no memory (large is 224 M).
    """
    from sam2.build_sam import build_sam2

    from medsam2_jax.convert.table import TRANSFORMS

    config = get_config(name)
    yaml, overrides = hydra_overrides(config)
    model = build_sam2(yaml, None, device="meta", hydra_overrides_extra=overrides)
    official = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {p: tuple(v.shape) for p, v in flatten_params(abstract_params(config)).items()}
    mapped = {}
    for key, shape in official.items():
        path, transform = our_path(key)
        mapped[path] = TRANSFORMS[transform][0](np.empty(shape, np.float32)).shape
        assert torch_key(path) == (key, transform)
    assert set(mapped) == set(ours), (set(mapped) ^ set(ours))
    assert mapped == ours
    expected_keys = {"sam2.1": {"tiny": 471, "small": 519, "base_plus": 615, "large": 903}}
    if config.version == "sam2.1" and name != "medsam2":
        assert len(official) == expected_keys["sam2.1"][name.split("_", 1)[1]]


@pytest.mark.parametrize("name", ["test", "test_sam2", "sam2.1_tiny", "sam2_tiny"])
def test_round_trips_are_bit_identical(name):
    from sam2.build_sam import build_sam2

    config = get_config(name)
    yaml, overrides = hydra_overrides(config)
    model = build_sam2(yaml, None, device="cpu", hydra_overrides_extra=overrides)
    state = state_dict_numpy(model)
    params, manifest = torch_to_params(state, config)
    assert len(manifest) == len(state)
    back = params_to_torch(params)
    assert set(back) == set(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k]), k
    # ours -> torch -> ours
    again, _ = torch_to_params(back, config)
    for path, value in flatten_params(params).items():
        assert np.array_equal(np.asarray(value), np.asarray(flatten_params(again)[path])), path
    # The official strict loader accepts what we write.
    model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_cli_convert_both_ways_and_official_strict_load(tmp_path, capsys):
    from sam2.build_sam import build_sam2

    model, params, config = reference_image_model("test")
    pt = tmp_path / "official.pt"
    torch.save({"model": model.state_dict()}, pt)
    out = tmp_path / "ours"
    assert cli.main(["convert", str(pt), str(out), "--config", "test"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"] == "test" and len(manifest["entries"]) == len(model.state_dict())
    assert {"key", "path", "torch_shape", "shape", "transform"} <= set(manifest["entries"][0])
    restored = load_params(out, config)
    for path, value in flatten_params(params).items():
        assert np.array_equal(np.asarray(value), np.asarray(flatten_params(restored)[path])), path

    back = tmp_path / "back.pt"
    assert cli.main(["convert", str(out), str(back), "--config", "test", "--to-torch"]) == 0
    yaml, overrides = hydra_overrides(config)
    fresh = build_sam2(yaml, str(back), device="cpu", hydra_overrides_extra=overrides)  # strict load
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_safetensors_input(tmp_path):
    from safetensors.torch import save_file

    model, params, config = reference_image_model("test")
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    converted, _ = torch_to_params(read_state_dict(path), config)
    for p, v in flatten_params(params).items():
        assert np.array_equal(np.asarray(v), np.asarray(flatten_params(converted)[p]))
    write_torch_state_dict(params_to_torch(params), tmp_path / "back.safetensors")
    assert set(read_state_dict(tmp_path / "back.safetensors")) == set(model.state_dict())


# ----------------------------------------------------------------------------------------------
# Bad checkpoints: one line naming the problem, exit status 2, nothing written


def _run_cli(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def test_wrong_size_names_the_keys(tmp_path, capsys):
    model, _, _ = reference_image_model("test")
    pt = tmp_path / "test_model.pt"
    torch.save({"model": model.state_dict()}, pt)
    code, err = _run_cli(["convert", str(pt), str(tmp_path / "out"), "--config", "sam2.1_tiny"], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and "wrong shape" in err and "image_encoder" in err
    assert not (tmp_path / "out" / "params").exists()


def test_sam2_v1_checkpoint_with_sam21_config(tmp_path, capsys):
    model, _, _ = reference_image_model("test_sam2")
    pt = tmp_path / "v1.pt"
    torch.save({"model": model.state_dict()}, pt)
    code, err = _run_cli(["convert", str(pt), str(tmp_path / "out"), "--config", "test"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "missing 3 keys" in err and "no_obj_embed_spatial" in err and "obj_ptr_tpos_proj.weight" in err
    assert "sam2_* config" in err


def test_unused_and_missing_keys_are_named(tmp_path):
    model, _, config = reference_image_model("test")
    state = state_dict_numpy(model)
    state["extra.layer.weight"] = np.zeros((2, 2), np.float32)
    del state["memory_encoder.out_proj.bias"]
    with pytest.raises(CheckpointError, match=r"missing 1 keys: memory_encoder\.out_proj\.bias.*extra\.layer\.weight"):
        torch_to_params(state, config)


def test_truncated_file(tmp_path, capsys):
    model, _, _ = reference_image_model("test")
    pt = tmp_path / "full.pt"
    torch.save({"model": model.state_dict()}, pt)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    code, err = _run_cli(["convert", str(cut), str(tmp_path / "out"), "--config", "test"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "truncated" in err and "cut.pt" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_not_a_checkpoint(tmp_path, capsys, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    code, err = _run_cli(["convert", str(bad), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "bad.pt" in err


def test_missing_file_and_unknown_config(tmp_path, capsys):
    code, err = _run_cli(["convert", str(tmp_path / "nope.pt"), str(tmp_path / "out")], capsys)
    assert code == 2 and "not found" in err
    code, err = _run_cli(["convert", str(tmp_path / "nope.pt"), str(tmp_path / "out"), "--config", "huge"], capsys)
    assert code == 2 and "unknown model variant" in err


def test_loading_into_another_config_fails_clearly(tmp_path):
    _, params, config = reference_image_model("test")
    save_params(params, tmp_path / "ck", config)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_params(tmp_path / "ck", get_config("sam2.1_tiny"))


def test_plain_and_ddp_state_dicts(tmp_path):
    """Fine-tunes are often saved as a bare state dict, or from DDP with a 'module.' prefix."""
    model, params, config = reference_image_model("test")
    for name, obj in [("bare.pt", model.state_dict()),
                      ("ddp.pt", {"model": {f"module.{k}": v for k, v in model.state_dict().items()}})]:
        torch.save(obj, tmp_path / name)
        converted, _ = torch_to_params(read_state_dict(tmp_path / name), config)
        assert set(flatten_params(converted)) == set(flatten_params(params))


@pytest.mark.parametrize("content, what", [
    (b"", "nothing (0 bytes)"),
    (b"some text bytes\n", "text ('some text bytes')"),
    (bytes(range(8)) * 4, "binary data starting 00 01 02 03 04 05 06 07"),
])
def test_not_a_checkpoint_says_what_it_holds(tmp_path, capsys, content, what):
    (tmp_path / "bad").mkdir()
    fake = tmp_path / "bad" / "fake.pt"
    fake.write_bytes(content)
    code, err = _run_cli(["convert", str(fake), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{fake}: it holds {what}, not a PyTorch checkpoint" in err and "nor safetensors" in err


def test_a_safetensors_file_named_pt_loads(tmp_path):
    """The format is read from the file's first bytes, not its name."""
    from safetensors.numpy import save_file

    save_file({"a.weight": np.ones((2, 3), np.float32)}, str(tmp_path / "st.pt"))
    state = read_state_dict(tmp_path / "st.pt")
    assert list(state) == ["a.weight"] and np.array_equal(state["a.weight"], np.ones((2, 3)))


def test_to_torch_writes_only_torch_names(tmp_path, capsys):
    """Checked before anything is read: the checkpoint folder need not exist."""
    for name in ("out.txt", "out.npz", "out"):
        code, err = _run_cli(["convert", str(tmp_path / "ours"), str(tmp_path / name), "--to-torch"], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and ".pt, .pth or .safetensors" in err, err
        assert not (tmp_path / name).exists()


def test_odd_keys_are_one_line(tmp_path, capsys):
    """Found by fuzzing: an int key raised AttributeError; a key holding a newline split the message."""
    torch.save({"model": {3: torch.zeros(2)}}, tmp_path / "int_key.pt")
    code, err = _run_cli(["convert", str(tmp_path / "int_key.pt"), str(tmp_path / "out"), "--config", "test"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "holds no state dict" in err, err
    torch.save({"model": {"odd\nkey": torch.zeros(2)}}, tmp_path / "newline.pt")
    code, err = _run_cli(["convert", str(tmp_path / "newline.pt"), str(tmp_path / "out"), "--config", "test"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "1 unused keys: odd\\nkey" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("manifest, words", [
    (b"\xff not text", "not a readable manifest"),  # was a UnicodeDecodeError
    (b"{not json", "not a readable manifest"),  # load_params read it unguarded: JSONDecodeError
    (b'{"config": true}', "its config True is not a name"),  # was an AttributeError in get_config
    (b'{"config": "test", "inference": [3]}', "its inference [3] not an object"),
])
def test_a_checkpoint_folder_with_a_bad_manifest(tmp_path, capsys, manifest, words):
    (tmp_path / "ck" / "params").mkdir(parents=True)
    (tmp_path / "ck" / "manifest.json").write_bytes(manifest)
    code, err = _run_cli(["convert", str(tmp_path / "ck"), str(tmp_path / "back.pt"), "--to-torch", "--config", "test"],
                         capsys)
    assert code == 2 and len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "back.pt").exists()

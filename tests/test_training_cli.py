"""`medsam2-jax train` as a user meets it: the packaged configs from any folder, and a config that
cannot train stopped with one line and exit status 2 before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsam2_jax import cli
from medsam2_jax.configs.train import get_config
from medsam2_jax.training import loop
from medsam2_jax.training.cli import load_config

CONFIG_FILE = Path(__file__).resolve().parents[1] / "configs" / "train.py"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working folder outside the repository, where training must not start."""
    def no_training(*_, **__):
        raise AssertionError("training started; the config should have been refused first")

    monkeypatch.setattr(loop, "train", no_training)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("spec", ["demo", "medsam2_jax.configs.train:demo", f"{CONFIG_FILE}:demo"])
def test_the_packaged_config_loads_from_any_folder(spec, elsewhere):
    assert load_config(spec).to_dict() == get_config("demo").to_dict()


def _train(argv, capsys):
    code = cli.main(["train", "--workdir", "run", *argv])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("argv, message", [
    (["--config", "demo"],
     "error: no training data: give --config.data.manifest=FILE.jsonl (or set data.manifest in the config)"),
    (["--config", "medsam2_jax.configs.train:demo", "--config.data.manifest=missing.jsonl"],
     "error: --config.data.manifest: no such file missing.jsonl"),
    (["--config", "configs/train.py:demo"],
     "error: --config: no such file configs/train.py; the packaged configs need no path: "
     "--config demo (or medsam2_jax.configs.train:demo)"),
    (["--config", "dmeo"],  # the training variants are listed, not only the model variants
     "error: --config dmeo: unknown training variant 'dmeo'; choose one of: test_tiny, demo_images, demo_tracking"),
    (["--config", "medsam2_jax.configs.trian:demo"], "error: --config: no module medsam2_jax.configs.trian"),
    (["--config", "demo", "--config.dta.manifest=m.jsonl"], "error: --config.dta.manifest: no such field"),
])
def test_a_config_that_cannot_train_is_one_line(argv, message, elsewhere, capsys):
    code, err = _train(argv, capsys)
    assert code == 2
    assert err.startswith(message) and "\n" not in err, err
    assert not (elsewhere / "run").exists()

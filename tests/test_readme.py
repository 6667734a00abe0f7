"""Every ```python block of README.md runs as written, so the README cannot drift from the code.

Each block runs on its own (a fresh namespace: it must import and define everything it uses) in a
scratch folder that holds real files under the README's placeholder names: a real T1 MRI for
"T1.nii.gz", axial slices of it as PNGs, and the shipped demo weights as "ckpt/" (a folder in the
format `medsam2-jax convert` writes). One heavy call is cut down (test_readme_block_runs says which).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _heading(code: str) -> str:
    """The README section a block sits in, for the test id."""
    text = README.read_text()
    before = text[: text.index(code)]
    return re.findall(r"^## (.+)$", before, flags=re.M)[-1].lower().replace(" ", "_")


@pytest.fixture
def placeholders(tmp_path, monkeypatch):
    """tmp_path as the working folder, holding a real file for each placeholder path."""
    import nibabel as nib
    from PIL import Image

    from medsam2_jax import datasets, weights

    colin = nib.load(datasets.colin27())  # a T1 stored RAS, so the README's axial box lies on one slice
    nib.save(colin.slicer[:, :, :48], tmp_path / "T1.nii.gz")  # its lowest 48 slices: propagation in seconds
    volume = np.asarray(colin.dataobj)
    for name, z in (("TEMPLATE.png", 88), ("IMG1.png", 90), ("IMG2.png", 92), ("slice.png", 90)):
        Image.fromarray(np.clip(volume[:, :, z], 0, 255).astype(np.uint8)).save(tmp_path / name)
    shipped = weights.default_checkpoint()
    assert shipped is not None, "no demo weights ship"
    (tmp_path / "ckpt").symlink_to(shipped.path, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return tmp_path


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4, "the block pattern no longer finds the README's examples"


@pytest.mark.parametrize("code", BLOCKS, ids=[f"{i}-{_heading(c)}" for i, c in enumerate(BLOCKS)])
def test_readme_block_runs(code, placeholders, monkeypatch):
    from medsam2_jax.evaluation import sets

    # The one shortened call: a built-in structure set gives its first structure only. The held-out
    # set is 8 structures through Colin27's 181 slices, twice each (box, box + slice range):
    # minutes on two CPU cores, where one structure shows the call works.
    built_in = sets.built_in
    monkeypatch.setattr(sets, "built_in", lambda name, limit=None: built_in(name, limit=1))
    exec(compile(code, f"README.md block {BLOCKS.index(code)}", "exec"), {"__name__": "readme"})

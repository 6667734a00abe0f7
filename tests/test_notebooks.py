"""Notebooks are code: each percent-format script runs end to end on a small config."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("name", ["memory_policies.py"])
def test_notebook_runs(name, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("NOTEBOOK_IMAGE_SIZE", "64")
    monkeypatch.setenv("NOTEBOOK_SLICES", "6")
    scope = runpy.run_path(os.fspath(NOTEBOOKS / name), run_name="__main__")
    held = scope["held"]
    assert set(held) == {"fifo", "self_sorting", "medsam2_released"}
    assert all(h.shape[0] == 6 for h in held.values())
    assert (held["fifo"][-1] >= 0).sum() == 5  # the ring holds the five slices tracked after the prompt


def test_notebook_pair_in_sync():
    jupytext = pytest.importorskip("jupytext")
    for py in NOTEBOOKS.glob("*.py"):
        ipynb = py.with_suffix(".ipynb")
        assert ipynb.exists(), f"{ipynb.name} missing: jupytext --to ipynb {py.name}"
        cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]
        assert cells(jupytext.read(py)) == cells(jupytext.read(ipynb))

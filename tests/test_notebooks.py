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


def test_memory_selection_notebook_runs(monkeypatch):
    """The ablation notebook on the shipped model at its smallest: one held-out structure, two
    orders of four images, two-value grids; each numeric grid compiles once."""
    for key, value in dict(MPLBACKEND="Agg", NOTEBOOK_STRUCTURES="1", NOTEBOOK_NUCLEI="0", NOTEBOOK_ORDERS="2",
                           NOTEBOOK_IMAGES="4", NOTEBOOK_GRID="2", NOTEBOOK_STRUCTURAL="0", NOTEBOOK_LOOP="0").items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("NOTEBOOK_OUT", raising=False)
    scope = runpy.run_path(os.fspath(NOTEBOOKS / "memory_selection.py"), run_name="__main__")
    policies = ("fifo", "self_sorting", "medsam2_released")
    assert {k[1] for k in scope["results_3d"]} == set(policies)
    assert all(0.0 <= scope["report"]["one_prompt"][p]["dice"] <= 1.0 for p in policies)
    assert all(len(v) == 2 for p in policies for k, v in scope["one_prompt"][p].items() if k in scope["streams"])
    assert all(s["compiles"] == 1 and len(s["values"]) == 2 for s in scope["sweeps"].values())
    assert all(h.shape[0] == 4 for h in scope["held"].values())  # the bank after each of the four images


def test_notebook_pair_in_sync():
    jupytext = pytest.importorskip("jupytext")
    for py in NOTEBOOKS.glob("*.py"):
        ipynb = py.with_suffix(".ipynb")
        assert ipynb.exists(), f"{ipynb.name} missing: jupytext --to ipynb {py.name}"
        cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]
        assert cells(jupytext.read(py)) == cells(jupytext.read(ipynb))

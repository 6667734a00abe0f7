"""Notebooks are code: each percent-format script runs end to end on a small config."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
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


def test_memory_selection_notebook_runs(tmp_path):
    """The ablation notebook on the shipped model at its smallest: one held-out structure, two
    orders of four images, two-value grids; each numeric grid compiles once. In a subprocess: its
    dozens of compiled executables would otherwise stay mapped in the test process (about 15,000
    memory maps; with the rest of the suite that neared the kernel's 65,530 and XLA segfaulted)."""
    env = dict(os.environ, MPLBACKEND="Agg", NOTEBOOK_STRUCTURES="1", NOTEBOOK_NUCLEI="0", NOTEBOOK_ORDERS="2",
               NOTEBOOK_IMAGES="4", NOTEBOOK_GRID="2", NOTEBOOK_STRUCTURAL="0", NOTEBOOK_LOOP="0",
               NOTEBOOK_OUT=str(tmp_path))
    done = subprocess.run([sys.executable, os.fspath(NOTEBOOKS / "memory_selection.py")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    policies = ("fifo", "self_sorting", "medsam2_released")
    methods = {r["method"] for r in report["3d"]}
    assert set(policies) | {f"{p} + slice range" for p in policies} | {"copy_mask", "box"} == methods
    assert all(0.0 <= report["one_prompt"][p]["dice"] <= 1.0 for p in policies)
    assert all(len(v) == 2 for p in policies for v in report["one_prompt"][p]["per_structure"].values())
    sweeps = report["sweeps"]["numeric"]
    assert set(sweeps) == {"lambda_conf", "conf_threshold"}
    assert all(s["compiles"] == 1 and len(s["values"]) == 2 for s in sweeps.values())
    banks = report["bank_after_stream"]  # stream position held in each slot after the last of 4 images
    assert set(banks) == set(policies) and all(-1 <= v <= 4 for bank in banks.values() for v in bank)
    assert sorted(v for v in banks["fifo"] if v >= 0) == [1, 2, 3, 4]  # the ring keeps every recent image
    assert {p.name for p in tmp_path.glob("*.png")} == {"dice_by_distance_3d.png", "one_prompt_orders.png",
                                                         "sweeps.png", "bank_contents.png"}


def test_notebook_pair_in_sync():
    jupytext = pytest.importorskip("jupytext")
    for py in NOTEBOOKS.glob("*.py"):
        ipynb = py.with_suffix(".ipynb")
        assert ipynb.exists(), f"{ipynb.name} missing: jupytext --to ipynb {py.name}"
        cells = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]
        assert cells(jupytext.read(py)) == cells(jupytext.read(ipynb))

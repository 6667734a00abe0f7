"""Run notebooks/memory_selection.py at full size and keep its tables and figures.

    python scripts/memory_selection.py [--out docs/memory_selection]

Writes results.json, tables.md and the PNG figures of the notebook (3D per policy on the held-out
AAL structures and stardist's 3D nuclei, One-Prompt 2D with the spread over 10 image orders,
the numeric sweeps compiled once, the structural sweeps, bank contents) plus run.log, the
notebook's printed output. The README quotes tables.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "memory_selection"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(MPLBACKEND="Agg", NOTEBOOK_OUT=str(out))
    log = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, text):
            sys.__stdout__.write(text)
            return log.write(text)

    start = time.perf_counter()
    with contextlib.redirect_stdout(Tee()):
        runpy.run_path(str(ROOT / "notebooks" / "memory_selection.py"), run_name="__main__")
        print(f"whole run: {time.perf_counter() - start:.0f} s")
    (out / "run.log").write_text(log.getvalue())


if __name__ == "__main__":
    main()

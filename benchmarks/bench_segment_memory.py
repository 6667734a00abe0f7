"""Peak host memory of `medsam2-jax segment` at 512 px against the number of slices.

    python benchmarks/bench_segment_memory.py [--slices 64,512] [--size 64]

Writes synthetic volumes (SIZE x SIZE in-plane, a bright ellipsoid through the middle third)
and a SAM 2.1 tiny checkpoint at 512 px (`medsam2` config, random weights: this measures memory,
not masks), then runs `medsam2-jax segment` once per volume with one box on the central slice, in
a child process whose peak resident memory (`ru_maxrss` from `wait4`) and wall time are
reported. Every slice is tracked (forward and backward from the box), so tracking time grows
with the slices; host memory should not, beyond the volume and the per-frame store.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", default="64,512")
    ap.add_argument("--size", type=int, default=64, help="in-plane size of the synthetic volumes")
    args = ap.parse_args()

    import jax
    import nibabel as nib
    import numpy as np

    from medsam2_jax.configs.model import get_config
    from medsam2_jax.convert.checkpoint import save_params
    from medsam2_jax.model.sam2 import init_params

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = get_config("medsam2")
        save_params(init_params(jax.random.PRNGKey(0), config), tmp / "ckpt", config)
        for n in (int(s) for s in args.slices.split(",")):
            s = args.size
            x, y, z = np.meshgrid(np.arange(s), np.arange(s), np.arange(n), indexing="ij")
            inside = ((x - s / 2) / (s / 4)) ** 2 + ((y - s / 2) / (s / 5)) ** 2 + ((z - n / 2) / (n / 6)) ** 2 <= 1
            vol = (100 * inside + np.random.default_rng(0).normal(0, 5, inside.shape)).astype(np.float32)
            path = tmp / f"vol{n}.nii.gz"
            nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
            box = f"{s // 4},{3 * s // 10},{3 * s // 4},{7 * s // 10}@{n // 2}"
            cmd = [sys.executable, "-m", "medsam2_jax.cli", "segment", str(path), "--box", box,
                   "--checkpoint", str(tmp / "ckpt"), "--config", "medsam2", "--out", str(tmp / f"seg{n}.nii.gz"),
                   "--no-montage"]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            err = proc.stderr.read().decode()
            if status != 0:
                raise SystemExit(f"segment failed on {n} slices:\n{err[-2000:]}")
            rows.append((n, usage.ru_maxrss / 2**20, wall))  # ru_maxrss is in KiB on Linux
            print(f"done {n} slices: peak RSS {rows[-1][1]:.2f} GB, {wall:.0f} s", flush=True)

    print(f"\n`medsam2-jax segment`, medsam2 config (512 px), {args.size} x {args.size} slices, one box")
    print("| slices | peak RSS (GB) | wall (s) |")
    print("|---|---|---|")
    for n, gb, wall in rows:
        print(f"| {n} | {gb:.2f} | {wall:.0f} |")
    if len(rows) > 1:
        print(f"peak RSS growth {rows[0][0]} -> {rows[-1][0]} slices: {100 * (rows[-1][1] / rows[0][1] - 1):+.1f}%")


if __name__ == "__main__":
    main()

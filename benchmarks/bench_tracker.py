"""Video propagation speed and memory against the official SAM2VideoPredictor, in the same run.

    python benchmarks/bench_tracker.py [--cases 512:3,512:24,512:96,1024:24] [--repeats 2]
                                       [--device cpu|cuda] [--no-tf32]

For each case (image size : frames) both predictors get the same normalised frames and one click
on frame 0, then propagate through the video. Configs: `medsam2` (SAM 2.1 tiny at 512 px) for 512,
`sam2.1_tiny` for 1024, random weights, the same on both sides. Reported per case:
  - seconds per propagated frame, median over --repeats propagations (cases of 50 frames or more,
    and 1024 px, run once); the official predictor as shipped (`propagate_in_video`, float32,
    hole filling skipped as on any machine without its CUDA extension), ours
    `VideoPredictor.propagate_in_video`, which yields host numpy (every frame synced);
  - our compile time: a 1-frame propagation per image size, before any timing, compiles every
    function a propagation of any length uses (the chunk executable does not depend on length);
  - `init_params` for SAM 2.1 tiny, the first call in the process;
  - the growth of the process's resident memory during the timed propagation, sampled every
    20 ms (the peak over the run minus the RSS before it), and the host memory each predictor
    keeps per tracked frame.
The last line is the speed-up of the 512-px, 24-frame case.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.*

CONFIGS = {512: "medsam2", 1024: "sam2.1_tiny"}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the level at entry, sampled on a thread."""

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def stored_mb_per_frame(st) -> float:
    total = 0
    for per_obj in st["output_dict_per_obj"].values():
        for d in per_obj.values():
            for out in d.values():
                for v in out.values():
                    if hasattr(v, "nbytes"):
                        total += v.nbytes
                    elif hasattr(v, "element_size"):
                        total += v.element_size() * v.nelement()
    frames = sum(len(d) for per_obj in st["output_dict_per_obj"].values() for d in per_obj.values())
    return total / max(frames, 1) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="512:3,512:24,512:96,1024:24", help="SIZE:FRAMES, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="device for the official model (cpu or cuda)")
    ap.add_argument("--no-tf32", action="store_true",
                    help="GPU: full float32 matmuls and convolutions on both sides (torch: TF32 off for "
                         "matmul and cuDNN; jax: default matmul precision 'highest')")
    args = ap.parse_args()
    cases = [tuple(int(x) for x in c.split(":")) for c in args.cases.split(",")]

    import jax
    import numpy as np
    import torch

    from medsam2_jax.configs.model import get_config
    from medsam2_jax.model.sam2 import init_params
    from medsam2_jax.tracker.predictor import VideoPredictor
    from tests.test_tracker_parity import make_frames, official_state, reference

    t0 = time.perf_counter()  # the first call in the process, so its compilation is included
    jax.block_until_ready(init_params(jax.random.PRNGKey(0), get_config("sam2.1_tiny")))
    init_s = time.perf_counter() - t0

    if args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        jax.config.update("jax_default_matmul_precision", "highest")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    models, compile_s, rows = {}, {}, []

    def click(s):
        return dict(frame_idx=0, obj_id=1, points=np.array([[s * 0.4, s * 0.5]], np.float32),
                    labels=np.array([1], np.int32))

    def run_official(official, frames):
        with torch.inference_mode():
            st = official_state(official, frames)
            st["images"] = st["images"].to(args.device)
            st["device"] = torch.device(args.device)
            official.add_new_points_or_box(st, **click(frames.shape[1]))
            sync()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                n = sum(1 for _ in official.propagate_in_video(st))
                sync()
                t = (time.perf_counter() - t0) / n
            return t, mem.growth_mb, st

    def run_ours(ours, frames):
        st = ours.init_state(frames, normalized=True)
        ours.add_new_points_or_box(st, **click(frames.shape[1]))
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            n = sum(1 for _ in ours.propagate_in_video(st))
            t = (time.perf_counter() - t0) / n
        return t, mem.growth_mb, st

    for size, num_frames in cases:
        if size not in models:
            official, params, config = reference(CONFIGS[size])
            official = official.to(args.device)
            ours = VideoPredictor(params, config)
            warm = make_frames(1, size)
            run_official(official, warm)  # torch's lazy set-up
            t0 = time.perf_counter()
            run_ours(ours, warm)
            compile_s[size] = time.perf_counter() - t0
            models[size] = (official, ours)
        official, ours = models[size]
        frames = make_frames(num_frames, size)
        repeats = 1 if (num_frames >= 50 or size >= 1024) else args.repeats
        result = {}
        for name, fn, model in (("official", run_official, official), ("ours", run_ours, ours)):
            runs = [fn(model, frames) for _ in range(repeats)]
            result[name] = (statistics.median(r[0] for r in runs), max(r[1] for r in runs),
                            stored_mb_per_frame(runs[-1][2]))
        rows.append((size, num_frames, repeats, result))
        print(f"done {size} px x {num_frames}: official {result['official'][0]:.3f} s/frame, "
              f"ours {result['ours'][0]:.3f}", flush=True)

    precision = "TF32 off on both sides" if args.no_tf32 else "default matmul precision"
    print(f"\nOfficial on {args.device}, ours on {jax.devices()[0].platform}, float32 ({precision}), "
          f"jax {jax.__version__}, torch {torch.__version__}; one click on frame 0, random weights")
    print("| case | runs | official s/frame | ours s/frame | official / ours | our compile (s) "
          "| RSS growth official / ours (MB) | kept per frame official / ours (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for size, n, repeats, r in rows:
        (to, mo, ko), (tu, mu, ku) = r["official"], r["ours"]
        print(f"| {CONFIGS[size]} {size} px, {n} frames | {repeats} | {to:.3f} | {tu:.3f} | {to / tu:.2f}x "
              f"| {compile_s[size]:.1f} | {mo:.0f} / {mu:.0f} | {ko:.2f} / {ku:.2f} |")
    print(f"init_params (SAM 2.1 tiny, random weights, first call in the process): {init_s:.1f} s")
    main_case = [r for r in rows if r[0] == 512 and r[1] == 24] or rows[:1]
    size, n, _, r = main_case[0]
    print(f"speed-up (official / ours): {r['official'][0] / r['ours'][0]:.2f}x  ({size} px, {n} frames)")


if __name__ == "__main__":
    main()

"""Video propagation speed and memory against the official SAM2VideoPredictor, in the same run.

    python benchmarks/bench_tracker.py [--config medsam2] [--frames 12] [--repeats 3] [--device cpu|cuda]

Both predictors get the same normalised frames and one click on frame 0, then propagate through
the video; the time per propagated frame is the median over --repeats propagations (after one
warm-up propagation that also compiles ours). Official: `propagate_in_video` as shipped
(float32, hole filling skipped as on any machine without its CUDA extension). Ours:
`VideoPredictor.propagate_in_video` (chunked lax.scan, image features batched ahead of the
scan). Also reported: the host memory each keeps per tracked frame.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.*


def _propagate(predictor, state, frames_out: list):
    for item in predictor.propagate_in_video(state):
        frames_out.append(item[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="medsam2")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="device for the official model (cpu or cuda)")
    ap.add_argument("--max-cond-frames", type=int, default=4,
                    help="our cond slots (empty slots cost attention compute: 1 fits a single prompt)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from medsam2_jax.tracker.config import get_tracker_config
    from medsam2_jax.tracker.predictor import VideoPredictor
    from tests.test_tracker_parity import make_frames, official_state, reference

    official, params, config = reference(args.config)
    official = official.to(args.device)
    s = config.image_size
    frames = make_frames(args.frames, s)
    click = dict(frame_idx=0, obj_id=1, points=np.array([[s * 0.4, s * 0.5]], np.float32),
                 labels=np.array([1], np.int32))

    def run_official():
        with torch.inference_mode():
            st = official_state(official, frames)
            st["images"] = st["images"].to(args.device)
            st["device"] = torch.device(args.device)
            official.add_new_points_or_box(st, **click)
            sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
            sync()
            t0 = time.perf_counter()
            out = []
            _propagate(official, st, out)
            sync()
            return (time.perf_counter() - t0) / len(out), st

    ours = VideoPredictor(params, config, get_tracker_config(max_cond_frames=args.max_cond_frames))

    def run_ours():
        st = ours.init_state(frames, normalized=True)
        ours.add_new_points_or_box(st, **click)
        t0 = time.perf_counter()
        out = []
        _propagate(ours, st, out)  # yields host numpy: every frame is synced
        return (time.perf_counter() - t0) / len(out), st

    rows = []
    for name, fn in (("official SAM2VideoPredictor", run_official), ("medsam2_jax VideoPredictor", run_ours)):
        fn()  # warm-up (and compilation)
        times = []
        for _ in range(args.repeats):
            t, st = fn()
            times.append(t)
        rows.append((name, statistics.median(times), st))

    def stored_bytes(st):
        total = 0
        for per_obj in st["output_dict_per_obj"].values():
            for d in per_obj.values():
                for out in d.values():
                    for v in out.values():
                        if hasattr(v, "nbytes"):
                            total += v.nbytes
                        elif hasattr(v, "element_size"):
                            total += v.element_size() * v.nelement()
        return total / max(len(st["output_dict_per_obj"][0]["non_cond_frame_outputs"]) + 1, 1)

    import jax

    print(f"\n{args.config} at {s} px, {args.frames} frames, one click, float32; official on {args.device}, "
          f"ours on {jax.devices()[0].platform} with {args.max_cond_frames} cond slots; median of {args.repeats}")
    print(f"{'predictor':30s} {'s / frame':>10s} {'MB kept / frame':>16s}")
    for name, t, st in rows:
        print(f"{name:30s} {t:10.3f} {stored_bytes(st) / 2**20:16.2f}")
    print(f"speed-up (official / ours): {rows[0][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()

"""The tracker against the official `SAM2VideoPredictor` (random decisive weights, CPU, float32).

Both sides get the same normalised frames at the model resolution (testing-against-sam2.md) and
the same sequence of calls; every mask the official predictor returns (interactions and
propagation) is compared with ours.

Tolerance: the official predictor stores memories in bfloat16 and so do we, so one-ulp rounding
differences of a memory feature can appear and grow a little over frames; we require logits
within LOGIT_ATOL on every pixel (the -1024 "no object" fill included), identical binary masks on
>= 99.9 % of the pixels whose reference logit is farther than 1e-2 from zero, and equal object
presence per frame and object.
"""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import pytest

from medsam2_jax.configs.model import get_config
from medsam2_jax.tracker.predictor import VideoPredictor
from tests.reference import hydra_overrides, make_decisive, mask_agreement

LOGIT_ATOL = 1e-2
MIN_AGREEMENT = 0.999


@functools.lru_cache(maxsize=None)
def reference(name: str, image_size: int | None = None, seed: int = 0):
    """(official video predictor, our params, our config) for a config at any image size."""
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    from medsam2_jax.convert.checkpoint import torch_to_params

    config = get_config(name)
    if image_size is not None:
        config.image_size = image_size
    yaml, overrides = hydra_overrides(config)
    torch.manual_seed(seed)
    predictor = build_sam2_video_predictor(yaml, None, device="cpu", hydra_overrides_extra=overrides)
    make_decisive(predictor, seed)
    predictor.eval()
    state = {k: v.numpy() for k, v in predictor.state_dict().items()}
    params, _ = torch_to_params(state, config)
    return predictor, params, config


def make_frames(num_frames: int, size: int, seed: int = 0) -> np.ndarray:
    """(T, S, S, 3) ImageNet-normalised frames: blocky structure drifting slowly over time."""
    rng = np.random.default_rng(seed)
    cells = max(size // 32, 2)
    base = rng.random((cells, cells, 3))
    frames = []
    for t in range(num_frames):
        img = np.clip(base + 0.08 * rng.standard_normal((cells, cells, 3)) + 0.02 * t, 0, 1)
        img = np.kron(img, np.ones((size // cells, size // cells, 1)))
        frames.append(img)
    frames = np.stack(frames).astype(np.float32)
    mean = np.asarray((0.485, 0.456, 0.406), np.float32)
    std = np.asarray((0.229, 0.224, 0.225), np.float32)
    return (frames - mean) / std


def official_state(predictor, frames):
    import torch
    from PIL import Image

    t, s = frames.shape[:2]
    with tempfile.TemporaryDirectory() as d:
        for i in range(t):
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(os.path.join(d, f"{i:05d}.jpg"))
        st = predictor.init_state(d)
    st["images"] = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2)))
    st["num_frames"], st["video_height"], st["video_width"] = t, s, s
    st["cached_features"] = {}
    return st


def run(predictor, st, ops, ours: bool):
    """Apply the ops; return the list of (label, masks (O, 1, H, W) logits) both APIs produce."""
    import torch

    results = []
    for op in ops:
        kind, args = op[0], op[1]
        if kind == "points":
            _, _, m = predictor.add_new_points_or_box(st, **args)
            results.append((f"click {args['frame_idx']}", m))
        elif kind == "mask":
            _, _, m = predictor.add_new_mask(st, **args)
            results.append((f"mask {args['frame_idx']}", m))
        elif kind == "propagate":
            for t, _, m in predictor.propagate_in_video(st, **args):
                results.append((f"prop {t} rev={args.get('reverse', False)}", m))
    return [(label, np.asarray(m.numpy() if isinstance(m, torch.Tensor) else m, np.float32)) for label, m in results]


def compare(name, image_size, num_frames, ops, seed=0, max_cond_frames_in_attn=-1):
    import torch

    predictor, params, config = reference(name, image_size)
    predictor.max_cond_frames_in_attn = config.max_cond_frames_in_attn = max_cond_frames_in_attn
    frames = make_frames(num_frames, config.image_size, seed)
    with torch.inference_mode():
        ref = run(predictor, official_state(predictor, frames), ops, ours=False)
    ours_pred = VideoPredictor(params, config)
    got = run(ours_pred, ours_pred.init_state(frames, normalized=True), ops, ours=True)
    assert [label for label, _ in ref] == [label for label, _ in got]
    max_diff, worst_agree, present = 0.0, 1.0, 0
    for (label, r), (_, g) in zip(ref, got):
        assert r.shape == g.shape, label
        pr, pg = r.reshape(r.shape[0], -1).max(1) > -1000, g.reshape(g.shape[0], -1).max(1) > -1000
        np.testing.assert_array_equal(pr, pg, err_msg=f"object presence differs at {label}")
        present += int(pr.sum())
        max_diff = max(max_diff, float(np.abs(r - g).max()))
        worst_agree = min(worst_agree, mask_agreement(g, r))
    stats = dict(frames=len(ref), max_abs_logit_diff=max_diff, min_agreement=worst_agree, present=present,
                 positive_px=float(np.mean([(r > 0).mean() for _, r in ref])))
    print(name, image_size, stats)
    # Not degenerate: the object is present on some frames and covers some pixels.
    assert present > 0 and stats["positive_px"] > 0
    assert max_diff <= LOGIT_ATOL, stats
    assert worst_agree >= MIN_AGREEMENT, stats
    return stats


S = 256  # the test config's size; positions below are fractions of it
CLICK = lambda f, obj=1, pts=((0.5, 0.5),), lab=(1,): ("points", dict(frame_idx=f, obj_id=obj, points=[[x * S, y * S] for x, y in pts], labels=list(lab)))
FWD = ("propagate", {})


@pytest.mark.parametrize("name", ["test", "test_sam2"])
def test_one_click_frame0(name):
    compare(name, None, 20, [CLICK(0), FWD])


BOX = lambda f, obj=1, box=(0.25, 0.3, 0.7, 0.75): ("points", dict(frame_idx=f, obj_id=obj, box=[v * S for v in box]))


def MASK(f, obj=1, size=S):
    m = np.zeros((size, size), bool)
    m[size // 4: size // 2, size // 3: (3 * size) // 4] = True
    return ("mask", dict(frame_idx=f, obj_id=obj, mask=m))


def PROP(**kw):
    return ("propagate", kw)


CASES = {
    "box_middle_forward_then_reverse": (20, [BOX(10), PROP(), PROP(reverse=True)]),
    "clicks_on_two_frames": (20, [CLICK(0), CLICK(12, pts=((0.3, 0.4), (0.7, 0.6)), lab=(1, 0)), PROP()]),
    "mask_prompt": (20, [MASK(3), PROP(), PROP(reverse=True)]),
    "two_objects": (20, [CLICK(0, obj=1), BOX(5, obj=2), PROP(start_frame_idx=5), PROP(start_frame_idx=5, reverse=True)]),
    "refinement_after_propagation": (20, [
        CLICK(0), PROP(), CLICK(8, pts=((0.3, 0.3),), lab=(0,)),
        ("points", dict(frame_idx=8, obj_id=1, points=[[0.6 * S, 0.6 * S]], labels=[1], clear_old_points=False)),
        PROP(start_frame_idx=8, max_frame_num_to_track=6),
        PROP(start_frame_idx=15, reverse=True, max_frame_num_to_track=4)]),
    "short_video": (10, [CLICK(2), PROP(), PROP(reverse=True)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", ["test", "test_sam2"])
def test_parity(name, case):
    num_frames, ops = CASES[case]
    compare(name, None, num_frames, ops)


@pytest.mark.parametrize("name", ["test", "test_sam2"])
def test_parity_max_cond_frames_in_attn(name):
    """Five prompted frames, at most 2 attended: each frame attends to the closest prompted frame
    before and after it; the others count as recent frames where they fall among them (frames 6
    and 8 around 7, for instance)."""
    ops = [CLICK(0), CLICK(6, pts=((0.4, 0.4),)), BOX(8), CLICK(13, pts=((0.6, 0.5),)), CLICK(19), PROP(),
           PROP(start_frame_idx=14, reverse=True)]
    compare(name, None, 20, ops, max_cond_frames_in_attn=2)


def _ops_at(size):
    """Two objects (a click, a box on a middle frame), forward then reverse, at any size."""
    return [("points", dict(frame_idx=0, obj_id=1, points=[[0.5 * size, 0.5 * size]], labels=[1])),
            ("points", dict(frame_idx=10, obj_id=2, box=[0.2 * size, 0.3 * size, 0.6 * size, 0.7 * size])),
            PROP(start_frame_idx=10), PROP(start_frame_idx=10, reverse=True)]


def test_parity_512px():
    compare("test", 512, 20, _ops_at(512))


@pytest.mark.slow
def test_parity_1024px_sam21_tiny():
    compare("sam2.1_tiny", None, 20, [("points", dict(frame_idx=0, obj_id=1, points=[[512, 512]], labels=[1])),
                                      PROP()])

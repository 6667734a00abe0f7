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
from medsam2_jax.model.sam2 import NO_OBJ_SCORE
from medsam2_jax.tracker.predictor import VideoPredictor
from tests.reference import hydra_overrides, make_decisive, mask_agreement

LOGIT_ATOL = 1e-2
MIN_AGREEMENT = 0.999


@functools.cache
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
    return imagenet_normalised(np.stack(frames).astype(np.float32))


def imagenet_normalised(frames: np.ndarray) -> np.ndarray:
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
    predictor, params, config = reference(name, image_size)
    predictor.max_cond_frames_in_attn = config.max_cond_frames_in_attn = max_cond_frames_in_attn
    frames = make_frames(num_frames, config.image_size, seed)
    return compare_runs(predictor, params, config, frames, ops)["stats"]


def compare_runs(predictor, params, config, frames, ops):
    """Run `ops` on both sides over the same frames and compare every mask; returns the stats, the
    official results [(label, masks)] and both sides' final object scores {frame: logit} of
    object 1."""
    import torch

    with torch.inference_mode():
        ref_state = official_state(predictor, frames)
        ref = run(predictor, ref_state, ops, ours=False)
    ours_pred = VideoPredictor(params, config)
    our_state = ours_pred.init_state(frames, normalized=True)
    got = run(ours_pred, our_state, ops, ours=True)
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
    print(config.name, config.image_size, stats)
    # Not degenerate: the object is present on some frames and covers some pixels.
    assert present > 0 and stats["positive_px"] > 0
    assert max_diff <= LOGIT_ATOL, stats
    assert worst_agree >= MIN_AGREEMENT, stats
    out = ref_state["output_dict_per_obj"][ref_state["obj_id_to_idx"][1]]
    ref_scores = {t: float(o["object_score_logits"].ravel()[0])
                  for d in (out["non_cond_frame_outputs"], out["cond_frame_outputs"]) for t, o in d.items()}
    return dict(stats=stats, ref=ref, ref_scores=ref_scores, our_scores=ours_pred.object_scores(our_state, 1))


S = 256  # the test config's size; positions below are fractions of it
CLICK = lambda f, obj=1, pts=((0.5, 0.5),), lab=(1,): ("points", dict(frame_idx=f, obj_id=obj,
                                                                      points=[[x * S, y * S] for x, y in pts],
                                                                      labels=list(lab)))
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
    "two_objects": (20, [CLICK(0, obj=1), BOX(5, obj=2), PROP(start_frame_idx=5),
                         PROP(start_frame_idx=5, reverse=True)]),
    "refinement_after_propagation": (20, [
        CLICK(0), PROP(), CLICK(8, pts=((0.3, 0.3),), lab=(0,)),
        ("points", dict(frame_idx=8, obj_id=1, points=[[0.6 * S, 0.6 * S]], labels=[1], clear_old_points=False)),
        PROP(start_frame_idx=8, max_frame_num_to_track=6),
        PROP(start_frame_idx=15, reverse=True, max_frame_num_to_track=4)]),
    "short_video": (10, [CLICK(2), PROP(), PROP(reverse=True)]),
}


# The cases vary the predictor's bookkeeping (prompt kinds and order, objects, directions), which
# SAM 2 and SAM 2.1 share; the two differ in the pointer's temporal encoding and the spatial
# no-object embedding, which the SAM 2 runs of the one-click, max_cond_frames_in_attn and vanishing
# object cases check in the default suite. So the SAM 2 runs of these cases are `-m slow`.
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", ["test", pytest.param("test_sam2", marks=pytest.mark.slow)])
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


# ----------------------------------------------------------------------------------------------
# An object that leaves the field of view and comes back.
#
# With random weights the object score hardly depends on the image (it sits at the head's bias,
# +-0.005 across very different frames), so no frame would ever read "absent". We give both
# sides the same object-score head, made once per model from the official predictor itself: the
# last layer of the head becomes the direction that separates the head's hidden features on the
# frames that show the object from those that do not (tracked from a click on frame 0), scaled so
# that the two means land at +-VANISH_SCORE. Each test then checks on the official scores that
# the sign really flips: negative while the object is out, positive again after it returns.

VANISH_PRESENT = (True, True, False, False, False, True, True, True)  # 8 frames: one compiled chunk
VANISH_ABSENT = [t for t, p in enumerate(VANISH_PRESENT) if not p]
VANISH_SCORE = 2.0


def vanishing_frames(size: int = S) -> np.ndarray:
    """(T, S, S, 3) normalised: a bright square drifting right on a dark background, gone (out of
    the field of view) on the middle frames."""
    frames = np.full((len(VANISH_PRESENT), size, size, 3), 0.2, np.float32)
    side = (80 * size) // 256
    for t, present in enumerate(VANISH_PRESENT):
        if present:
            y0, x0 = (88 * size) // 256, (80 * size) // 256 + 4 * t
            frames[t, y0:y0 + side, x0:x0 + side] = 0.9
    return imagenet_normalised(frames)


@functools.cache
def vanishing_reference(name: str):
    """(official predictor, our params, our config, frames) whose object score follows the object."""
    import copy

    import torch

    from medsam2_jax.convert.checkpoint import torch_to_params

    base, _, config = reference(name)
    predictor, config = copy.deepcopy(base), copy.deepcopy(config)
    predictor.max_cond_frames_in_attn = config.max_cond_frames_in_attn = -1
    frames = vanishing_frames(config.image_size)
    head = predictor.sam_mask_decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head
    hidden = []
    hook = last.register_forward_pre_hook(lambda module, args: hidden.append(args[0].detach().double().clone()))
    try:
        with torch.inference_mode():
            run(predictor, official_state(predictor, frames), [CLICK(0), FWD], ours=False)
    finally:
        hook.remove()
    hidden = torch.cat(hidden)  # one row per frame, in frame order (the click, then frames 1..T-1)
    present = torch.tensor(VANISH_PRESENT)
    present[0] = False  # the clicked frame is not tracked: leave it out of both means
    absent = ~torch.tensor(VANISH_PRESENT)
    on, off = hidden[present].mean(0), hidden[absent].mean(0)
    direction = (on - off) * (2 * VANISH_SCORE / float((on - off) @ (on - off)))
    with torch.no_grad():
        last.weight.copy_(direction[None].float())
        last.bias.fill_(float(-direction @ (on + off) / 2))
    state = {k: v.numpy() for k, v in predictor.state_dict().items()}
    params, _ = torch_to_params(state, config)
    return predictor, params, config, frames


def compare_vanishing(name, ops):
    """`compare_runs` on the vanishing object; also object scores within LOGIT_ATOL on every frame."""
    result = compare_runs(*vanishing_reference(name), ops)
    ref, ours = result["ref_scores"], result["our_scores"]
    print(name, "official object scores", {t: round(v, 3) for t, v in sorted(ref.items())})
    assert ours.keys() == ref.keys()
    assert max(abs(ours[t] - ref[t]) for t in ref) <= LOGIT_ATOL, (ours, ref)
    return result


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("name", ["test", "test_sam2"])
def test_parity_object_leaves_and_returns(name, reverse):
    """Tracked from a click on the first frame (forward) or the last (reverse): absent (every
    logit -1024, the no-object pointer and memory in the bank) on the middle frames, re-acquired
    after them."""
    start = len(VANISH_PRESENT) - 1 if reverse else 0
    result = compare_vanishing(name, [CLICK(start), PROP(reverse=reverse)])
    masks = dict(result["ref"])
    after = range(0, VANISH_ABSENT[0]) if reverse else range(VANISH_ABSENT[-1] + 1, len(VANISH_PRESENT))
    scores = result["ref_scores"]
    assert all(scores[t] < 0 for t in VANISH_ABSENT) and all(scores[t] > 0 for t in after), scores
    assert all((masks[f"prop {t} rev={reverse}"] == NO_OBJ_SCORE).all() for t in VANISH_ABSENT)
    assert all(masks[f"prop {t} rev={reverse}"].max() > 0 for t in after)


@pytest.mark.parametrize("name", ["test", "test_sam2"])
def test_parity_correction_click_on_an_absent_frame(name):
    """A click on a frame where the propagation said "absent" (the object is out of view, the
    official mask is the -1024 fill) corrects a tracked frame: it reads the bank holding the
    no-object memories and pointers. Tracking then goes on from the next frame, so the clicked
    frame's output (memory encoded at preflight with its own object score) is in the bank, and
    the object is re-acquired when it comes back."""
    click_at = VANISH_ABSENT[1]
    ops = [CLICK(0), FWD, CLICK(click_at, pts=((0.45, 0.5),)), PROP(start_frame_idx=click_at + 1)]
    result = compare_vanishing(name, ops)
    first_pass = next(m for label, m in result["ref"] if label == f"prop {click_at} rev=False")
    assert (first_pass == NO_OBJ_SCORE).all()  # absent before the click
    scores = result["ref_scores"]
    assert all(scores[t] > 0 for t in range(VANISH_ABSENT[-1] + 1, len(VANISH_PRESENT))), scores

"""Every memory policy through `VideoPredictor` (issue 14, part 1): a propagation starting from
stored outputs rebuilds the policy's bank from them (`state.state_from_history`), so a
propagation split into two calls equals one call, the bank after a reverse pass is what the
policy's rule gives on that order (the NumPy re-statements of test_memory_policies), and
`reset_state` leaves no bank behind.

Random weights on a small model; the object-score head is biased so every frame shows the object
and, with `conf_threshold` 0, passes the self-sorting gate: the banks fill and evict.
"""

from __future__ import annotations

import functools
import types

import jax
import numpy as np
import pytest

from medsam2_jax.configs.model import get_config
from medsam2_jax.model import sam2
from medsam2_jax.tracker.config import get_tracker_config
from medsam2_jax.tracker.policies.base import recent_slots
from medsam2_jax.tracker.predictor import VideoPredictor
from tests.test_memory_policies import np_released, np_self_sorting

IMAGE_SIZE = 64
FRAMES = 10
POLICIES = {
    "fifo": {},
    "self_sorting": dict(K=3, conf_threshold=0.0, lambda_conf=0.5),
    "medsam2_released": {},
}


@functools.cache
def model():
    config = get_config("test")
    config.image_size = IMAGE_SIZE
    config.memory_attention.num_layers = 1
    params = sam2.init_params(jax.random.PRNGKey(0), config)
    head = params["sam_mask_decoder"]["pred_obj_score_head"]["layers"][2]
    head["bias"] = head["bias"] + 20.0
    return params, config


@functools.cache
def predictor(policy):
    params, config = model()
    return VideoPredictor(params, config, get_tracker_config(memory_policy=policy, **POLICIES[policy]))


def video():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((1, IMAGE_SIZE, IMAGE_SIZE, 3))
    drift = 0.5 * rng.standard_normal((FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3))
    return (base + np.cumsum(drift, axis=0) / 2).astype(np.float32)


def session(pred, prompt_frame):
    st = pred.init_state(video(), normalized=True)
    s = IMAGE_SIZE
    pred.add_new_points_or_box(st, prompt_frame, 1, box=[0.2 * s, 0.25 * s, 0.7 * s, 0.6 * s], normalize_coords=False)
    return st


def masks(pred, st, **kwargs):
    return {t: m for t, _, m in pred.propagate_in_video(st, **kwargs)}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_propagation_split_in_two_equals_one(policy):
    pred = predictor(policy)
    one = masks(pred, session(pred, 0))
    st = session(pred, 0)
    first = masks(pred, st, max_frame_num_to_track=4)
    second = masks(pred, st, start_frame_idx=5)
    assert sorted(first) == list(range(5)) and sorted(second) == list(range(5, FRAMES))
    for t in range(FRAMES):
        got = first[t] if t < 5 else second[t]
        np.testing.assert_allclose(got, one[t], atol=1e-5, err_msg=f"{policy} frame {t}")


def np_fifo(entries, k):
    """The ring (memory-bank.md section 2): frame f in slot f mod K, written in tracking order."""
    slots = [-1] * k
    for e in entries:
        slots[int(e.frame) % k] = int(e.frame)
    return slots


@pytest.mark.parametrize("policy", list(POLICIES))
def test_bank_after_a_reverse_pass_follows_the_rule(policy):
    """Prompt on frame 5, forward to the end, then back to frame 0: the bank behind frame 0 in
    reverse holds what the rule gives on frames 9, 8, 7, 6 (tracked forward), then 4, 3, 2, 1
    (tracked in reverse), each with the outputs stored for it."""
    pred = predictor(policy)
    st = session(pred, 5)
    masks(pred, st)
    masks(pred, st, reverse=True)
    stored = st["output_dict_per_obj"][0]["non_cond_frame_outputs"]
    order = [9, 8, 7, 6, 4, 3, 2, 1]
    entries = [types.SimpleNamespace(frame=t, mem=stored[t]["maskmem_features"],
                                     iou=stored[t]["entry_extras"].get("iou", 0.0),
                                     object_score=stored[t]["entry_extras"].get("object_score", 0.0))
               for t in order]
    tc, config = pred.tracker_config, pred.config
    if policy == "fifo":
        expected = np_fifo(entries, recent_slots(config))
    elif policy == "self_sorting":
        expected = np_self_sorting(entries, tc.K, tc.conf_threshold, tc.lambda_conf)[-1]
    else:
        expected = np_released(entries)[-1]
    state = pred.memory_state(st, 0, reverse=True)
    held = np.asarray(pred.fns.policy.held_frames(jax.tree.map(lambda x: x[0], state)))
    assert held.tolist() == expected
    assert len([f for f in expected if f >= 0]) > 1  # not a trivial bank


def test_reset_state_leaves_no_bank():
    pred = predictor("self_sorting")
    fresh = masks(pred, session(pred, 0))
    st = session(pred, 0)
    masks(pred, st)
    masks(pred, st, reverse=True, start_frame_idx=FRAMES - 1)
    pred.reset_state(st)
    s = IMAGE_SIZE
    pred.add_new_points_or_box(st, 0, 1, box=[0.2 * s, 0.25 * s, 0.7 * s, 0.6 * s], normalize_coords=False)
    again = masks(pred, st)
    for t in range(FRAMES):
        np.testing.assert_allclose(again[t], fresh[t], atol=1e-5, err_msg=f"frame {t}")

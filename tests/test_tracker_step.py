"""The functional tracker: scan == step by step, no recompilation, bounded memory, bank invariants."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from medsam2_jax.configs.model import get_config
from medsam2_jax.model import sam2
from medsam2_jax.tracker import propagate as prop
from medsam2_jax.tracker import step as step_lib
from medsam2_jax.tracker.config import get_tracker_config
from medsam2_jax.tracker.policies.base import recent_slots
from medsam2_jax.tracker.policies.fifo import write_ring
from medsam2_jax.tracker.prompts import make_prompt
from medsam2_jax.tracker.state import init_state, stack_states, write_cond


@functools.cache
def model():
    config = get_config("test")
    params = sam2.init_params(jax.random.PRNGKey(0), config)
    return params, config


def frames(n, size, seed=0):
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def stacked(prompts):
    return jax.tree.map(lambda *xs: np.stack(xs), *prompts)


def two_objects(config, tc, video, frame_idx=0):
    s = config.image_size
    state = stack_states([init_state(config, tc)] * 2)
    prompt = stacked([make_prompt(s, tc.max_points, points=[[s * 0.5, s * 0.5]], labels=[1]),
                      make_prompt(s, tc.max_points, box=[s * 0.2, s * 0.2, s * 0.6, s * 0.7])])
    state, _ = prop.add_prompt(*model(), state, video[frame_idx], prompt, frame_idx, tracker_config=tc)
    return state


def test_scan_equals_steps_one_by_one():
    params, config = model()
    tc = get_tracker_config(chunk_size=4, feature_batch_size=2)
    video = frames(6, config.image_size)
    state0 = two_objects(config, tc, video)
    final, order, outs = prop.propagate(params, config, state0, video, 0, tracker_config=tc)
    assert order == list(range(6))

    one = jax.jit(lambda s_, f_, t: jax.vmap(lambda x: step_lib.step(params, config, x, f_, t, 6))(s_))
    state = state0
    for i, t in enumerate(order):
        f = prop.compute_features(params, config, jnp.asarray(video[t:t + 1]), 1).frame(0)
        state, out = one(state, f, t)
        for k in ("low_res_masks", "object_score_logits", "obj_ptr"):
            np.testing.assert_allclose(outs[k][i], np.asarray(out[k]), atol=1e-4, rtol=1e-4, err_msg=k)
        assert bool(outs["is_cond"][i].all()) == (t == 0)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(state)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-2)
    np.testing.assert_array_equal(np.asarray(final.bank.mem_frame[0]), np.asarray(state.bank.mem_frame[0]))
    # The ring holds exactly the non-conditioning frames 1..5.
    assert sorted(np.asarray(final.bank.mem_frame[0])[np.asarray(final.bank.mem_valid[0])]) == [1, 2, 3, 4, 5]


def test_no_recompilation_across_lengths_prompts_and_directions():
    params, config = model()
    tc = get_tracker_config(chunk_size=4, feature_batch_size=2, max_points=6)  # its own compile cache
    s = config.image_size
    prop.propagate(params, config, two_objects(config, tc, frames(5, s)), frames(5, s), 0, tracker_config=tc)
    before = dict(prop.TRACE_COUNTS)
    video = frames(11, s, seed=1)
    state = stack_states([init_state(config, tc)] * 2)
    mask = np.zeros((s, s, 1), np.float32)
    mask[40:120, 60:150] = 1
    # A mask prompt for object 0 and clicks for object 1 on frame 7, a box for object 0 on frame 2.
    p7 = stacked([make_prompt(s, tc.max_points, mask=mask),
                  make_prompt(s, tc.max_points, points=[[30, 40], [100, 90]], labels=[1, 0])])
    state, _ = prop.add_prompt(params, config, state, video[7], p7, 7, tracker_config=tc)
    p2 = stacked([make_prompt(s, tc.max_points, box=[10, 20, 90, 100])] * 2)
    state, _ = prop.add_prompt(params, config, state, video[2], p2, 2, prompted=[True, False], tracker_config=tc)
    state, order, _ = prop.propagate(params, config, state, video, 7, tracker_config=tc)
    _, rev, _ = prop.propagate(params, config, state, video, 7, reverse=True, tracker_config=tc)
    assert order == list(range(7, 11)) and rev == list(range(7, -1, -1))
    assert dict(prop.TRACE_COUNTS) == before, (before, dict(prop.TRACE_COUNTS))
    assert np.asarray(state.cond_valid).sum(1).tolist() == [2, 1]


def _peak_device_bytes(params, config, tc, n):
    video = frames(n, config.image_size)
    state = two_objects(config, tc, video)
    peak = 0
    for _ in prop.iter_propagate(params, config, state, video, 0, tracker_config=tc):
        peak = max(peak, sum(a.nbytes for a in jax.live_arrays()))
    return peak


def test_device_memory_does_not_grow_with_frames():
    params, config = model()
    tc = get_tracker_config(chunk_size=8, feature_batch_size=4)
    fns = prop.compiled(config, tc)
    p16 = _peak_device_bytes(params, config, tc, 16)
    executables = fns.chunk._cache_size()  # other tests in the session may have added their own
    p128 = _peak_device_bytes(params, config, tc, 128)
    assert p128 <= p16, (p16, p128)
    # The same executable serves both lengths; its buffers are fixed by the chunk, not the video.
    assert fns.chunk._cache_size() == executables


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=20, unique=True), st.booleans())
def test_fifo_ring_holds_the_most_recent_frames(starts, reverse):
    config = get_config("test")
    config.image_size = 32  # shapes only
    tc = get_tracker_config(max_cond_frames=2)
    state = init_state(config, tc)
    state = write_cond(state, 100, jnp.ones(state.cond_mem.shape[1:]), jnp.ones(256),
                       jnp.zeros(state.cond_mask.shape[1:]), jnp.ones(1))
    k = recent_slots(config)
    start = starts[0]
    seq = [start - i if reverse else start + i for i in range(len(starts))]
    seq = [t for t in seq if t >= 0]
    for t in seq:
        state = state.replace(bank=write_ring(state.bank, t, jnp.full(state.bank.mem.shape[1:], t), jnp.full(256, t)))
    held = sorted(np.asarray(state.bank.mem_frame)[np.asarray(state.bank.mem_valid)].tolist())
    assert held == sorted(seq[-k:])
    # Each slot's content is the frame it claims; the pinned frame is untouched.
    for slot in np.flatnonzero(np.asarray(state.bank.mem_valid)):
        assert float(state.bank.mem[slot][0, 0, 0]) == float(state.bank.mem_frame[slot])
    assert np.asarray(state.cond_frame).tolist() == [100, -1] and bool(state.cond_valid[0])
    assert np.asarray(state.bank.mem.shape).tolist() == [k, 2, 2, 64]


def test_padded_points_equal_unpadded():
    params, config = model()
    f = sam2.forward_image(params, jnp.asarray(frames(1, config.image_size)), config)
    pix = sam2.add_no_mem_embed(params, f.vision_features)
    pts, lab = np.array([[[40.0, 50.0], [120.0, 90.0]]], np.float32), np.array([[1, 0]], np.int32)
    a = sam2.forward_sam_heads(params, pix, config, pts, lab, high_res_features=f.high_res_features)
    p = make_prompt(config.image_size, 8, points=pts[0], labels=lab[0])
    b = sam2.forward_sam_heads(params, pix, config, p.points[None], p.labels[None],
                               high_res_features=f.high_res_features, point_mask=p.point_valid[None])
    np.testing.assert_allclose(np.asarray(a["low_res_masks"]), np.asarray(b["low_res_masks"]), atol=1e-5)


def test_padded_frames_and_empty_slots_change_nothing(monkeypatch):
    """A chunk padded with inactive frames (skipped by a `lax.cond`, features included) and empty
    cond slots (key chunks the attention does not compute) give the outputs of a run without
    either: 5 frames in one unpadded chunk with one cond slot, against chunks of 8 with 4 slots."""
    from medsam2_jax.model import attention

    params, config = model()
    s = config.image_size // config.backbone_stride
    monkeypatch.setattr(attention, "KEY_CHUNK", s * s)  # one key chunk per memory slot
    monkeypatch.setattr(prop, "_COMPILED", {})  # trace afresh with that chunk size
    video = frames(5, config.image_size, seed=3)
    runs = {}
    for kc, chunk, fbs in ((1, 5, 1), (4, 8, 1), (2, 3, 1)):
        tc = get_tracker_config(max_cond_frames=kc, chunk_size=chunk, feature_batch_size=fbs)
        _, order, runs[kc, chunk, fbs] = prop.propagate(params, config, two_objects(config, tc, video), video, 0,
                                                         tracker_config=tc)
        assert order == list(range(5))
    ref = runs[1, 5, 1]
    for key, out in runs.items():
        for k in ("low_res_masks", "object_score_logits", "obj_ptr"):
            np.testing.assert_allclose(out[k], ref[k], atol=2e-5, rtol=1e-5, err_msg=f"{k} with {key}")
        # Memories are stored in bfloat16: rounding may flip the last of its 8 bits (2**-7 relative).
        np.testing.assert_allclose(np.asarray(out["maskmem_features"], np.float32),
                                   np.asarray(ref["maskmem_features"], np.float32), atol=1e-6, rtol=2**-7)


def test_closest_cond_frames_is_sams_selection():
    """`closest_cond_frames` keeps exactly the frames the official `select_closest_cond_frames`
    keeps, for random prompted frames (in random prompting order), limits and current frames."""
    from sam2.modeling.sam2_utils import select_closest_cond_frames

    rng = np.random.default_rng(0)
    select = jax.jit(step_lib.closest_cond_frames, static_argnums=3)
    for _ in range(60):
        kc, n = int(rng.integers(1, 7)), int(rng.integers(0, 7))
        n = min(n, kc)
        frames_ = rng.choice(30, size=n, replace=False)
        cond_frame = np.full((kc,), -1, np.int32)
        cond_frame[:n] = frames_
        valid = np.arange(kc) < n
        t, limit = int(rng.integers(0, 30)), int(rng.choice([-1, 2, 3, 4]))
        got = np.asarray(select(jnp.asarray(cond_frame), jnp.asarray(valid), t, limit))
        expected, _ = select_closest_cond_frames(t, {int(f): None for f in frames_}, limit)
        assert set(cond_frame[got].tolist()) == set(expected), (frames_, t, limit)

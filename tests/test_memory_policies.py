"""Memory policies at the bank level (memory-bank.md sections 3, 4, 7): invariants on random
sequences of entries (hypothesis), and each policy against a plain NumPy re-statement of its rule.

Entries are synthetic (random memories drawn around a few centres, so that similarities vary),
written through the policies' jitted `write` exactly as `step.track_frame` offers them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from medsam2_jax.configs.model import get_config
from medsam2_jax.tracker.config import get_tracker_config
from medsam2_jax.tracker.policies import Entry, Query, make_policy
from medsam2_jax.tracker.state import init_state, write_cond

IMAGE_SIZE = 64  # a 4 x 4 memory grid: the policies only see shapes and values


@functools.cache
def config():
    c = get_config("test")
    c.image_size = IMAGE_SIZE
    return c


@functools.cache
def policy_fns(name, **knobs):
    tc = get_tracker_config(memory_policy=name, **knobs)
    policy = make_policy(config(), tc)
    return policy, jax.jit(policy.write), jax.jit(policy.read), tc


def make_entries(n, seed, centres=3):
    """n entries: memories near one of a few centres, random IoU and object logits."""
    c, rng = config(), np.random.default_rng(seed)
    s = c.image_size // c.backbone_stride
    base = rng.standard_normal((centres, s, s, c.mem_dim))
    out = []
    for t in range(n):
        k = rng.integers(centres)
        mem = base[k] + rng.uniform(0.2, 1.5) * rng.standard_normal((s, s, c.mem_dim))
        out.append(Entry(
            mem=jnp.asarray(mem, jnp.bfloat16), ptr=jnp.full((c.hidden_dim,), float(t)), frame=jnp.int32(t),
            iou=jnp.float32(rng.uniform()), object_score=jnp.float32(rng.normal(1.0, 2.0)),
            image_features=jnp.asarray(rng.standard_normal((s, s, c.hidden_dim)), jnp.float32),
            conditioned_features=jnp.asarray(rng.standard_normal((s, s, c.hidden_dim)), jnp.float32)))
    return out


def run(name, entries, active=None, **knobs):
    policy, write, _, tc = policy_fns(name, **knobs)
    state = init_state(config(), tc, policy)
    held = []
    for i, e in enumerate(entries):
        state = write(state, e, True if active is None else bool(active[i]))
        held.append(np.asarray(policy.held_frames(state)))
    return state, held


def np_key(e):
    k = np.asarray(e.mem, np.float64).reshape(-1)
    return k / np.linalg.norm(k)


def np_conf(e):
    return float(e.iou) / (1 + np.exp(-float(e.object_score)))


# ---------------------------------------------------------------------------------------------
# NumPy re-statements, from the spec text


def np_self_sorting(entries, k, conf_threshold, lambda_conf):
    """Slot contents (frame per slot, -1 empty) after each write, memory-bank.md 3.1-3.3."""
    bank, count, held = [], 0, []  # bank: list of dicts, kept in rank order

    def rescore(cands):
        n = len(cands)
        keys = np.stack([c["key"] for c in cands])
        sim = keys @ keys.T
        for i, c in enumerate(cands):
            d = sum(1 - sim[i, j] for j in range(n) if j != i) / (n - 1) if n > 1 else 0.0
            c["s"] = lambda_conf * c["conf"] + (1 - lambda_conf) * d
        return sorted(cands, key=lambda c: (-c["s"], -c["written"]))

    for e in entries:
        conf, obj = np_conf(e), float(e.object_score)
        if conf >= conf_threshold and obj > 0:
            cands = bank + [{"frame": int(e.frame), "key": np_key(e), "conf": conf, "written": count}]
            count += 1
            if len(cands) > k:  # full: the top K of K + 1 survive
                cands = rescore(cands)[:k]
            bank = rescore(cands)
        held.append([c["frame"] for c in bank] + [-1] * (k - len(bank)))
    return held


def np_released(entries, k=16):
    """Slot contents after each write, memory-bank.md section 4 (in-place replacement)."""
    slots = [None] * k
    held = []
    for e in entries:
        new = {"frame": int(e.frame), "key": np_key(e), "iou": float(e.iou)}
        if any(s is None for s in slots):
            slots[slots.index(None)] = new
        else:
            keys = np.stack([s["key"] for s in slots])
            sim_n = keys @ new["key"]
            i = int(np.argmin(sim_n))
            sim_i = keys @ keys[i]
            sim_i[i] = -np.inf
            j = int(np.argmax(sim_i))
            if sim_n[i] < sim_i[j] and new["iou"] > slots[j]["iou"] - 0.1:
                slots[j] = new
        held.append([-1 if s is None else s["frame"] for s in slots])
    return held


def test_self_sorting_equals_numpy_restatement():
    for seed, (k, thr, lam) in enumerate([(4, 0.5, 0.5), (3, 0.0, 0.0), (5, 0.2, 1.0), (4, 0.3, 0.8)]):
        entries = make_entries(14, seed)
        state, held = run("self_sorting", entries, K=k, conf_threshold=thr, lambda_conf=lam)
        expected = np_self_sorting(entries, k, thr, lam)
        for t, (got, want) in enumerate(zip(held, expected)):
            assert got.tolist() == want, (seed, t, got, want)


def test_released_equals_numpy_restatement():
    entries = make_entries(40, seed=7, centres=4)
    _, held = run("medsam2_released", entries)
    expected = np_released(entries)
    replaced = 0
    for t, (got, want) in enumerate(zip(held, expected)):
        assert got.tolist() == want, (t, got, want)
        replaced += t >= 16 and held[t].tolist() != held[t - 1].tolist()
    assert 0 < replaced < 24  # the rule both replaces and refuses on this sequence


def test_fifo_equals_numpy_ring_and_reads_the_previous_frames():
    entries = make_entries(11, seed=3)
    policy, _, read, tc = policy_fns("fifo")
    state, held = run("fifo", entries)
    k = state.bank.mem.shape[0]
    for t, got in enumerate(held):
        want = [-1] * k
        for f in range(max(0, t - k + 1), t + 1):
            want[f % k] = f
        assert got.tolist() == want
    # Frame 11 reads frames 5, 6, ..., 10 (farthest first, as SAM 2 orders them), memories as written.
    s = state.bank.mem.shape[1]
    q = Query(frame=jnp.int32(11), num_frames=jnp.int32(20), reverse=jnp.bool_(False),
              image_features=jnp.zeros((s, s, 256)))
    r = read(state, q)
    assert np.asarray(r.valid).all()
    for i, f in enumerate(range(5, 11)):
        np.testing.assert_array_equal(np.asarray(r.mem[i], np.float32), np.asarray(entries[f].mem, np.float32))
    assert np.asarray(r.tpos).tolist() == list(range(5, -1, -1))


# ---------------------------------------------------------------------------------------------
# Invariants on random sequences


# No subnormal scores: XLA on the CPU flushes them to zero, so "score > 0" differs from NumPy's.
entry_params = st.lists(st.tuples(st.floats(0, 1, width=32, allow_subnormal=False),
                                  st.floats(-4, 4, width=32, allow_subnormal=False),
                                  st.integers(0, 2)), min_size=1, max_size=12)


def entries_from(params_list, seed=0):
    base = make_entries(len(params_list), seed)
    return [e.replace(iou=jnp.float32(iou), object_score=jnp.float32(obj)) for e, (iou, obj, _) in
            zip(base, params_list)]


@settings(max_examples=12, deadline=None)
@given(params_list=entry_params, k=st.sampled_from([2, 3]), thr=st.sampled_from([0.0, 0.5]),
       lam=st.sampled_from([0.0, 0.5]))
def test_self_sorting_invariants(params_list, k, thr, lam):
    entries = entries_from(params_list)
    policy, write, _, tc = policy_fns("self_sorting", K=k, conf_threshold=thr, lambda_conf=lam)
    state = init_state(config(), tc, policy)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    state = write_cond(state, 99, jnp.ones(state.cond_mem.shape[1:]), jnp.ones(256),
                       jnp.zeros(state.cond_mask.shape[1:]), jnp.ones(1))
    cond = jax.tree.map(np.asarray, (state.cond_mem, state.cond_frame, state.cond_valid))
    accepted = 0
    for e in entries:
        state = write(state, e, True)
        accepted += np_conf(e) >= thr and float(e.object_score) > 0
        b = jax.tree.map(np.asarray, state.bank)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
        assert b.valid.sum() == min(accepted, k)
        assert b.valid.tolist() == sorted(b.valid.tolist(), reverse=True)  # valid slots first
        held = b.frame[b.valid]
        assert len(set(held.tolist())) == len(held)
        assert np.all(np.diff(b.score[b.valid]) <= 0)  # sorted by score
        for f in held:
            assert np_conf(entries[f]) >= thr and float(entries[f].object_score) > 0
    for got, want in zip(jax.tree.map(np.asarray, (state.cond_mem, state.cond_frame, state.cond_valid)), cond):
        np.testing.assert_array_equal(got, want)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 24), policy_name=st.sampled_from(["fifo", "medsam2_released"]))
def test_fifo_and_released_invariants(n, policy_name):
    entries = make_entries(n, seed=n)
    policy, write, _, tc = policy_fns(policy_name)
    state = init_state(config(), tc, policy)
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    for t, e in enumerate(entries):
        state = write(state, e, True)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
        held = np.asarray(policy.held_frames(state))
        held = held[held >= 0]
        assert len(set(held.tolist())) == len(held)
        k = held.size if policy_name == "medsam2_released" else state.bank.mem.shape[0]
        assert len(held) == min(t + 1, 16 if policy_name == "medsam2_released" else k)
        if policy_name == "fifo":  # exactly the most recent frames
            assert sorted(held.tolist()) == list(range(max(0, t + 1 - k), t + 1))


def test_inactive_writes_change_nothing():
    entries = make_entries(6, seed=1)
    for name in ("fifo", "self_sorting", "medsam2_released"):
        state, held = run(name, entries, active=[True, True, False, True, False, False], conf_threshold=0.0)
        frames = {f for f in held[-1].tolist() if f >= 0}
        assert not frames & {2, 4, 5}, name


# ---------------------------------------------------------------------------------------------
# Reads


def test_self_sorting_large_bank_reads_every_past_frame():
    """conf_threshold 0, lambda_conf 0, K >= frames: `read="all"` returns every past entry."""
    entries = [e.replace(object_score=jnp.abs(e.object_score) + 0.1) for e in make_entries(9, seed=5)]
    policy, write, read, tc = policy_fns("self_sorting", K=12, conf_threshold=0.0, lambda_conf=0.0)
    state = init_state(config(), tc, policy)
    s = state.bank.mem.shape[1]
    for t, e in enumerate(entries):
        r = read(state, Query(frame=jnp.int32(t), num_frames=jnp.int32(9), reverse=jnp.bool_(False),
                              image_features=e.image_features))
        got = {}
        for i in np.flatnonzero(np.asarray(r.valid)):
            got[int(np.asarray(r.ptr[i])[0])] = np.asarray(r.mem[i], np.float32)
        assert sorted(got) == list(range(t))
        for f, m in got.items():
            np.testing.assert_array_equal(m, np.asarray(entries[f].mem, np.float32))
        state = write(state, e, True)
    assert s == IMAGE_SIZE // 16


def test_topk_and_sample_reads():
    entries = [e.replace(object_score=jnp.float32(3.0), iou=jnp.float32(0.9)) for e in make_entries(8, seed=2)]
    q_feat = entries[3].image_features
    q = Query(frame=jnp.int32(8), num_frames=jnp.int32(9), reverse=jnp.bool_(False), image_features=q_feat)
    policy, _, read, _ = policy_fns("self_sorting", K=8, R=3, read="topk", conf_threshold=0.0)
    state, _ = run("self_sorting", entries, K=8, R=3, read="topk", conf_threshold=0.0)
    r = read(state, q)
    frames = np.asarray(state.bank.frame)[np.asarray(jax.lax.top_k(
        state.bank.query_key @ (q_feat.reshape(-1) / jnp.linalg.norm(q_feat)), 3)[1])]
    assert np.asarray(r.ptr[:, 0]).astype(int).tolist() == frames.tolist()
    assert int(np.asarray(r.ptr[0, 0])) == 3  # the frame whose own features are the query
    # Sampling: R draws with replacement, reproducible per frame, different across frames.
    policy, _, read, _ = policy_fns("self_sorting", K=8, R=5, read="sample", conf_threshold=0.0, temperature=0.01)
    state, _ = run("self_sorting", entries, K=8, R=5, read="sample", conf_threshold=0.0, temperature=0.01)
    r1, r2 = read(state, q), read(state, q)
    np.testing.assert_array_equal(np.asarray(r1.ptr), np.asarray(r2.ptr))
    assert np.asarray(r1.ptr[:, 0]).astype(int).tolist() == [3] * 5  # a cold softmax: the same slot, drawn 5 times
    assert np.asarray(r1.valid).all()

"""Policies inside the tracker step: gradients through a short clip for every policy, and a
researcher's own policy (written here, registered by name) plugged in without touching the tracker.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from medsam2_jax.configs.model import get_config
from medsam2_jax.model import sam2
from medsam2_jax.tracker import step as step_lib
from medsam2_jax.tracker.config import get_tracker_config
from medsam2_jax.tracker.policies import MemoryPolicy, MemoryRead, make_policy, register_policy
from medsam2_jax.tracker.prompts import make_prompt
from medsam2_jax.tracker.state import init_state

IMAGE_SIZE = 64
FRAMES = 3


@functools.cache
def model():
    config = get_config("test")
    config.image_size = IMAGE_SIZE
    config.memory_attention.num_layers = 1  # gradient flow, not parity: one layer compiles faster
    params = sam2.init_params(jax.random.PRNGKey(0), config)
    frames = np.random.default_rng(0).standard_normal((FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    feats = jax.jit(lambda x: sam2.forward_image(params, x, config))(frames)
    return params, config, feats


def frame(feats, i):
    return feats.frame(i)


def clip_loss(params, config, policy, feats):
    s = config.image_size
    prompt = make_prompt(s, 8, box=[s * 0.2, s * 0.25, s * 0.7, s * 0.6])
    state = init_state(config, policy.tracker_config, policy)
    state, _ = step_lib.step(params, config, state, frame(feats, 0), 0, FRAMES, prompt=prompt, policy=policy)

    def body(st, i):
        st, out = step_lib.track_frame(params, config, st, frame(feats, i), i, FRAMES, False, True, policy)
        # The object score too: with random weights the mask may be the constant "no object" fill.
        return st, jnp.mean(jax.nn.sigmoid(out["low_res_masks"])) + out["object_score_logits"].sum()

    _, losses = jax.lax.scan(body, state, jnp.arange(1, FRAMES))
    return losses.sum()


def test_grad_through_a_clip_for_every_policy():
    params, config, feats = model()
    for name in ("fifo", "self_sorting", "medsam2_released"):
        # conf_threshold 0 so that tracked frames enter the self-sorting bank too.
        tc = get_tracker_config(memory_policy=name, K=2, conf_threshold=0.0, read="sample", R=2)
        policy = make_policy(config, tc)
        trainable = {k: params[k] for k in ("memory_encoder", "memory_attention")}
        loss = lambda tr, policy=policy: clip_loss({**params, **tr}, config, policy, feats)
        value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
        assert np.isfinite(float(value)), name
        for part, g in grads.items():
            leaves = [np.asarray(x) for x in jax.tree.leaves(g)]
            assert all(np.isfinite(x).all() for x in leaves), (name, part)
            assert sum(float(np.abs(x).sum()) for x in leaves) > 0, (name, part)


def test_self_sorting_reads_with_either_query_source():
    """`read` topk / sample compare the bank's query keys with the frame's: raw image features
    (`query_source="image"`) or the frame projected by the memory encoder with an empty mask
    (`"memory"`, whose query must be one (s, s, Cm) map like the stored memories)."""
    params, config, feats = model()
    # Random weights leave the object score near zero: raise it so tracked frames enter the bank
    # and frame 2 reads an entry chosen by the query.
    params = jax.tree_util.tree_map(lambda x: x, params)
    head = params["sam_mask_decoder"]["pred_obj_score_head"]["layers"][2]
    head["bias"] = head["bias"] + 20.0
    trainable = {k: params[k] for k in ("memory_encoder", "memory_attention")}
    for source in ("image", "memory"):
        for read in ("topk", "sample"):
            tc = get_tracker_config(memory_policy="self_sorting", K=2, R=1, conf_threshold=0.0, read=read,
                                    query_source=source)
            policy = make_policy(config, tc)
            loss = lambda tr, policy=policy: clip_loss({**params, **tr}, config, policy, feats)
            value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
            assert np.isfinite(float(value)), (source, read)
            leaves = [np.asarray(x) for x in jax.tree.leaves(grads)]
            assert all(np.isfinite(x).all() for x in leaves), (source, read)


@struct.dataclass
class AllPastBank:
    mem: jax.Array
    ptr: jax.Array
    valid: jax.Array
    count: jax.Array


class AllPast(MemoryPolicy):
    """Attend to every past frame (a bank as long as the clip), all with one temporal row."""

    name = "all_past"

    def init(self):
        c = self.config
        s = c.image_size // c.backbone_stride
        n = self.tracker_config.K
        return AllPastBank(jnp.zeros((n, s, s, c.mem_dim), jnp.bfloat16), jnp.zeros((n, c.hidden_dim)),
                           jnp.zeros((n,), bool), jnp.zeros((), jnp.int32))

    def write(self, state, entry, active):
        b = state.bank
        put = lambda a, v: jnp.where(active, a.at[b.count].set(v.astype(a.dtype)), a)
        return state.replace(bank=AllPastBank(put(b.mem, entry.mem), put(b.ptr, entry.ptr),
                                              put(b.valid, jnp.asarray(True)), b.count + jnp.int32(active)))

    def read(self, state, query):
        b, m = state.bank, self.config.num_maskmem
        n = b.valid.shape[0]
        return MemoryRead(mem=b.mem, tpos=jnp.full((n,), m - 2, jnp.int32), valid=b.valid, ptr=b.ptr,
                          ptr_offset=jnp.full((n,), 1.0 / (self.config.max_obj_ptrs_in_encoder - 1)),
                          ptr_valid=b.valid)

    def held_frames(self, state):
        return jnp.where(state.bank.valid, jnp.arange(state.bank.valid.shape[0]), -1)


def test_own_policy_by_name_and_self_sorting_reads_like_every_past_frame():
    """self_sorting with conf_threshold 0, lambda_conf 0, tpos none and a bank that never fills
    tracks exactly like attending to every past frame (the policy written above): masks agree."""
    params, config, feats = model()
    # Random weights leave the object score near zero; raise it so every frame passes the gate
    # (object present) and the comparison below always covers all frames.
    params = jax.tree_util.tree_map(lambda x: x, params)
    head = params["sam_mask_decoder"]["pred_obj_score_head"]["layers"][2]
    head["bias"] = head["bias"] + 20.0
    register_policy("all_past", AllPast)
    outs = {}
    for name in ("all_past", "self_sorting"):
        tc = get_tracker_config(memory_policy=name, K=FRAMES, conf_threshold=0.0, lambda_conf=0.0, tpos="none")
        policy = make_policy(config, tc)
        s = config.image_size
        prompt = make_prompt(s, 8, box=[s * 0.2, s * 0.25, s * 0.7, s * 0.6])
        state = init_state(config, tc, policy)
        state, _ = step_lib.step(params, config, state, frame(feats, 0), 0, FRAMES, prompt=prompt, policy=policy)
        one = jax.jit(lambda st, f, i, policy=policy: step_lib.track_frame(params, config, st, f, i, FRAMES, False,
                                                                           True, policy))
        logits = []
        for i in range(1, FRAMES):
            state, out = one(state, frame(feats, i), i)
            logits.append(np.asarray(out["low_res_masks"]))
            held = np.asarray(out["bank_frames"])
            assert float(np.ravel(out["object_score_logits"])[0]) > 0
        outs[name] = np.stack(logits)
    np.testing.assert_allclose(outs["self_sorting"], outs["all_past"], atol=1e-3)
    assert held.size == FRAMES

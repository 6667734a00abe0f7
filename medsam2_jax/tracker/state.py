"""The fixed-size memory bank of one tracked object (memory-bank.md section 1).

Every field has its final shape from the start; empty slots have `frame = -1`, `valid = False`
and are masked out of memory attention, where they contribute exactly zero. Several objects
stack along a leading object axis.

The tracker pins prompted (conditioning) frames itself; everything else is the memory policy's
`bank` (`policies`: fifo's ring of recent frames, self_sorting's sorted bank, ...). A state is
made empty by `init_state`, or from stored outputs by `state_from_history`: the prompted frames
pinned, then the policy's `write` replayed over the tracked frames in the order they were tracked.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from medsam2_jax.tracker.policies import make_policy
from medsam2_jax.tracker.policies.base import MEMORY_DTYPE


@struct.dataclass
class TrackerState:
    # Conditioning (prompted) frames: pinned, never evicted.
    cond_mem: jax.Array  # (Kc, s, s, Cm) bfloat16 spatial memory
    cond_ptr: jax.Array  # (Kc, C) object pointer
    cond_mask: jax.Array  # (Kc, 4s, 4s, 1) low-res mask logits, replayed when tracking reaches the frame
    cond_score: jax.Array  # (Kc, 1) object-score logit
    cond_frame: jax.Array  # (Kc,) int32, -1 where empty
    cond_valid: jax.Array  # (Kc,) bool
    # The memory policy's entries (`policies.make_policy(...).init()`).
    bank: Any


@struct.dataclass
class CondFrames:
    """Prompted frames' stored outputs, stacked along a leading axis: what `state_from_history`
    pins (`valid` False: an unused row)."""

    frame: jax.Array  # (n,) int32
    mem: jax.Array  # (n, s, s, Cm)
    ptr: jax.Array  # (n, C)
    mask: jax.Array  # (n, 4s, 4s, 1) low-res mask logits
    score: jax.Array  # (n, 1) object-score logit
    valid: jax.Array  # (n,) bool


def _policy_for(config, tracker_config, policy):
    if policy is not None:
        return policy
    return make_policy(config, tracker_config)


def init_state(config, tracker_config, policy=None, cond_slots: int | None = None) -> TrackerState:
    """An empty bank for one object; `stack_states([state] * n)` for n.

    `policy` (`policies.make_policy(config, tracker_config)`, made here when left out) fills
    `bank`; `cond_slots` defaults to `tracker_config.max_cond_frames`.
    """
    policy = _policy_for(config, tracker_config, policy)
    s = config.image_size // config.backbone_stride
    kc = tracker_config.max_cond_frames if cond_slots is None else cond_slots
    return TrackerState(
        cond_mem=jnp.zeros((kc, s, s, config.mem_dim), MEMORY_DTYPE),
        cond_ptr=jnp.zeros((kc, config.hidden_dim), jnp.float32),
        cond_mask=jnp.zeros((kc, 4 * s, 4 * s, 1), jnp.float32),
        cond_score=jnp.zeros((kc, 1), jnp.float32),
        cond_frame=-jnp.ones((kc,), jnp.int32),
        cond_valid=jnp.zeros((kc,), bool),
        bank=policy.init(),
    )


def state_from_history(config, tracker_config, policy, cond: CondFrames, history=None, history_valid=None,
                       cond_slots: int | None = None) -> TrackerState:
    """The state after pinning the prompted frames `cond` (in row order) and offering the tracked
    frames `history` to `policy`, in the order they were tracked.

    `history`: a stacked `policies.Entry` (H, ...) with the fields the policy's `write` reads
    (`mem`, `ptr`, `frame` and the policy's `entry_extras`; the others may be None), or None;
    `history_valid` (H,) bool marks real rows (padding writes nothing). Pure and traceable: the
    predictor calls it to start a propagation from its store, the training step and `one_prompt`
    to pin their prompted frames.
    """
    policy = _policy_for(config, tracker_config, policy)
    state = init_state(config, tracker_config, policy, cond_slots)
    for i in range(cond.frame.shape[0]):
        state = write_cond(state, cond.frame[i], cond.mem[i], cond.ptr[i], cond.mask[i], cond.score[i],
                           write=cond.valid[i])
    if history is not None:
        valid = jnp.ones(history.frame.shape, bool) if history_valid is None else history_valid
        state, _ = jax.lax.scan(lambda st, x: (policy.write(st, *x), None), state, (history, valid))
    return state


def stack_states(states) -> TrackerState:
    """Per-object states -> one state with a leading object axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _put(arr, slot, value, write):
    return jnp.where(write, arr.at[slot].set(value.astype(arr.dtype)), arr)


def write_cond(state: TrackerState, frame_idx, mem, ptr, mask, score, write=True) -> TrackerState:
    """Pin a prompted frame: the slot already holding this frame, else the first empty slot.

    A full bank keeps its entries and drops the write; callers that can prompt more frames than
    it has slots must size it on the host (`VideoPredictor` sizes its banks to the prompts).
    """
    same = state.cond_valid & (state.cond_frame == frame_idx)
    free = ~state.cond_valid
    slot = jnp.where(same.any(), jnp.argmax(same), jnp.argmax(free))
    write = jnp.asarray(write) & (same.any() | free.any())
    return state.replace(
        cond_mem=_put(state.cond_mem, slot, mem, write),
        cond_ptr=_put(state.cond_ptr, slot, ptr, write),
        cond_mask=_put(state.cond_mask, slot, mask, write),
        cond_score=_put(state.cond_score, slot, score, write),
        cond_frame=_put(state.cond_frame, slot, jnp.asarray(frame_idx, jnp.int32), write),
        cond_valid=_put(state.cond_valid, slot, jnp.asarray(True), write),
    )

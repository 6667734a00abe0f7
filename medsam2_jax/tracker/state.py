"""The fixed-size memory bank of one tracked object (memory-bank.md section 1).

Every field has its final shape from the start; empty slots have `frame = -1`, `valid = False`
and are masked out of memory attention, where they contribute exactly zero. Several objects
stack along a leading object axis.

Slots of the recent ring are addressed by frame index (`frame mod size`), not by write order, and
a read checks the stored frame index: this is what SAM 2 does with its dict of per-frame outputs
(it looks up frames t-1 .. t-6 in tracking direction), restricted to the frames such a lookup
can reach. A sequential scan writes every frame, so the ring always holds the frames it needs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

MEMORY_DTYPE = jnp.bfloat16  # the official video predictor stores maskmem_features in bfloat16


@struct.dataclass
class TrackerState:
    # Conditioning (prompted) frames: pinned, never evicted.
    cond_mem: jax.Array  # (Kc, s, s, Cm) bfloat16 spatial memory
    cond_ptr: jax.Array  # (Kc, C) object pointer
    cond_mask: jax.Array  # (Kc, 4s, 4s, 1) low-res mask logits, replayed when tracking reaches the frame
    cond_score: jax.Array  # (Kc, 1) object-score logit
    cond_frame: jax.Array  # (Kc,) int32, -1 where empty
    cond_valid: jax.Array  # (Kc,) bool
    # Recent non-conditioning frames: spatial memories and, over a longer window, pointers.
    mem: jax.Array  # (K, s, s, Cm) bfloat16
    mem_frame: jax.Array  # (K,) int32
    mem_valid: jax.Array  # (K,) bool
    ptr: jax.Array  # (P, C)
    ptr_frame: jax.Array  # (P,) int32
    ptr_valid: jax.Array  # (P,) bool
    # The memory policy's own entries (`policies`): None for fifo, which uses the ring above.
    bank: Any = None


def recent_slots(config) -> int:
    """K: the farthest frame a read can reach, (num_maskmem - 2) * stride + 1 (6 for SAM 2)."""
    return (config.num_maskmem - 2) * config.memory_temporal_stride_for_eval + 1


def pointer_slots(config) -> int:
    """P: non-conditioning pointers read from frames t-1 .. t-(max_obj_ptrs_in_encoder-1)."""
    return max(config.max_obj_ptrs_in_encoder - 1, 1)


def init_state(config, tracker_config, policy=None) -> TrackerState:
    """An empty bank for one object; `jax.tree.map(lambda x: jnp.stack([x] * n), ...)` for n.

    `policy` (`policies.make_policy(config, tracker_config)`) fills `bank`; it may be left out for
    fifo, which keeps its ring in the state's own fields. (Policies build on this module, not the
    other way round.)
    """
    if policy is None and tracker_config.memory_policy != "fifo":
        raise ValueError(f"init_state for memory policy {tracker_config.memory_policy!r} needs the policy: "
                         "pass policies.make_policy(config, tracker_config), or use medsam2_jax.tracker.init_state")
    s = config.image_size // config.backbone_stride
    kc, k, p = tracker_config.max_cond_frames, recent_slots(config), pointer_slots(config)
    c, cm = config.hidden_dim, config.mem_dim
    empty = lambda n: (-jnp.ones((n,), jnp.int32), jnp.zeros((n,), bool))
    cond_frame, cond_valid = empty(kc)
    mem_frame, mem_valid = empty(k)
    ptr_frame, ptr_valid = empty(p)
    return TrackerState(
        cond_mem=jnp.zeros((kc, s, s, cm), MEMORY_DTYPE),
        cond_ptr=jnp.zeros((kc, c), jnp.float32),
        cond_mask=jnp.zeros((kc, 4 * s, 4 * s, 1), jnp.float32),
        cond_score=jnp.zeros((kc, 1), jnp.float32),
        cond_frame=cond_frame,
        cond_valid=cond_valid,
        mem=jnp.zeros((k, s, s, cm), MEMORY_DTYPE),
        mem_frame=mem_frame,
        mem_valid=mem_valid,
        ptr=jnp.zeros((p, c), jnp.float32),
        ptr_frame=ptr_frame,
        ptr_valid=ptr_valid,
        bank=None if policy is None else policy.init(),
    )


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


def write_recent(state: TrackerState, frame_idx, mem, ptr, write=True) -> TrackerState:
    """A tracked (non-conditioning) frame enters the recent ring at slot `frame mod K`."""
    k, p = state.mem.shape[0], state.ptr.shape[0]
    frame_idx = jnp.asarray(frame_idx, jnp.int32)
    ms, ps = jnp.mod(frame_idx, k), jnp.mod(frame_idx, p)
    return state.replace(
        mem=_put(state.mem, ms, mem, write),
        mem_frame=_put(state.mem_frame, ms, frame_idx, write),
        mem_valid=_put(state.mem_valid, ms, jnp.asarray(True), write),
        ptr=_put(state.ptr, ps, ptr, write),
        ptr_frame=_put(state.ptr_frame, ps, frame_idx, write),
        ptr_valid=_put(state.ptr_valid, ps, jnp.asarray(True), write),
    )


def lookup_recent(frames, valid, target):
    """(slot, found) of `target` frame indices in a ring addressed by `frame mod size`."""
    slot = jnp.mod(target, frames.shape[0])
    return slot, valid[slot] & (frames[slot] == target)

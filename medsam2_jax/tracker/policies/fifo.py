"""Policy `fifo`: SAM 2 / SAM 2.1 exactly (memory-bank.md section 2).

Every tracked frame enters the recent ring (`state.write_recent`); a frame reads the
`num_maskmem - 1` frames before it in tracking direction (stride `memory_temporal_stride_for_eval`),
each tagged by its distance, and the pointers of up to `max_obj_ptrs_in_encoder - 1` frames
before it. The ring lives in the tracker state's own fields (`mem`, `ptr`, ...), not in `bank`.
"""

from __future__ import annotations

import jax.numpy as jnp

from medsam2_jax.tracker.policies.base import MemoryPolicy, MemoryRead
from medsam2_jax.tracker.state import lookup_recent, write_recent


def recent_targets(config, frame_idx, reverse):
    """Frame indices read for t_pos = 1 .. num_maskmem-1 (`_prepare_memory_conditioned_features`)."""
    m, r = config.num_maskmem, config.memory_temporal_stride_for_eval
    t = jnp.asarray(frame_idx, jnp.int32)
    t_rel = m - jnp.arange(1, m, dtype=jnp.int32)
    fwd = jnp.where(t_rel == 1, t - 1, ((t - 2) // r) * r - (t_rel - 2) * r)
    rev = jnp.where(t_rel == 1, t + 1, -((-(t + 2)) // r) * r + (t_rel - 2) * r)
    return jnp.where(reverse, rev, fwd)


def pointer_normaliser(config, num_frames):
    """SAM 2.1's temporal normaliser of pointer offsets: it follows the video length below 16."""
    max_ptrs = jnp.minimum(jnp.asarray(num_frames, jnp.int32), config.max_obj_ptrs_in_encoder)
    return max_ptrs, jnp.maximum(max_ptrs - 1, 1).astype(jnp.float32)


def pointer_targets(config, frame_idx, reverse, num_frames, count: int):
    """(frame indices, eligible) of the `count` frames t-1, t-2, ... (tracking direction) whose
    pointers a frame may read: within `max_ptrs - 1` of it and inside the video."""
    max_ptrs, _ = pointer_normaliser(config, num_frames)
    diff = jnp.arange(1, count + 1, dtype=jnp.int32)
    target = jnp.asarray(frame_idx, jnp.int32) - jnp.where(reverse, -1, 1) * diff
    return target, (diff <= max_ptrs - 1) & (target >= 0) & (target < num_frames)


class Fifo(MemoryPolicy):
    name = "fifo"

    def init(self):
        return None

    def write(self, state, entry, active):
        return write_recent(state, entry.frame, entry.mem, entry.ptr, write=active)

    def read(self, state, query):
        config, m = self.config, self.config.num_maskmem
        t = query.frame
        slot, found = lookup_recent(state.mem_frame, state.mem_valid, recent_targets(config, t, query.reverse))
        t_pos = jnp.arange(1, m, dtype=jnp.int32)
        # Then pointers of frames t-1, t-2, ... (tracking direction) up to max_ptrs - 1 back.
        count = state.ptr.shape[0]
        target, eligible = pointer_targets(config, t, query.reverse, query.num_frames, count)
        pslot, pfound = lookup_recent(state.ptr_frame, state.ptr_valid, target)
        diff = jnp.arange(1, count + 1, dtype=jnp.float32)
        _, t_diff_max = pointer_normaliser(config, query.num_frames)
        return MemoryRead(mem=state.mem[slot], tpos=m - t_pos - 1, valid=found, ptr=state.ptr[pslot],
                          ptr_offset=diff / t_diff_max, ptr_valid=pfound & eligible)

    def held_frames(self, state):
        return jnp.where(state.mem_valid, state.mem_frame, -1)

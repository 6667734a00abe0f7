"""Policy `fifo`: SAM 2 / SAM 2.1 exactly (memory-bank.md section 2).

Every tracked frame enters the recent ring; a frame reads the `num_maskmem - 1` frames before it
in tracking direction (stride `memory_temporal_stride_for_eval`), each tagged by its distance, and
the pointers of up to `max_obj_ptrs_in_encoder - 1` frames before it.

Slots of the ring are addressed by frame index (`frame mod size`), not by write order, and a read
checks the stored frame index: this is what SAM 2 does with its dict of per-frame outputs (it
looks up frames t-1 .. t-6 in tracking direction), restricted to the frames such a lookup can
reach. A sequential scan writes every frame, so the ring always holds the frames it needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from medsam2_jax.tracker.policies.base import MEMORY_DTYPE, MemoryPolicy, MemoryRead, pointer_slots, put, recent_slots


@struct.dataclass
class FifoBank:
    """The recent ring: spatial memories of K frames and, over a longer window, P pointers."""

    mem: jax.Array  # (K, s, s, Cm) bfloat16
    mem_frame: jax.Array  # (K,) int32, -1 where empty
    mem_valid: jax.Array  # (K,) bool
    ptr: jax.Array  # (P, C)
    ptr_frame: jax.Array  # (P,) int32
    ptr_valid: jax.Array  # (P,) bool


def write_ring(bank: FifoBank, frame_idx, mem, ptr, write=True) -> FifoBank:
    """A tracked (non-conditioning) frame enters the ring at slot `frame mod K` (`mod P`)."""
    k, p = bank.mem.shape[0], bank.ptr.shape[0]
    frame_idx = jnp.asarray(frame_idx, jnp.int32)
    ms, ps = jnp.mod(frame_idx, k), jnp.mod(frame_idx, p)
    return bank.replace(
        mem=put(bank.mem, ms, mem, write),
        mem_frame=put(bank.mem_frame, ms, frame_idx, write),
        mem_valid=put(bank.mem_valid, ms, jnp.asarray(True), write),
        ptr=put(bank.ptr, ps, ptr, write),
        ptr_frame=put(bank.ptr_frame, ps, frame_idx, write),
        ptr_valid=put(bank.ptr_valid, ps, jnp.asarray(True), write),
    )


def lookup_recent(frames, valid, target):
    """(slot, found) of `target` frame indices in a ring addressed by `frame mod size`."""
    slot = jnp.mod(target, frames.shape[0])
    return slot, valid[slot] & (frames[slot] == target)


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
    entry_extras = ()  # the ring keeps memories and pointers only

    @property
    def history_reach(self):
        """The farthest frame a read reaches, memories or pointers: older frames are never read."""
        return max(recent_slots(self.config), pointer_slots(self.config))

    def init(self):
        c = self.config
        s = c.image_size // c.backbone_stride
        k, p = recent_slots(c), pointer_slots(c)
        return FifoBank(
            mem=jnp.zeros((k, s, s, c.mem_dim), MEMORY_DTYPE), mem_frame=-jnp.ones((k,), jnp.int32),
            mem_valid=jnp.zeros((k,), bool), ptr=jnp.zeros((p, c.hidden_dim), jnp.float32),
            ptr_frame=-jnp.ones((p,), jnp.int32), ptr_valid=jnp.zeros((p,), bool))

    def write(self, state, entry, active):
        return state.replace(bank=write_ring(state.bank, entry.frame, entry.mem, entry.ptr, write=active))

    def read(self, state, query):
        config, m, b = self.config, self.config.num_maskmem, state.bank
        t = query.frame
        slot, found = lookup_recent(b.mem_frame, b.mem_valid, recent_targets(config, t, query.reverse))
        t_pos = jnp.arange(1, m, dtype=jnp.int32)
        # Then pointers of frames t-1, t-2, ... (tracking direction) up to max_ptrs - 1 back.
        count = b.ptr.shape[0]
        target, eligible = pointer_targets(config, t, query.reverse, query.num_frames, count)
        pslot, pfound = lookup_recent(b.ptr_frame, b.ptr_valid, target)
        diff = jnp.arange(1, count + 1, dtype=jnp.float32)
        _, t_diff_max = pointer_normaliser(config, query.num_frames)
        return MemoryRead(mem=b.mem[slot], tpos=m - t_pos - 1, valid=found, ptr=b.ptr[pslot],
                          ptr_offset=diff / t_diff_max, ptr_valid=pfound & eligible)

    def held_frames(self, state):
        return jnp.where(state.bank.mem_valid, state.bank.mem_frame, -1)

"""The memory-policy interface: what a frame writes into the bank and what the next frame reads.

A policy owns the non-conditioning memories of one object. Conditioning (prompted) frames are
pinned by the tracker itself (`state.write_cond`) and always read; a policy decides the rest:

    class MyPolicy(MemoryPolicy):
        def init(self):                         # -> the policy's bank pytree (fixed shapes)
        def write(self, state, entry, active):  # -> state with state.bank updated
        def read(self, state, query):           # -> MemoryRead (fixed size R)

All three are pure and traced under `jit`, `vmap` (objects, streams) and `lax.scan` (frames), so
shapes must not depend on data: use masks, `jnp.where`, `lax.top_k`. A policy keeps its entries in
`state.bank` (what `init` returned); `write` gets the whole `TrackerState` so that a rule may look
at the pinned entries too (`fifo`'s bank is SAM 2's ring of recent frames).

A propagation that starts from stored outputs (`VideoPredictor`) rebuilds the bank by replaying
`write` over the tracked frames behind its start frame, farthest first
(`state.state_from_history`): the store keeps each frame's memory, pointer and `entry_extras`.

A researcher's rule plugs in without touching the tracker: `register_policy("mine", MyPolicy)`
and `get_tracker_config(memory_policy="mine")`, or pass `policy=MyPolicy(config, tracker_config)`
to `step.step` directly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

MEMORY_DTYPE = jnp.bfloat16  # the official video predictor stores maskmem_features in bfloat16


def recent_slots(config) -> int:
    """K of fifo: the farthest frame a read can reach, (num_maskmem - 2) * stride + 1 (6 for SAM 2)."""
    return (config.num_maskmem - 2) * config.memory_temporal_stride_for_eval + 1


def pointer_slots(config) -> int:
    """P of fifo: non-conditioning pointers read from frames t-1 .. t-(max_obj_ptrs_in_encoder-1)."""
    return max(config.max_obj_ptrs_in_encoder - 1, 1)


@struct.dataclass
class Entry:
    """A tracked (non-conditioning) frame's candidate memory."""

    mem: jax.Array  # (s, s, Cm) spatial memory, bfloat16 (carries gradients in training)
    ptr: jax.Array  # (C,) object pointer
    frame: jax.Array  # () int32 frame index
    iou: jax.Array  # () predicted IoU of the chosen mask (already through the decoder's sigmoid)
    object_score: jax.Array  # () object-presence logit
    image_features: jax.Array  # (s, s, C) raw stride-16 image features of the frame
    conditioned_features: jax.Array  # (s, s, C) the same after memory attention


@struct.dataclass
class Query:
    """What a policy may look at when choosing the memories of the frame being tracked."""

    frame: jax.Array  # () int32
    num_frames: jax.Array  # () int32
    reverse: jax.Array  # () bool
    image_features: jax.Array  # (s, s, C) raw stride-16 features of this frame
    # (s, s, Cm) the same projected by the memory encoder with an empty mask, for policies with
    # `needs_memory_query = True`; None otherwise.
    memory_features: Any = None


@struct.dataclass
class MemoryRead:
    """R spatial memories and P object pointers, each with a validity flag (invalid = masked out).

    `tpos` picks the row of `maskmem_tpos_enc` added to a memory's positional encoding; -1 adds
    none. `ptr_offset` is the temporal offset of a pointer, already normalised (SAM 2.1 divides the
    signed frame distance by the pointer window).
    """

    mem: jax.Array  # (R, s, s, Cm)
    tpos: jax.Array  # (R,) int32
    valid: jax.Array  # (R,) bool
    ptr: jax.Array  # (P, C)
    ptr_offset: jax.Array  # (P,) float32
    ptr_valid: jax.Array  # (P,) bool


class MemoryPolicy:
    """Base class; subclasses set the class attributes and implement init / write / read."""

    name = "base"
    # Add maskmem_tpos_enc rows at all (the pinned entries get row num_maskmem - 1, as in SAM 2).
    temporal_encoding = True
    # Feed object pointers (of the pinned entries and the read slots) to memory attention.
    object_pointers = True
    # `read` looks at `Query.memory_features` (the frame projected by the memory encoder with an
    # empty mask, one more memory-encoder run per frame); otherwise that field is None.
    needs_memory_query = False
    # The `Entry` fields `write` reads besides `mem`, `ptr` and `frame` (which every tracked
    # frame's outputs hold anyway): `VideoPredictor` keeps them per tracked frame so that a later
    # propagation can replay the writes. A policy that needs fewer names fewer (host memory).
    entry_extras: tuple = ("iou", "object_score", "image_features", "conditioned_features")
    # How many frames behind the start frame a rebuilt bank replays (None: all the store holds).
    history_reach = None
    # Numeric tracker-config knobs the bank carries as () float32 arrays instead of compiling them
    # in: `with_knobs` sets them on a state, so one compiled function sweeps a grid of values (vmap).
    traced_knobs: tuple = ()

    def __init__(self, config, tracker_config):
        self.config, self.tracker_config = config, tracker_config

    def init(self):
        raise NotImplementedError

    def write(self, state, entry: Entry, active):
        raise NotImplementedError

    def read(self, state, query: Query) -> MemoryRead:
        raise NotImplementedError

    def held_frames(self, state) -> jax.Array:
        """Frame index per slot of the bank (-1 where empty), in the bank's own slot order."""
        raise NotImplementedError


def check_knobs(policy, names) -> None:
    """Refuse knob names the policy compiles in (not in `policy.traced_knobs`)."""
    unknown = sorted(set(names) - set(policy.traced_knobs))
    if unknown:
        raise ValueError(f"policy {policy.name!r} cannot sweep {unknown}: its traced knobs are "
                         f"{list(policy.traced_knobs)}; set the others in the tracker config")


def with_knobs(policy, state, **knobs):
    """`state` with its bank's traced knobs set (scalars, or arrays under `vmap`)."""
    check_knobs(policy, knobs)
    bank = state.bank.replace(**{k: jnp.asarray(v, jnp.float32) for k, v in knobs.items()})
    return state.replace(bank=bank)


def put(arr, slot, value, write):
    """`arr[slot] = value` where `write`, as a masked write (no data-dependent shapes)."""
    return jnp.where(write, arr.at[slot].set(value.astype(arr.dtype)), arr)


def normalised(x, axis=-1):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def pooled_key(features, key_pool):
    """L2-normalised descriptor of an (s, s, C) map: flattened, or the mean over a g x g grid."""
    f = features.astype(jnp.float32)
    if key_pool:
        s, c = f.shape[0], f.shape[-1]
        f = f.reshape(key_pool, s // key_pool, key_pool, s // key_pool, c).mean(axis=(1, 3))
    return normalised(f.reshape(-1))

"""Policy `medsam2_released`: the bank of the released MedSAM-2 2D code (memory-bank.md section 4).

`func_2d/function.py` keeps a list of up to K = 16 entries:
- not full: append every entry (no gate);
- full, new entry n: i = the entry least similar to n, j = i's nearest other entry; n replaces j
  if sim(n, i) < sim(i, j) and iou_n > iou_j - 0.1 (similarity: cosine of flattened memories);
- read: R draws with replacement from softmax(sim) (temperature 1) of the current frame's raw
  image features against the stored post-attention image embeddings; no temporal encoding and
  no object pointers.
A replaced entry's slot is reused in place (the list's remove + append only reorders, and
reads do not depend on order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from medsam2_jax.tracker.policies.base import MEMORY_DTYPE, MemoryPolicy, MemoryRead, normalised, put

RELEASED_K = 16
IOU_MARGIN = 0.1


@struct.dataclass
class ReleasedBank:
    mem: jax.Array  # (K, s, s, Cm) bfloat16
    frame: jax.Array  # (K,) int32
    valid: jax.Array  # (K,) bool
    conf: jax.Array  # (K,) predicted IoU
    mem_key: jax.Array  # (K, s*s*Cm) normalised memory (replacement rule)
    read_key: jax.Array  # (K, s*s*C) normalised post-attention embedding (reads)
    rng: jax.Array


class Medsam2Released(MemoryPolicy):
    name = "medsam2_released"
    temporal_encoding = False
    object_pointers = False
    entry_extras = ("iou", "conditioned_features")

    def init(self):
        c = self.config
        s, k = c.image_size // c.backbone_stride, RELEASED_K
        return ReleasedBank(
            mem=jnp.zeros((k, s, s, c.mem_dim), MEMORY_DTYPE), frame=-jnp.ones((k,), jnp.int32),
            valid=jnp.zeros((k,), bool), conf=jnp.zeros((k,), jnp.float32),
            mem_key=jnp.zeros((k, s * s * c.mem_dim), jnp.float32),
            read_key=jnp.zeros((k, s * s * c.hidden_dim), jnp.float32),
            rng=jax.random.PRNGKey(self.tracker_config.seed))

    def write(self, state, entry, active):
        b = state.bank
        sg = jax.lax.stop_gradient
        n_key = sg(normalised(entry.mem.reshape(-1)))
        full = b.valid.all()
        sim_n = b.mem_key @ n_key
        i = jnp.argmin(sim_n)
        sim_i = jnp.where(jnp.arange(b.valid.shape[0]) == i, -jnp.inf, b.mem_key @ b.mem_key[i])
        j = jnp.argmax(sim_i)
        replace = (sim_n[i] < sim_i[j]) & (sg(entry.iou) > b.conf[j] - IOU_MARGIN)
        slot = jnp.where(full, j, jnp.argmax(~b.valid))
        write = jnp.asarray(active) & (~full | replace)
        bank = b.replace(
            mem=put(b.mem, slot, entry.mem, write), frame=put(b.frame, slot, entry.frame, write),
            valid=put(b.valid, slot, jnp.asarray(True), write), conf=put(b.conf, slot, sg(entry.iou), write),
            mem_key=put(b.mem_key, slot, n_key, write),
            read_key=put(b.read_key, slot, sg(normalised(entry.conditioned_features.reshape(-1))), write))
        return state.replace(bank=bank)

    def read(self, state, query):
        b, r = state.bank, self.tracker_config.R
        w = jax.lax.stop_gradient(b.read_key @ normalised(query.image_features.reshape(-1)))
        logits = jnp.where(b.valid.any(), jnp.where(b.valid, w, -jnp.inf), 0.0)
        idx = jax.random.categorical(jax.random.fold_in(b.rng, query.frame), logits, shape=(r,))
        c = self.config.hidden_dim
        return MemoryRead(mem=b.mem[idx], tpos=-jnp.ones((r,), jnp.int32), valid=b.valid[idx],
                          ptr=jnp.zeros((0, c), jnp.float32), ptr_offset=jnp.zeros((0,), jnp.float32),
                          ptr_valid=jnp.zeros((0,), bool))

    def held_frames(self, state):
        return jnp.where(state.bank.valid, state.bank.frame, -1)

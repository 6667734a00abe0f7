"""Policy `self_sorting`: MedSAM-2's self-sorting memory bank (memory-bank.md section 3).

Order-free: the bank keeps the K most informative entries, whatever their frame index.
- Gate: a tracked frame is a candidate if `conf = iou * sigmoid(object_logit) >= conf_threshold`
  and `object_logit > 0`; a frame that fails is still segmented, it just does not enter the bank.
- Score: `s_i = lambda_conf * conf_i + (1 - lambda_conf) * D_i`, with `D_i` the mean cosine
  dissimilarity of entry i to the other valid entries (0 for a lone entry).
- Write: a free slot takes an accepted candidate; a full bank keeps the top K of the K + 1
  candidates. After every accepted write the survivors are re-scored among themselves and stored
  in descending `s`, ties to the newer entry: slot order is rank order.
- Read: `all` slots, the `R` most similar to the query (`topk`), or `R` draws with replacement
  from `softmax(sim / temperature)` (`sample`). Temporal encoding by rank, or one shared row.
Selection never carries gradients (keys and confidences are `stop_gradient`ed); the stored
memories and pointers do. The numeric knobs (`conf_threshold`, `lambda_conf`, `temperature`) live
in the bank as arrays, not in the compiled code: `policies.with_knobs` sets them, so one compiled
function can `vmap` over a grid of their values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from medsam2_jax.tracker.policies.base import MEMORY_DTYPE, MemoryPolicy, MemoryRead, pooled_key


@struct.dataclass
class SortedBank:
    mem: jax.Array  # (K, s, s, Cm) bfloat16
    ptr: jax.Array  # (K, C)
    frame: jax.Array  # (K,) int32, -1 where empty
    valid: jax.Array  # (K,) bool
    score: jax.Array  # (K,) f32, descending over valid slots
    conf: jax.Array  # (K,) f32
    key: jax.Array  # (K, D) L2-normalised memory descriptor (similarity between entries)
    query_key: jax.Array  # (K, Dq) descriptor compared with a query frame (see `query_source`)
    written: jax.Array  # (K,) int32 write order (ties go to the newer entry)
    count: jax.Array  # () int32 accepted writes so far
    rng: jax.Array  # PRNG key of `read = "sample"`, folded with the frame index
    conf_threshold: jax.Array  # () f32, the knobs of the tracker config (`traced_knobs`)
    lambda_conf: jax.Array  # () f32
    temperature: jax.Array  # () f32


def confidence(iou, object_score):
    return iou * jax.nn.sigmoid(object_score)


def scores(key, conf, valid, lambda_conf):
    """s_i over the valid entries (-inf elsewhere), from L2-normalised keys."""
    sim = key @ key.T
    others = valid[None, :] & ~jnp.eye(valid.shape[0], dtype=bool)
    n = valid.sum()
    dissimilarity = jnp.where(others, 1.0 - sim, 0.0).sum(axis=1) / jnp.maximum(n - 1, 1)
    s = lambda_conf * conf + (1.0 - lambda_conf) * dissimilarity
    return jnp.where(valid, s, -jnp.inf)


def rank_order(s, written):
    """Slot order: descending score, ties to the newer write, empty slots (-inf) last."""
    return jnp.lexsort((-written, -s))


class SelfSorting(MemoryPolicy):
    name = "self_sorting"
    traced_knobs = ("conf_threshold", "lambda_conf", "temperature")

    @property
    def needs_memory_query(self):
        return self.tracker_config.query_source == "memory"

    @property
    def entry_extras(self):
        return ("iou", "object_score") + (() if self.tracker_config.query_source == "memory" else ("image_features",))

    def init(self):
        c, tc = self.config, self.tracker_config
        s = c.image_size // c.backbone_stride
        k, g = tc.K, tc.key_pool
        grid = g * g if g else s * s
        dq = grid * (c.mem_dim if tc.query_source == "memory" else c.hidden_dim)
        return SortedBank(
            mem=jnp.zeros((k, s, s, c.mem_dim), MEMORY_DTYPE), ptr=jnp.zeros((k, c.hidden_dim), jnp.float32),
            frame=-jnp.ones((k,), jnp.int32), valid=jnp.zeros((k,), bool),
            score=jnp.full((k,), -jnp.inf, jnp.float32), conf=jnp.zeros((k,), jnp.float32),
            key=jnp.zeros((k, grid * c.mem_dim), jnp.float32), query_key=jnp.zeros((k, dq), jnp.float32),
            written=jnp.zeros((k,), jnp.int32), count=jnp.zeros((), jnp.int32),
            rng=jax.random.PRNGKey(tc.seed),
            **{name: jnp.asarray(tc[name], jnp.float32) for name in self.traced_knobs})

    def write(self, state, entry, active):
        tc, b = self.tracker_config, state.bank
        k = b.valid.shape[0]
        conf = jax.lax.stop_gradient(confidence(entry.iou, entry.object_score))
        accept = jnp.asarray(active) & (conf >= b.conf_threshold) & (entry.object_score > 0)
        key = jax.lax.stop_gradient(pooled_key(entry.mem, tc.key_pool))
        qsrc = entry.mem if tc.query_source == "memory" else entry.image_features
        qkey = jax.lax.stop_gradient(pooled_key(qsrc, tc.key_pool))
        cat = lambda a, x: jnp.concatenate([a, jnp.asarray(x, a.dtype)[None]])
        cand = b.replace(  # the K + 1 candidates; count, rng and the knobs carry over
            mem=cat(b.mem, entry.mem), ptr=cat(b.ptr, entry.ptr), frame=cat(b.frame, entry.frame),
            valid=cat(b.valid, accept), score=cat(b.score, 0.0), conf=cat(b.conf, conf), key=cat(b.key, key),
            query_key=cat(b.query_key, qkey), written=cat(b.written, b.count))
        # Full bank: the top K of K + 1 survive. Not full: every valid candidate is in the first K.
        s = scores(cand.key, cand.conf, cand.valid, b.lambda_conf)
        keep = rank_order(s, cand.written)[:k]
        take = lambda x: x[keep]
        survivors = cand.replace(**{f: take(getattr(cand, f)) for f in
                                    ("mem", "ptr", "frame", "valid", "conf", "key", "query_key", "written")})
        # Re-score over the entries held and store them sorted.
        s = scores(survivors.key, survivors.conf, survivors.valid, b.lambda_conf)
        order = rank_order(s, survivors.written)
        new = survivors.replace(score=s, count=b.count + 1)
        new = new.replace(**{f: getattr(new, f)[order] for f in
                             ("mem", "ptr", "frame", "valid", "score", "conf", "key", "query_key", "written")})
        bank = jax.tree.map(lambda n, o: jnp.where(accept, n, o), new, b)
        return state.replace(bank=bank)

    def read(self, state, query):
        c, tc, b = self.config, self.tracker_config, state.bank
        k, m = b.valid.shape[0], c.num_maskmem
        if tc.read == "all":
            idx = jnp.arange(k)
        else:
            qsrc = query.memory_features if tc.query_source == "memory" else query.image_features
            sim = jax.lax.stop_gradient(b.query_key @ pooled_key(qsrc, tc.key_pool))
            if tc.read == "topk":
                idx = jax.lax.top_k(jnp.where(b.valid, sim, -jnp.inf), tc.R)[1]
            else:
                logits = jnp.where(b.valid, sim / b.temperature, -jnp.inf)
                logits = jnp.where(b.valid.any(), logits, 0.0)  # an empty bank: draws are all masked
                rng = jax.random.fold_in(b.rng, query.frame)
                idx = jax.random.categorical(rng, logits, shape=(tc.R,))
        # Slot index == rank in the sorted state; rank r reads like the frame r + 1 steps back.
        t_pos = jnp.minimum(idx + 1, m - 1) if tc.tpos == "rank" else jnp.ones_like(idx)
        ptr_window = max(c.max_obj_ptrs_in_encoder - 1, 1)
        return MemoryRead(mem=b.mem[idx], tpos=(m - 1 - t_pos).astype(jnp.int32), valid=b.valid[idx],
                          ptr=b.ptr[idx], ptr_offset=t_pos.astype(jnp.float32) / ptr_window,
                          ptr_valid=b.valid[idx])

    def held_frames(self, state):
        return jnp.where(state.bank.valid, state.bank.frame, -1)

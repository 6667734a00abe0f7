"""Whole-video tracking: image features in batches, then a `lax.scan` of `step` over frames.

A video is cut into fixed-size chunks of `chunk_size` frames in processing order (forward or
reverse from a start frame); one compiled function scans the chunk, the state carried from chunk
to chunk. The chunk's features are encoded ahead of the scan (`chunk_features`): frame by frame
with the `features` executable clicks use too (`feature_batch_size` 1, the CPU default: the image
encoder is compiled once, not again inside the scan), or in batches (GPU/TPU). The last chunk is
padded with inactive frames, which a `lax.cond` skips: they cost neither features nor tracking; so
does a frame every object has pinned as a conditioning frame (its stored outputs are replayed, as
the official predictor does).
So every video length, start frame, direction and prompt layout runs on the same executable,
device memory holds one chunk and one fixed-size state whatever the length, and per-frame outputs
stream to the host chunk by chunk.

Prompts go in before the scan with `add_prompt` (as the official predictor encodes every prompted
frame before `propagate_in_video`): all conditioning frames are in the bank from the first tracked
frame on, and the scan replays their stored outputs when it reaches them.

`TRACE_COUNTS` counts how often each compiled function was traced (tests check recompilation).
"""

from __future__ import annotations

import collections
import copy

import jax
import jax.numpy as jnp
import numpy as np

from medsam2_jax.model import layers, sam2
from medsam2_jax.tracker import config as tracker_config_lib
from medsam2_jax.tracker import state as state_lib
from medsam2_jax.tracker import step as step_lib
from medsam2_jax.tracker.policies import make_policy
from medsam2_jax.tracker.state import TrackerState

TRACE_COUNTS: collections.Counter = collections.Counter()


def compute_features(params, config, frames, batch_size: int, active=None):
    """(N, S, S, 3) normalised frames -> their `sam2.FrameFeatures`, encoded `batch_size` at a time.

    With `active` (N,) bool, a batch without an active frame is not encoded (its features are 0).
    """
    n = frames.shape[0]
    batches = frames.reshape(n // batch_size, batch_size, *frames.shape[1:])
    encode = lambda x: sam2.forward_image(params, x, config)
    if active is None:
        feats = jax.lax.map(encode, batches)
    else:
        used = jnp.asarray(active).reshape(n // batch_size, batch_size).any(1)
        zeros = lambda x: _zeros_like(jax.eval_shape(encode, x))
        feats = jax.lax.map(lambda xu: jax.lax.cond(xu[1], encode, zeros, xu[0]), (batches, used))
    merged = feats.map_frames(lambda x: x.reshape(n, *x.shape[2:]))
    return merged.replace(vision_pos_enc=feats.vision_pos_enc[0])


def _zeros_like(shapes):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)


def chunk_features(fns, params, state, frames, idx):
    """(features, computed) of a chunk's frames `idx`, padded to `chunk_size` frames, for
    `Compiled.chunk`.

    `computed` (chunk_size,) bool: the frames the chunk tracks, not padding and not a frame every
    object has pinned as a conditioning frame (the scan replays its stored outputs; prompts never
    change during a chunk, so this holds for the whole chunk). Features are encoded there only,
    elsewhere 0, and those frames are not even loaded. With `feature_batch_size` 1 (the CPU) frame
    by frame with `features`, the executable clicks use too, so the image encoder is compiled once
    and the chunk holds only the tracker; else in batches on the device.
    """
    size, s = fns.tracker_config.chunk_size, fns.config.image_size
    valid, cond = np.asarray(state.cond_valid), np.asarray(state.cond_frame)
    computed = np.zeros(size, bool)
    computed[:len(idx)] = [not (valid & (cond == t)).any(-1).all() for t in idx]
    todo = np.flatnonzero(computed)
    loaded = np.asarray(frames[np.asarray(idx)[todo]], np.float32) if len(todo) else np.zeros((0, s, s, 3), np.float32)
    if fns.tracker_config.feature_batch_size > 1:
        padded = np.zeros((size, s, s, 3), np.float32)
        padded[todo] = loaded
        return fns.batch_features(params, padded, computed), computed
    frame_spec = jax.ShapeDtypeStruct((s, s, 3), jnp.float32)
    shapes = fns.get("feature_shapes", lambda: jax.eval_shape(fns.features, params, frame_spec))
    stacked = shapes.map_frames(lambda x: np.zeros((size,) + x.shape, x.dtype))
    pos = np.zeros(shapes.vision_pos_enc.shape, shapes.vision_pos_enc.dtype)  # the same for every frame
    per_frame = lambda f: (f.vision_features,) + tuple(f.high_res_features or ())
    # Two frames in flight: frame i is dispatched, then frame i-1 copied to the host while it runs.
    # All calls queued at once would each hold the encoder's working memory (600 MB more for 8
    # frames at 512 px); one at a time leaves the device idle during each copy.
    def copy_out(j, one):
        for out, leaf in zip(per_frame(stacked), per_frame(one)):
            out[j] = np.asarray(leaf)
        return one.vision_pos_enc

    previous = None
    for i, frame in zip(todo, loaded):
        current = (i, fns.features(params, frame))
        if previous is not None:
            pos = copy_out(*previous)
        previous = current
    if previous is not None:
        pos = copy_out(*previous)
    return stacked.replace(vision_pos_enc=np.asarray(pos)), computed


class Compiled:
    """The jitted functions for one (model config, tracker config) pair."""

    def __init__(self, config, tracker_config):
        tracker_config_lib.check(tracker_config, config)
        self.config, self.tracker_config = config, tracker_config
        c, tc = config, tracker_config
        self.policy = policy = make_policy(config, tracker_config)

        def chunk(params, state, features, frame_idx, computed, num_frames, reverse):
            """`features` and `computed` from `chunk_features`: a frame not computed is replayed."""
            TRACE_COUNTS["chunk"] += 1

            def track(f, t):
                one = lambda s_: step_lib.track_frame(params, c, s_, f, t, num_frames, reverse, True, policy)
                return jax.vmap(one)

            def replay(t):
                return jax.vmap(lambda s_: step_lib.replay_frame(c, s_, t, policy))

            def body(st, x):
                i, t, a = x
                run = lambda st_: track(features.frame(i), t)(st_)
                # Per frame, outside the object vmap, so the branch is real: a skipped frame costs nothing.
                return jax.lax.cond(a, run, replay(t), st)

            return jax.lax.scan(body, state, (jnp.arange(frame_idx.shape[0]), frame_idx, computed))

        def batch_features(params, frames, computed):
            TRACE_COUNTS["batch_features"] += 1
            return compute_features(params, c, frames, tc.feature_batch_size, computed)

        def add_prompt(params, state, frame, prompt, frame_idx, prompted):
            TRACE_COUNTS["add_prompt"] += 1
            f = compute_features(params, c, frame[None], 1).frame(0)
            one = lambda s_, p_, a_: step_lib.step(params, c, s_, f, frame_idx, 1, False, p_, a_, policy)
            return jax.vmap(one)(state, prompt, prompted)

        def interact(params, state, features, prompt, frame_idx, num_frames, reverse, prev, *, init_cond, has_mask):
            TRACE_COUNTS["interact"] += 1
            if has_mask:
                out = step_lib.mask_prompt_outputs(params, c, features, prompt)
            else:
                out = step_lib.point_prompt_outputs(params, c, state, features, prompt, frame_idx, num_frames, reverse,
                                                    init_cond=init_cond, prev_mask_logits=prev, policy=policy)
            return dict(out, object_embedding=step_lib.object_embedding(features.vision_features, out["low_res_masks"]))

        def features1(params, frame):
            TRACE_COUNTS["features"] += 1
            return compute_features(params, c, frame[None], 1).frame(0)

        def memory(params, features, low_res, score):
            TRACE_COUNTS["memory"] += 1
            return step_lib.prompt_memory(params, c, features, low_res, score)

        def restore(cond, history, history_valid):
            TRACE_COUNTS["restore"] += 1
            return state_lib.state_from_history(c, tc, policy, cond, history, history_valid,
                                                cond_slots=cond.frame.shape[0])

        self.chunk = jax.jit(chunk)
        self.batch_features = jax.jit(batch_features)
        self.add_prompt = jax.jit(add_prompt)
        self.interact = jax.jit(interact, static_argnames=("init_cond", "has_mask"))
        self.features = jax.jit(features1)
        self.memory = jax.jit(memory)
        self.restore = jax.jit(restore)
        self.resize = jax.jit(lambda x, hw: layers.resize_bilinear(x, hw, antialias=False), static_argnums=1)
        self._more: dict = {}

    def get(self, name, build):
        """Another jitted function for this config pair (e.g. `one_prompt`'s scans), built once by
        `build()`: every compiled function of the package lives in the one `compiled` cache."""
        if name not in self._more:
            self._more[name] = build()
        return self._more[name]


_COMPILED: dict = {}


def compiled(config, tracker_config=None) -> Compiled:
    """Shared jitted functions, so equal configs never compile twice."""
    tracker_config = tracker_config or tracker_config_lib.get_tracker_config()
    key = (config.to_json(), tracker_config.to_json())
    if key not in _COMPILED:
        _COMPILED[key] = Compiled(copy.deepcopy(config), copy.deepcopy(tracker_config))
    return _COMPILED[key]


def init_state(config, tracker_config=None, policy=None) -> TrackerState:
    """An empty bank for one object under `tracker_config`'s memory policy: `state.init_state`
    with the policy made for you (`medsam2_jax.tracker.init_state`)."""
    tracker_config = tracker_config or tracker_config_lib.get_tracker_config()
    return state_lib.init_state(config, tracker_config, policy or make_policy(config, tracker_config))


def processing_order(num_frames: int, start_frame_idx: int, max_frame_num_to_track=None, reverse=False):
    """Frame indices in tracking order, with `propagate_in_video`'s bounds."""
    max_n = num_frames if max_frame_num_to_track is None else max_frame_num_to_track
    if reverse:
        end = max(start_frame_idx - max_n, 0)
        return list(range(start_frame_idx, end - 1, -1)) if start_frame_idx > 0 else []
    end = min(start_frame_idx + max_n, num_frames - 1)
    return list(range(start_frame_idx, end + 1))


def add_prompt(params, config, state: TrackerState, frame, prompt, frame_idx, prompted=None, tracker_config=None):
    """Pin a prompted frame for each object with `prompted` (O,) set (all by default).

    frame (S, S, 3) normalised; prompt a `Prompt` with a leading object axis (same padding for
    every object); state with a leading object axis. Returns (state, outputs per object).
    """
    fns = compiled(config, tracker_config)
    o = state.cond_frame.shape[0]
    prompted = np.ones((o,), bool) if prompted is None else np.asarray(prompted, bool)
    return fns.add_prompt(params, state, jnp.asarray(frame), prompt, jnp.int32(frame_idx), prompted)


def iter_propagate(params, config, state: TrackerState, frames, start_frame_idx: int, reverse: bool = False,
                   max_frame_num_to_track=None, tracker_config=None):
    """Yield (frame indices, host outputs with a leading frame axis, state) chunk by chunk.

    frames: (T, S, S, 3) normalised, on the host: an array, or anything with `len` that gives
    (n, S, S, 3) for an index array, such as `predictor.Frames`, which makes them a chunk at a
    time. Only a chunk is on the device (and, with `Frames`, on the host) at a time.
    Outputs per frame: low_res_masks (O, 4s, 4s, 1), object_score_logits (O, 1), obj_ptr (O, C),
    maskmem_features (O, s, s, Cm) bfloat16, is_cond (O,), bank_frames and entry_extras (what the
    memory policy's write read besides memory and pointer: `step.track_frame`).
    """
    fns = compiled(config, tracker_config)
    size = fns.tracker_config.chunk_size
    num_frames = len(frames)
    order = processing_order(num_frames, start_frame_idx, max_frame_num_to_track, reverse)
    for k in range(0, len(order), size):
        idx = order[k:k + size]
        n = len(idx)
        padded = idx + [idx[-1]] * (size - n)
        features, computed = chunk_features(fns, params, state, frames, idx)
        state, outs = fns.chunk(params, state, features, np.asarray(padded, np.int32), computed,
                                np.int32(num_frames), np.bool_(reverse))
        outs = jax.tree.map(lambda x, n=n: np.asarray(x)[:n], outs)
        yield idx, outs, state


def propagate(params, config, state: TrackerState, frames, start_frame_idx: int, reverse: bool = False,
              max_frame_num_to_track=None, tracker_config=None):
    """Track every object over the video: (final state, frame indices, stacked host outputs)."""
    indices, chunks = [], []
    for idx, outs, chunk_state in iter_propagate(params, config, state, frames, start_frame_idx, reverse,
                                                 max_frame_num_to_track, tracker_config):
        indices += idx
        chunks.append(outs)
        state = chunk_state
    if not chunks:
        return state, [], {}
    return state, indices, jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)

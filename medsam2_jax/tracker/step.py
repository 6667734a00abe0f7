"""One frame of SAM 2 tracking for one object, as pure functions over `TrackerState`.

`step` is `SAM2Base.track_step` as the official video predictor drives it:
  - a frame without a prompt reads the bank (all conditioning frames, then what the memory
    policy reads: for fifo the `num_maskmem - 1` frames before it in tracking direction and their
    object pointers), runs memory attention with empty slots masked, the SAM heads, the object
    pointer and the memory encoder, and is offered to the policy's bank; a frame that is already
    a conditioning frame replays its stored output, as `propagate_in_video` does;
  - a prompted frame (points, a box, or a mask) is an initial conditioning frame: no memory,
    `no_mem_embed` added, and its memory is encoded the way `propagate_in_video_preflight` does
    it (from the low-res logits upsampled, binarised as "from points"), then pinned.
Frame features are unbatched here ((s, s, 256) maps); `jax.vmap` over a leading object axis
tracks several objects on shared features. Hole filling (`fill_hole_area`) needs the CUDA
extension in the official code and is skipped on CPU; it is not applied here either.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from medsam2_jax.model import layers, sam2
from medsam2_jax.model.memory_attention import memory_attention
from medsam2_jax.model.position_encoding import sine_1d, sine_2d
from medsam2_jax.tracker.policies import Entry, Query
from medsam2_jax.tracker.policies.fifo import Fifo, FifoBank, pointer_normaliser, pointer_targets, recent_targets
from medsam2_jax.tracker.state import MEMORY_DTYPE, TrackerState, write_cond


def _policy(config, state, policy):
    """`policy`, or SAM 2's fifo when left out (then the state must hold fifo's bank)."""
    if policy is not None:
        return policy
    if not isinstance(state.bank, FifoBank):
        raise ValueError("this state holds another policy's bank: pass the policy (policies.make_policy)")
    return Fifo(config, None)


def _entry_extras(config, policy, entry=None):
    """The `policy.entry_extras` of a tracked frame's `Entry` (float32), which the predictor
    stores so that a later propagation can replay the write; zeros for a replayed frame."""
    if entry is not None:
        return {name: getattr(entry, name).astype(jnp.float32) for name in policy.entry_extras}
    s, c = config.image_size // config.backbone_stride, config.hidden_dim
    shapes = {"iou": (), "object_score": (), "image_features": (s, s, c), "conditioned_features": (s, s, c)}
    return {name: jnp.zeros(shapes[name], jnp.float32) for name in policy.entry_extras}


class MemoryTokens(NamedTuple):
    """Memory-attention keys: tokens and positions (n, Cm), and which are real (n,) (the rest are
    masked out, where they contribute exactly zero)."""

    tokens: jax.Array
    positions: jax.Array
    valid: jax.Array


def memory_conditioned_features(params, config, state: TrackerState, vision_features, vision_pos_enc,
                                frame_idx, num_frames, reverse, policy=None, skip_empty: bool = False,
                                training: bool = False):
    """(1, s, s, C) features fused with the bank for a frame that is not an initial cond frame.

    Memory tokens: every conditioning frame (t_pos 0), then what the policy reads; pointer tokens:
    the conditioning frames' (only past ones in eval, not in `training`), then the policy's.
    `skip_empty` (static, inference only): attention does not compute the key chunks of empty slots.
    """
    policy = _policy(config, state, policy)
    frame_idx = jnp.asarray(frame_idx, jnp.int32)
    selected = closest_cond_frames(state.cond_frame, state.cond_valid, frame_idx, config.max_cond_frames_in_attn)
    read = _policy_read(params, config, state, policy, vision_features, frame_idx, num_frames, reverse, selected)
    parts = [_cond_tokens(params, config, policy, state, selected), _read_tokens(params, config, policy, read)]
    num_ptr_tokens = 0
    if config.use_obj_ptrs_in_encoder and policy.object_pointers:
        parts.append(_pointer_tokens(params, config, state, read, selected, frame_idx, num_frames, reverse,
                                     training))
        num_ptr_tokens = parts[-1].valid.shape[0]
    memory = MemoryTokens(*(jnp.concatenate(field)[None] for field in zip(*parts)))
    s, c = vision_features.shape[1], config.hidden_dim
    out = memory_attention(params["memory_attention"], vision_features.reshape(1, s * s, c),
                           vision_pos_enc.reshape(1, s * s, c), memory.tokens, memory.positions, num_ptr_tokens,
                           config, memory_mask=memory.valid, skip_empty=skip_empty)
    return out.reshape(1, s, s, c)


def _policy_read(params, config, state, policy, vision_features, frame_idx, num_frames, reverse, selected):
    """What the policy gives this frame to read (`policy.read`), plus, under fifo, the conditioning
    frames `max_cond_frames_in_attn` left out where SAM 2 reads them as recent ones."""
    memory_features = _empty_mask_memory(params, config, vision_features) if policy.needs_memory_query else None
    query = Query(frame=frame_idx, num_frames=jnp.asarray(num_frames, jnp.int32), reverse=jnp.asarray(reverse),
                  image_features=vision_features[0], memory_features=memory_features)
    read = policy.read(state, query)
    if config.max_cond_frames_in_attn != -1 and policy.name == "fifo":
        read = _unselected_cond_as_recent(config, state, selected, read, frame_idx, num_frames, reverse)
    return read


def _temporal_encoding(params, config, policy, t_pos):
    """Rows of `maskmem_tpos_enc` picked by `t_pos` (-1: none); zeros for a policy without."""
    if not policy.temporal_encoding:
        return jnp.zeros(jnp.shape(t_pos) + (config.mem_dim,), jnp.float32)
    table = params["maskmem_tpos_enc"][:, 0, 0, :]  # (num_maskmem, Cm)
    return jnp.where((t_pos >= 0)[..., None], table[jnp.maximum(t_pos, 0)], 0.0)


def _spatial_positions(config, memories):
    """(s*s, Cm) sine positional encoding of the memories' grid (the same for every slot)."""
    s, cm = memories.shape[1], config.mem_dim
    return sine_2d(s, s, cm).reshape(s * s, cm)


def _cond_tokens(params, config, policy, state, selected) -> MemoryTokens:
    """Every conditioning slot's memory, tagged with the last temporal row; `selected` are read."""
    kc, s, cm = state.cond_mem.shape[0], state.cond_mem.shape[1], config.mem_dim
    grid = _spatial_positions(config, state.cond_mem)
    row = _temporal_encoding(params, config, policy, jnp.int32(config.num_maskmem - 1))
    return MemoryTokens(tokens=state.cond_mem.astype(jnp.float32).reshape(kc * s * s, cm),
                        positions=jnp.tile(grid + row, (kc, 1)), valid=jnp.repeat(selected, s * s))


def _read_tokens(params, config, policy, read) -> MemoryTokens:
    """The memories the policy read, each tagged with its temporal row (`read.tpos`)."""
    r, s, cm = read.mem.shape[0], read.mem.shape[1], config.mem_dim
    grid = _spatial_positions(config, read.mem)
    rows = _temporal_encoding(params, config, policy, read.tpos)
    return MemoryTokens(tokens=read.mem.astype(jnp.float32).reshape(r * s * s, cm),
                        positions=(grid[None] + rows[:, None, :]).reshape(r * s * s, cm),
                        valid=jnp.repeat(read.valid, s * s))


def _pointer_tokens(params, config, state, read, selected, frame_idx, num_frames, reverse,
                    training) -> MemoryTokens:
    """Object pointers, the conditioning frames' (only past ones in eval) then the read ones, each
    split into C / Cm tokens, positioned by their normalised temporal offset (SAM 2.1)."""
    c, cm, f32 = config.hidden_dim, config.mem_dim, jnp.float32
    _, t_diff_max = pointer_normaliser(config, num_frames)
    if config.only_obj_ptrs_in_the_past_for_eval and not training:
        past = jnp.where(reverse, state.cond_frame >= frame_idx, state.cond_frame <= frame_idx)
    else:
        past = jnp.ones_like(state.cond_valid)
    if config.use_signed_tpos_enc_to_obj_ptrs:
        cond_offset = (frame_idx - state.cond_frame) * jnp.where(reverse, -1, 1)
    else:
        cond_offset = jnp.abs(frame_idx - state.cond_frame)
    pointers = jnp.concatenate([state.cond_ptr, read.ptr])
    offsets = jnp.concatenate([cond_offset.astype(f32) / t_diff_max, read.ptr_offset.astype(f32)])
    valid = jnp.concatenate([selected & past, read.ptr_valid])
    if config.add_tpos_enc_to_obj_ptrs:
        encoding = sine_1d(offsets, c if config.proj_tpos_enc_in_obj_ptrs else cm)
        if config.proj_tpos_enc_in_obj_ptrs:
            encoding = layers.linear(params["obj_ptr_tpos_proj"], encoding)
    else:
        encoding = jnp.zeros((pointers.shape[0], cm), f32)
    split = c // cm  # a pointer becomes `split` consecutive tokens of width Cm
    return MemoryTokens(tokens=pointers.reshape(-1, cm), positions=jnp.repeat(encoding, split, axis=0),
                        valid=jnp.repeat(valid, split))


def closest_cond_frames(cond_frame, cond_valid, frame_idx, limit: int):
    """(Kc,) bool: the conditioning frames frame `frame_idx` attends to (`select_closest_cond_frames`).

    All of them when `limit` is -1 or not exceeded; else the closest one before the frame, the
    closest at or after it, then the others by distance (ties in slot order, which is the order
    the frames were prompted in) up to `limit`.
    """
    if limit == -1:
        return cond_valid
    big = jnp.iinfo(jnp.int32).max
    t = jnp.asarray(frame_idx, jnp.int32)
    before, after = cond_valid & (cond_frame < t), cond_valid & (cond_frame >= t)
    slots = jnp.arange(cond_frame.shape[0])
    nearest_before = before.any() & (slots == jnp.argmax(jnp.where(before, cond_frame, -big)))
    nearest_after = after.any() & (slots == jnp.argmin(jnp.where(after, cond_frame, big)))
    chosen = nearest_before | nearest_after
    rest = cond_valid & ~chosen
    order = jnp.argsort(jnp.where(rest, jnp.abs(cond_frame - t), big), stable=True)
    rank = jnp.zeros_like(slots).at[order].set(slots)
    chosen = chosen | (rest & (rank < limit - chosen.sum()))
    return jnp.where(cond_valid.sum() <= limit, cond_valid, chosen)


def _unselected_cond_as_recent(config, state, selected, read, frame_idx, num_frames, reverse):
    """SAM 2 reads a conditioning frame left out by `max_cond_frames_in_attn` like a tracked one
    where it falls among the recent frames: its memory at that distance, its pointer likewise."""
    left_out = state.cond_valid & ~selected

    def fill(targets, valid, eligible, values, stored):
        match = left_out[None, :] & (state.cond_frame[None, :] == targets[:, None])  # (targets, Kc)
        use = ~valid & eligible & match.any(1)
        picked = stored[jnp.argmax(match, axis=1)]
        shape = (-1,) + (1,) * (values.ndim - 1)
        return jnp.where(use.reshape(shape), picked.astype(values.dtype), values), valid | use

    mem, valid = fill(recent_targets(config, frame_idx, reverse), read.valid, True, read.mem, state.cond_mem)
    targets, eligible = pointer_targets(config, frame_idx, reverse, num_frames, read.ptr.shape[0])
    ptr, ptr_valid = fill(targets, read.ptr_valid, eligible, read.ptr, state.cond_ptr)
    return read.replace(mem=mem, valid=valid, ptr=ptr, ptr_valid=ptr_valid)


def _empty_mask_memory(params, config, vision_features):
    """A frame's features projected into the memory space with an empty mask (`query_source="memory"`)."""
    s = config.image_size
    empty = jnp.full((1, s, s, 1), -1024.0, jnp.float32)
    return _encode(params, config, vision_features, empty, jnp.ones((1, 1), jnp.float32), False)


def _encode(params, config, vision_features, high_res_masks, score, from_points, training=False):
    mem, _ = sam2.encode_new_memory(params, vision_features, high_res_masks, score, from_points, config,
                                    training=training)
    return mem[0].astype(MEMORY_DTYPE)


def prompt_memory(params, config, features, low_res_masks, object_score_logits):
    """Memory of a prompted frame as `propagate_in_video_preflight` encodes it (bfloat16)."""
    high = layers.resize_bilinear(low_res_masks[None], (config.image_size,) * 2, antialias=False)
    vision_features = features.batched().vision_features
    return _encode(params, config, vision_features, high, object_score_logits[None], True)


def prompt_frame(params, config, state, features, prompt, frame_idx, num_frames, reverse, *,
                 init_cond: bool, prev_mask_logits=None, policy=None):
    """The SAM heads for a frame that receives clicks, a box or a mask (no memory encoding): both
    `mask_prompt_outputs` and `point_prompt_outputs`, selected by `prompt.has_mask` (a bool
    array, may be traced). A caller that knows the kind of prompt calls the one it needs."""
    mask_out = mask_prompt_outputs(params, config, features, prompt)
    point_out = point_prompt_outputs(params, config, state, features, prompt, frame_idx, num_frames, reverse,
                                     init_cond=init_cond, prev_mask_logits=prev_mask_logits, policy=policy)
    return {k: jnp.where(prompt.has_mask, mask_out[k], point_out[k]) for k in mask_out}


def mask_prompt_outputs(params, config, features, prompt):
    """A mask prompt's outputs: the mask itself (`use_mask_as_output`); no memory is read."""
    f = features.batched()
    out = sam2.use_mask_as_output(params, f.vision_features, f.high_res_features, prompt.mask[None], config)
    return {k: out[k][0] for k in ("low_res_masks", "obj_ptr", "object_score_logits")}


def point_prompt_outputs(params, config, state, features, prompt, frame_idx, num_frames, reverse, *,
                         init_cond: bool, prev_mask_logits=None, policy=None):
    """Clicks or a box through the SAM heads.

    `init_cond` (static): the object has not been tracked on this frame, so no memory is used.
    Otherwise the prompt corrects a tracked frame and the bank is read (`state` must hold it).
    `prev_mask_logits` (4s, 4s, 1), clamped by the caller, go in with the points as the official
    `prev_sam_mask_logits` do.
    """
    f = features.batched()
    vf, pos, hr = f.vision_features, f.vision_pos_enc, f.high_res_features
    if init_cond:
        pix = sam2.add_no_mem_embed(params, vf)
    else:
        pix = memory_conditioned_features(params, config, state, vf, pos, frame_idx, num_frames, reverse,
                                          policy, skip_empty=True)
    coords, labels, point_mask = prompt.points[None], prompt.labels[None], prompt.point_valid[None]
    mask_inputs = None if prev_mask_logits is None else prev_mask_logits[None]
    out = sam2.forward_sam_heads(
        params, pix, config, point_coords=coords, point_labels=labels, high_res_features=hr,
        multimask_output=sam2.use_multimask(config, init_cond, prompt.point_valid.sum()), point_mask=point_mask,
        **sam2.box_mask_prompt(config, coords, labels, point_mask, mask_inputs))
    return {k: out[k][0] for k in ("low_res_masks", "obj_ptr", "object_score_logits")}


def track_frame(params, config, state: TrackerState, features, frame_idx, num_frames, reverse, active=True,
                policy=None, training: bool = False):
    """A frame without a new prompt: track from memory, or replay a conditioning frame.

    The new memory is offered to the policy as an `Entry`; outputs add `bank_frames`, the frame
    held in each of the policy's slots after the write (-1: empty), and `entry_extras`, the
    entry's fields the policy's write reads besides memory, pointer and frame index.

    `training` (static) is SAM2Train's training mode: the pointers of all conditioning frames are
    read (not only past ones), the memory is encoded from the sigmoid of the mask (never
    binarised), and the outputs add `sam`, what the loss scores (`sam2.multimask_candidates`):
    `low_res_multimasks` (4s, 4s, M) and `ious` (M,).
    """
    policy = _policy(config, state, policy)
    f = features.batched()
    vf, pos, hr = f.vision_features, f.vision_pos_enc, f.high_res_features
    pix = memory_conditioned_features(params, config, state, vf, pos, frame_idx, num_frames, reverse, policy,
                                      skip_empty=not training, training=training)
    multimask = sam2.use_multimask(config, False, 0)
    sam = sam2.forward_sam_heads(params, pix, config, high_res_features=hr, multimask_output=multimask)
    mem = _encode(params, config, vf, sam["high_res_masks"], sam["object_score_logits"], False, training)

    replay, stored = _stored_output(state, frame_idx)
    tracked = {"low_res_masks": sam["low_res_masks"][0], "object_score_logits": sam["object_score_logits"][0],
               "obj_ptr": sam["obj_ptr"][0], "maskmem_features": mem}
    out = {k: jnp.where(replay, stored[k], tracked[k]) for k in tracked}
    out["is_cond"] = replay
    out["object_embedding"] = object_embedding(vf[0], out["low_res_masks"])
    entry = Entry(mem=mem, ptr=sam["obj_ptr"][0], frame=jnp.asarray(frame_idx, jnp.int32), iou=sam["iou"][0],
                  object_score=sam["object_score_logits"][0, 0], image_features=vf[0], conditioned_features=pix[0])
    state = policy.write(state, entry, jnp.asarray(active) & ~replay)
    out["bank_frames"] = policy.held_frames(state)
    out["entry_extras"] = _entry_extras(config, policy, entry)
    if training:
        masks, ious = sam2.multimask_candidates(sam, multimask)
        out["sam"] = {"low_res_multimasks": masks[0], "ious": ious[0]}
    return state, out


def object_embedding(vision_features, low_res_masks):
    """(C,) what the object looks like on a frame: the (s, s, C) image features averaged under the
    mask's probability ((4s, 4s, 1) logits, averaged onto the feature grid). Not part of SAM 2:
    `volumes/stopping.py` compares it with the prompted frame's to tell where an object ends."""
    s = vision_features.shape[0]
    p = jax.nn.sigmoid(low_res_masks[..., 0].astype(jnp.float32))
    f = p.shape[0] // s
    w = p.reshape(s, f, s, f).mean((1, 3))
    return jnp.einsum("ij,ijc->c", w, vision_features.astype(jnp.float32)) / jnp.maximum(w.sum(), 1e-6)


def _stored_output(state: TrackerState, frame_idx):
    """(is `frame_idx` a pinned conditioning frame, its stored outputs) for replay."""
    same = state.cond_valid & (state.cond_frame == frame_idx)
    replay, cslot = same.any(), jnp.argmax(same)
    return replay, {"low_res_masks": state.cond_mask[cslot], "object_score_logits": state.cond_score[cslot],
                    "obj_ptr": state.cond_ptr[cslot], "maskmem_features": state.cond_mem[cslot]}


def replay_frame(config, state: TrackerState, frame_idx, policy=None):
    """`track_frame`'s result on a conditioning frame, computing nothing: its stored outputs, the
    state unchanged. For a scan that knows every object has this frame pinned (the start frame of
    a propagation), so the image encoder and the tracker need not run."""
    policy = _policy(config, state, policy)
    replay, out = _stored_output(state, frame_idx)
    return state, dict(out, is_cond=replay, object_embedding=jnp.zeros((config.hidden_dim,), jnp.float32),
                       bank_frames=policy.held_frames(state), entry_extras=_entry_extras(config, policy))


def step(params, config, state: TrackerState, features, frame_idx, num_frames, reverse=False, prompt=None,
         active=True, policy=None):
    """`track_step` for one object: (state, outputs) with low_res_masks (4s, 4s, 1),
    object_score_logits (1,), obj_ptr (C,), maskmem_features (s, s, Cm) bfloat16, is_cond.

    With `prompt` the frame becomes a pinned initial conditioning frame (`active` gates the write,
    so a vmapped call can prompt some objects only); without, it is tracked from the bank.
    `frame_idx`, `num_frames`, `reverse` and `active` may be traced. `policy` (a
    `policies.MemoryPolicy`) decides what is written and read; None means fifo, the SAM 2 ring.
    """
    if prompt is None:
        return track_frame(params, config, state, features, frame_idx, num_frames, reverse, active, policy)
    out = prompted_outputs(params, config, features, prompt, frame_idx, num_frames, reverse)
    state = write_cond(state, frame_idx, out["maskmem_features"], out["obj_ptr"], out["low_res_masks"],
                       out["object_score_logits"], write=active)
    return state, out


def prompted_outputs(params, config, features, prompt, frame_idx, num_frames, reverse=False):
    """An initial conditioning frame's outputs (no memory read) with its memory encoded as
    `propagate_in_video_preflight` does: what `write_cond` pins (`state.CondFrames` stacks them)."""
    out = prompt_frame(params, config, None, features, prompt, frame_idx, num_frames, reverse, init_cond=True)
    mem = prompt_memory(params, config, features, out["low_res_masks"], out["object_score_logits"])
    return dict(out, maskmem_features=mem, is_cond=jnp.asarray(True))

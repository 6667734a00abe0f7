"""A stateful predictor with the official `SAM2VideoPredictor` contract.

    predictor = VideoPredictor(params, config)
    state = predictor.init_state(frames)            # (T, H, W, 3) array, or a folder of JPEGs
    predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=[[x, y]], labels=[1])
    for frame_idx, obj_ids, mask_logits in predictor.propagate_in_video(state):
        ...                                        # mask_logits (num_objs, 1, H, W), numpy

The bookkeeping (per-object prompt and output dicts, temporary outputs of interactions,
preflight, which frames are conditioning frames, tracking direction per frame) is the official
one, line for line, so interactive refinement and forward-then-reverse runs behave the same.
The computation is the functional tracker: a click or mask runs `step.prompt_frame`; a
propagation builds each object's fixed-size `TrackerState` from the stored outputs
(`state.state_from_history`: the prompted frames pinned, the memory policy's writes replayed over
the tracked frames behind the start frame, farthest first, as a pass in this direction would have
made them) and runs the chunked, compiled `lax.scan` (`propagate.iter_propagate`) for all objects
at once, streaming outputs back to the host store. So every policy carries its bank across calls:
a propagation split in two equals one, and a reverse pass or a correction after a propagation
starts from the bank the policy's rule gives on the frames tracked so far.

Like the official predictor, the host store keeps every tracked frame's memory (bfloat16) so a
later call can start anywhere (`release_frame` drops one that no call will start near), plus what
the policy's write reads besides (`policy.entry_extras`: nothing for fifo; for self_sorting the
frame's confidence and, with `query_source="image"`, its image features); the device
only ever holds one chunk and the fixed-size state, and the host one chunk of model-resolution
frames (`Frames`: the video is resized and normalised as tracking reaches it). Cond slots are sized
to the prompts; empty slots and the prompted frame itself cost no compute.
Hole filling is not applied (the official predictor skips it on CPU: it needs CUDA).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np

from medsam2_jax.model import layers
from medsam2_jax.model.sam2 import NO_OBJ_SCORE
from medsam2_jax.tracker import config as tracker_config_lib
from medsam2_jax.tracker.policies import Entry
from medsam2_jax.tracker.prompts import make_prompt
from medsam2_jax.tracker.propagate import compiled, iter_propagate, processing_order
from medsam2_jax.tracker.state import CondFrames, stack_states
from medsam2_jax.tracker.state import init_state as empty_bank

COND, NON_COND = "cond_frame_outputs", "non_cond_frame_outputs"


class Frames:
    """A video's frames at the model resolution, ImageNet-normalised, made on demand.

    `load(indices)` returns (n, S, S, 3) for an index array. Indexing with an int gives one frame
    (S, S, 3), with an index array a stack. A propagation asks for one chunk at a time, so the host
    never holds the whole video at the model resolution (a 512-slice CT at 1024 px would be 6 GB).
    """

    def __init__(self, count: int, load):
        self._count, self._load = int(count), load

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        index = np.asarray(index)
        frames = np.asarray(self._load(np.atleast_1d(index)), np.float32)
        return frames[0] if index.ndim == 0 else frames


def _jpeg_names(path: str) -> list[str]:
    names = [p for p in os.listdir(path) if os.path.splitext(p)[-1] in (".jpg", ".jpeg", ".JPG", ".JPEG")]
    if not names:
        raise RuntimeError(f"no images found in {path}")
    return sorted(names, key=lambda p: int(os.path.splitext(p)[0]))


def load_frames(path: str, image_size: int):
    """A folder of `<index>.jpg` frames as (Frames in [0, 1], not normalised; (H, W)), each read
    and resized when asked for, as the official loader does it (PIL)."""
    from PIL import Image

    files = [os.path.join(path, n) for n in _jpeg_names(path)]
    with Image.open(files[0]) as first:
        hw = (first.height, first.width)

    def load(indices):
        out = []
        for i in indices:
            with Image.open(files[int(i)]) as img:
                rgb = img.convert("RGB").resize((image_size, image_size))
            out.append(np.asarray(rgb, np.float32) / 255.0)
        return np.stack(out)

    return Frames(len(files), load), hw


class VideoPredictor:
    def __init__(self, params, config, tracker_config=None):
        self.params = params
        self.config = config
        self.tracker_config = tracker_config or tracker_config_lib.get_tracker_config()
        self.image_size = config.image_size
        self.fns = compiled(config, self.tracker_config)
        self._empty = jax.tree.map(np.asarray, empty_bank(config, self.tracker_config, self.fns.policy))

    # ------------------------------------------------------------------------------------------
    # Session state

    def init_state(self, video, normalized: bool = False, video_hw: tuple[int, int] | None = None):
        """`video`: a folder of JPEG frames, an array (T, H, W, 3) in [0, 1] (uint8: [0, 255]), or
        a `Frames`.

        Frames are resized and normalised a chunk at a time as tracking reaches them (the array is
        kept, not copied). Arrays not at the model resolution are resized with bilinear
        antialiasing (the official JPEG loader uses PIL bicubic: pass a folder for bit-faithful
        inputs). `normalized=True` takes frames already ImageNet-normalised at the model
        resolution; then `video_hw` names the original frame size that prompts refer to and masks
        come back at (default: the model resolution).
        """
        s = self.image_size
        if isinstance(video, (str, os.PathLike)):
            source, (h, w) = load_frames(os.fspath(video), s)
        elif isinstance(video, Frames):
            source, (h, w) = video, (s, s)
        else:
            source = np.asarray(video)
            if source.ndim != 4 or source.shape[-1] != 3:
                raise ValueError(f"video must be (T, H, W, 3), got shape {source.shape}")
            h, w = source.shape[1:3]
        if video_hw is not None:
            h, w = video_hw
        frames = source if normalized else Frames(len(source), lambda idx: self._prepare(source[idx]))
        st = {
            "images": frames,
            "num_frames": len(frames),
            "video_height": h,
            "video_width": w,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
        }
        self._get_image_feature(st, 0)
        return st

    def _prepare(self, frames):
        """(n, H, W, 3) in [0, 1] (uint8: [0, 255]) -> (n, S, S, 3) normalised at the model resolution."""
        s = self.image_size
        frames = np.asarray(frames)
        frames = frames.astype(np.float32) / (255.0 if frames.dtype == np.uint8 else 1.0)
        if frames.shape[1:3] != (s, s):
            frames = np.asarray(layers.resize_bilinear(jnp.asarray(frames), (s, s), antialias=True))
        mean = np.asarray(self.config.pixel_mean, np.float32)
        std = np.asarray(self.config.pixel_std, np.float32)
        return (frames - mean) / std

    def object_scores(self, inference_state, obj_id) -> dict[int, float]:
        """{frame index: object-score logit} of every frame this object has an output on."""
        obj_idx = inference_state["obj_id_to_idx"][obj_id]
        out = inference_state["output_dict_per_obj"][obj_idx]
        return {t: float(np.ravel(o["object_score_logits"])[0])
                for d in (out[NON_COND], out[COND]) for t, o in d.items()}

    def object_embedding(self, inference_state, obj_id, frame_idx):
        """(C,) the object's mask-pooled image features on a frame it has an output on
        (`step.object_embedding`), else None."""
        out = inference_state["output_dict_per_obj"][inference_state["obj_id_to_idx"][obj_id]]
        o = out[COND].get(frame_idx) or out[NON_COND].get(frame_idx)
        return None if o is None or o.get("object_embedding") is None else np.asarray(o["object_embedding"])

    def release_frame(self, inference_state, frame_idx):
        """Drop the stored memory and mask of a tracked (non-conditioning) frame, keeping its
        pointer and object score. The official predictor keeps every frame's memory so a later
        propagation or correction can start anywhere; a caller that will never start one near this
        frame (`segment_volume` starts only at prompted slices) can keep host memory flat instead.
        A later propagation reads a released frame as untracked."""
        for out in inference_state["output_dict_per_obj"].values():
            o = out[NON_COND].get(frame_idx)
            if o is not None:
                out[NON_COND][frame_idx] = dict(o, maskmem_features=None, pred_masks=None, entry_extras=None)

    def reset_state(self, inference_state):
        """Remove all objects, inputs and outputs (and so every memory bank: banks are rebuilt from
        the outputs at each call)."""
        for key in ("obj_id_to_idx", "obj_idx_to_id", "obj_ids", "point_inputs_per_obj", "mask_inputs_per_obj",
                    "output_dict_per_obj", "temp_output_dict_per_obj", "frames_tracked_per_obj"):
            inference_state[key].clear()

    def _obj_id_to_idx(self, st, obj_id):
        obj_idx = st["obj_id_to_idx"].get(obj_id)
        if obj_idx is not None:
            return obj_idx
        obj_idx = len(st["obj_id_to_idx"])
        st["obj_id_to_idx"][obj_id] = obj_idx
        st["obj_idx_to_id"][obj_idx] = obj_id
        st["obj_ids"] = list(st["obj_id_to_idx"])
        st["point_inputs_per_obj"][obj_idx] = {}
        st["mask_inputs_per_obj"][obj_idx] = {}
        st["output_dict_per_obj"][obj_idx] = {COND: {}, NON_COND: {}}
        st["temp_output_dict_per_obj"][obj_idx] = {COND: {}, NON_COND: {}}
        st["frames_tracked_per_obj"][obj_idx] = {}
        return obj_idx

    def _get_image_feature(self, st, frame_idx):
        """Features of one frame; like the official one, only the latest frame is cached."""
        cached = st["cached_features"].get(frame_idx)
        if cached is None:
            cached = self.fns.features(self.params, jnp.asarray(st["images"][frame_idx]))
            st["cached_features"] = {frame_idx: cached}
        return cached

    # ------------------------------------------------------------------------------------------
    # Fixed-size banks from the host store

    def _cond_slots(self, st) -> int:
        """Cond slots for this session's banks: the most-prompted object's prompted frames, rounded
        up to a power of two (a handful of compiled shapes). Like the official predictor, any
        number of frames can be prompted (`tracker_config.max_cond_frames` sizes only the
        functional API's `init_state`). Empty slots cost memory, not attention: whole key chunks
        of empty slots are skipped."""
        most = max((len(o[COND]) for o in st["output_dict_per_obj"].values()), default=1)
        return 1 << max(most - 1, 0).bit_length()

    def memory_window(self) -> int:
        """How many tracked frames before a start frame a propagation reads: fifo's reach
        (memories, pointers); every stored frame (`sys.maxsize`) for a policy that may keep any."""
        reach = self.fns.policy.history_reach
        return sys.maxsize if reach is None else reach

    def memory_state(self, inference_state, frame_idx, reverse=False):
        """The memory (a `TrackerState`, objects stacked) that tracking from `frame_idx` in this
        direction starts from: each object's prompted frames, and its policy's bank rebuilt from
        the frames tracked so far."""
        return stack_states([self._state(inference_state, i, frame_idx, reverse)
                             for i in range(len(inference_state["obj_ids"]))])

    def _state(self, st, obj_idx, frame_idx, reverse):
        """The `TrackerState` that tracking this object from `frame_idx` in this direction starts
        from: its prompted frames pinned, and the policy's bank rebuilt from the tracked frames
        behind `frame_idx` (`_history`)."""
        rows = list(st["output_dict_per_obj"][obj_idx][COND].items())
        kc = self._cond_slots(st)

        def column(field, key):
            pad = np.zeros_like(np.asarray(getattr(self._empty, field))[0])
            return np.stack([np.asarray(o[key]) for _, o in rows] + [pad] * (kc - len(rows)))

        cond = CondFrames(frame=np.array([t for t, _ in rows] + [-1] * (kc - len(rows)), np.int32),
                          mem=column("cond_mem", "maskmem_features"), ptr=column("cond_ptr", "obj_ptr"),
                          mask=column("cond_mask", "pred_masks"), score=column("cond_score", "object_score_logits"),
                          valid=np.arange(kc) < len(rows))
        history, valid = self._history(st["output_dict_per_obj"][obj_idx][NON_COND], frame_idx, reverse)
        return self.fns.restore(cond, history, valid)

    def _history(self, non_cond, frame_idx, reverse):
        """(stacked `Entry`, valid) of the stored tracked frames behind `frame_idx` in tracking
        direction, farthest first (within the policy's `history_reach`), padded to a power of two;
        (None, None) when there is none. Released frames, and frames whose output lacks what the
        policy's write reads (a correction's output holds no `entry_extras`), are left out."""
        sign = -1 if reverse else 1
        reach = self.memory_window()
        extras = self.fns.policy.entry_extras
        behind = sorted(((frame_idx - t) * sign, t) for t, o in non_cond.items()
                        if 1 <= (frame_idx - t) * sign <= reach and o["maskmem_features"] is not None
                        and (not extras or o.get("entry_extras") is not None))
        if not behind:
            return None, None
        unused = {f.name: None for f in dataclasses.fields(Entry)}
        entries = [Entry(**dict(unused, mem=non_cond[t]["maskmem_features"], ptr=non_cond[t]["obj_ptr"],
                                frame=np.int32(t), **(non_cond[t].get("entry_extras") or {})))
                   for _, t in reversed(behind)]
        n = len(entries)
        size = 1 << (n - 1).bit_length()  # a handful of compiled lengths

        def padded(*rows):
            rows = np.stack(rows)
            return np.concatenate([rows, np.zeros((size - n, *rows.shape[1:]), rows.dtype)])

        return jax.tree.map(padded, *entries), np.arange(size) < n

    # ------------------------------------------------------------------------------------------
    # Interactions

    def _video_res(self, st, low_res_masks):
        """(O, 4s, 4s, 1) logits -> (O, 1, H, W) at the video resolution (bilinear, no antialias)."""
        hw = (st["video_height"], st["video_width"])
        x = low_res_masks if low_res_masks.shape[1:3] == hw else self.fns.resize(jnp.asarray(low_res_masks), hw)
        return np.array(np.moveaxis(np.asarray(x), -1, 1))

    def _consolidated(self, st, frame_idx, storage_key):
        """Every object's mask on a frame at video resolution; objects without one: NO_OBJ_SCORE."""
        s4 = self.image_size // 4
        masks, missing = [], []
        for obj_idx in range(len(st["obj_ids"])):
            out = st["temp_output_dict_per_obj"][obj_idx][storage_key].get(frame_idx)
            if out is None:
                out = st["output_dict_per_obj"][obj_idx][COND].get(frame_idx)
            if out is None:
                out = st["output_dict_per_obj"][obj_idx][NON_COND].get(frame_idx)
            if out is None:
                missing.append(obj_idx)
            masks.append(np.zeros((s4, s4, 1), np.float32) if out is None else out["pred_masks"])
        video = self._video_res(st, np.stack(masks))
        video[missing] = NO_OBJ_SCORE
        return video

    def _interact(self, st, obj_idx, frame_idx, prompt, has_mask, prev=None):
        tracked = st["frames_tracked_per_obj"][obj_idx]
        init_cond = frame_idx not in tracked
        reverse = False if init_cond else tracked[frame_idx]["reverse"]
        is_cond = init_cond  # add_all_frames_to_correct_as_cond is False
        storage_key = COND if is_cond else NON_COND
        if not has_mask:
            out_dicts = (st["temp_output_dict_per_obj"][obj_idx][storage_key],
                         st["output_dict_per_obj"][obj_idx][COND], st["output_dict_per_obj"][obj_idx][NON_COND])
            prev_out = next((d[frame_idx] for d in out_dicts if frame_idx in d), None)
            if prev_out is not None and prev_out["pred_masks"] is not None:
                prev = np.clip(prev_out["pred_masks"], -32.0, 32.0)
        bank = self._empty if (init_cond or has_mask) else self._state(st, obj_idx, frame_idx, reverse)
        feats = self._get_image_feature(st, frame_idx)
        out = self.fns.interact(self.params, bank, feats, prompt, np.int32(frame_idx), np.int32(st["num_frames"]),
                                np.bool_(reverse), prev, init_cond=init_cond or has_mask, has_mask=has_mask)
        out = jax.tree.map(np.asarray, out)
        st["temp_output_dict_per_obj"][obj_idx][storage_key][frame_idx] = {
            "maskmem_features": None,
            "pred_masks": out["low_res_masks"],
            "obj_ptr": out["obj_ptr"],
            "object_score_logits": out["object_score_logits"],
            "object_embedding": out["object_embedding"],
        }
        return frame_idx, st["obj_ids"], self._consolidated(st, frame_idx, storage_key)

    def add_new_points_or_box(self, inference_state, frame_idx, obj_id, points=None, labels=None,
                              clear_old_points=True, normalize_coords=True, box=None):
        """Clicks (label 1 positive, 0 negative) and/or a box (x0, y0, x1, y1) on a frame.

        Returns (frame_idx, obj_ids, mask logits (num_objs, 1, H, W)).
        """
        st = inference_state
        obj_idx = self._obj_id_to_idx(st, obj_id)
        if (points is not None) != (labels is not None):
            raise ValueError("points and labels must be provided together")
        if points is None and box is None:
            raise ValueError("at least one of points or box must be provided as input")
        pts = np.zeros((0, 2), np.float32) if points is None else np.asarray(points, np.float32).reshape(-1, 2)
        lab = np.zeros((0,), np.int32) if labels is None else np.asarray(labels, np.int32).reshape(-1)
        if box is not None:
            if not clear_old_points:
                raise ValueError("cannot add box without clearing old points, since box prompt must be "
                                 "provided before any point prompt (please use clear_old_points=True instead)")
            pts = np.concatenate([np.asarray(box, np.float32).reshape(2, 2), pts])
            lab = np.concatenate([np.array([2, 3], np.int32), lab])
        if normalize_coords:
            pts = pts / np.array([st["video_width"], st["video_height"]], np.float32)
        pts = (pts * np.float32(self.image_size)).astype(np.float32)
        old = None if clear_old_points else st["point_inputs_per_obj"][obj_idx].get(frame_idx)
        if old is not None:
            pts = np.concatenate([old["point_coords"], pts])
            lab = np.concatenate([old["point_labels"], lab])
        st["point_inputs_per_obj"][obj_idx][frame_idx] = {"point_coords": pts, "point_labels": lab}
        st["mask_inputs_per_obj"][obj_idx].pop(frame_idx, None)
        prompt = make_prompt(self.image_size, self.tracker_config.max_points, points=pts, labels=lab)
        return self._interact(st, obj_idx, frame_idx, prompt, has_mask=False)

    add_new_points = add_new_points_or_box

    def add_new_mask(self, inference_state, frame_idx, obj_id, mask):
        """A 2-D mask (any size; resized with antialias and thresholded at 0.5)."""
        st = inference_state
        obj_idx = self._obj_id_to_idx(st, obj_id)
        mask = np.asarray(mask, bool)
        assert mask.ndim == 2
        m = mask.astype(np.float32)[None, :, :, None]
        if mask.shape != (self.image_size, self.image_size):
            m = layers.resize_bilinear(jnp.asarray(m), (self.image_size,) * 2, antialias=True)
            m = (np.asarray(m) >= 0.5).astype(np.float32)
        st["mask_inputs_per_obj"][obj_idx][frame_idx] = m[0]
        st["point_inputs_per_obj"][obj_idx].pop(frame_idx, None)
        prompt = make_prompt(self.image_size, self.tracker_config.max_points, mask=m[0])
        return self._interact(st, obj_idx, frame_idx, prompt, has_mask=True)

    # ------------------------------------------------------------------------------------------
    # Propagation

    def propagate_in_video_preflight(self, inference_state):
        """Encode the memories of interacted frames and move them into the output dicts."""
        st = inference_state
        if not st["obj_ids"]:
            raise RuntimeError("No input points or masks are provided for any object; please add inputs first.")
        for obj_idx in range(len(st["obj_ids"])):
            out_dict = st["output_dict_per_obj"][obj_idx]
            temp = st["temp_output_dict_per_obj"][obj_idx]
            for storage_key in (NON_COND, COND):
                for frame_idx, out in temp[storage_key].items():
                    if out["maskmem_features"] is None:
                        feats = self._get_image_feature(st, frame_idx)
                        mem = self.fns.memory(self.params, feats, out["pred_masks"], out["object_score_logits"])
                        out["maskmem_features"] = np.asarray(mem)
                    out_dict[storage_key][frame_idx] = out
                temp[storage_key].clear()
            if not out_dict[COND]:
                raise RuntimeError(f"No input points or masks are provided for object id "
                                   f"{st['obj_idx_to_id'][obj_idx]}; please add inputs first.")
            for frame_idx in out_dict[COND]:
                out_dict[NON_COND].pop(frame_idx, None)

    def propagate_in_video(self, inference_state, start_frame_idx=None, max_frame_num_to_track=None,
                           reverse=False):
        """Yield (frame_idx, obj_ids, mask logits (num_objs, 1, H, W)) in tracking order."""
        st = inference_state
        self.propagate_in_video_preflight(st)
        obj_ids = st["obj_ids"]
        n_obj = len(obj_ids)
        if start_frame_idx is None:
            start_frame_idx = min(t for o in st["output_dict_per_obj"].values() for t in o[COND])
        order = processing_order(st["num_frames"], start_frame_idx, max_frame_num_to_track, reverse)
        if not order:
            return
        state = self.memory_state(st, start_frame_idx, reverse)
        for idx, outs, _ in iter_propagate(self.params, self.config, state, st["images"], start_frame_idx,
                                       reverse, max_frame_num_to_track, self.tracker_config):
            for j, frame_idx in enumerate(idx):
                masks = []
                for obj_idx in range(n_obj):
                    out_dict = st["output_dict_per_obj"][obj_idx]
                    if frame_idx in out_dict[COND]:
                        pred = out_dict[COND][frame_idx]["pred_masks"]
                    else:
                        pred = outs["low_res_masks"][j, obj_idx]
                        out_dict[NON_COND][frame_idx] = {
                            "maskmem_features": outs["maskmem_features"][j, obj_idx],
                            "pred_masks": pred,
                            "obj_ptr": outs["obj_ptr"][j, obj_idx],
                            "object_score_logits": outs["object_score_logits"][j, obj_idx],
                            "object_embedding": outs["object_embedding"][j, obj_idx],
                            "entry_extras": {k: v[j, obj_idx] for k, v in outs["entry_extras"].items()},
                        }
                    st["frames_tracked_per_obj"][obj_idx][frame_idx] = {"reverse": reverse}
                    masks.append(pred)
                yield frame_idx, obj_ids, self._video_res(st, np.stack(masks))

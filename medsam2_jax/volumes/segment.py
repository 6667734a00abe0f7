"""3D segmentation from prompted slices (memory-bank.md section 6).

Slices along the prompts' axis are the frames of a video. Every object is tracked forward from
its first prompted slice and backward from its last one; on each slice the pass that came from
the nearer prompt wins (equal distance: the mean of the two probabilities). Objects are then
written into one label volume: a voxel goes to the object with the highest positive logit.

Optionally (`segment_volume_multi_orientation`) the result seeds mask prompts on the central
slice of each object along the two other axes, those passes run the same way, and the three
probability volumes are averaged or majority-voted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from scipy.special import expit, logit

from medsam2_jax.model.sam2 import NO_OBJ_SCORE
from medsam2_jax.tracker.predictor import Frames
from medsam2_jax.volumes import intensity, stopping
from medsam2_jax.volumes.io import Volume
from medsam2_jax.volumes.prompts import SlicePrompt, VolumePrompts, make_volume_prompts
from medsam2_jax.volumes.stopping import StopRule

NO_OBJECT_LOGIT = NO_OBJ_SCORE  # the logit of a slice outside an object's range: the tracker's "no object"


@dataclasses.dataclass
class Segmentation:
    labels: np.ndarray  # (X, Y, Z) int32 on the canonical grid; 0 is background
    probabilities: np.ndarray  # (objects, X, Y, Z) float32, in `object_ids` order
    object_ids: list[int]
    slice_scores: dict[int, list[float]]  # per object, the object-score logit of every slice
    # per object, (slices, len(stopping.FEATURES)) what a stop rule reads on each tracked slice (NaN elsewhere)
    slice_features: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)


def segment_volume(volume: Volume, prompts: VolumePrompts, predictor, *, window: str | None = None,
                   level: float | None = None, width: float | None = None, largest_component: bool = False,
                   crop: float | None = None, stop: StopRule | None = None,
                   progress: Callable[[int], None] | None = None) -> Segmentation:
    """Propagate every object of `prompts` through `volume` with a `VideoPredictor`.

    Objects with a slice range (`prompts.slice_ranges`) are segmented only inside it: the frames
    are the slices of the union of the ranges, and each object is empty outside its own.
    `crop` (a factor, e.g. 3): the model sees only a square in-plane region around the prompts,
    `crop` times their extent (`prompt_crop`), on every slice; everything outside is background.
    One window holds all objects, so objects far apart make it wide (and their pixels few):
    segment them in separate runs to give each its own window.
    `stop` (a `stopping.StopRule`): moving out from its prompted slices, an object ends where the
    rule says it has left the slice, and a pass stops once every object in it has ended (objects
    with a slice range keep it instead). None: track to the volume's ends, as SAM 2 does.
    `progress(n)` is called with the number of slices just finished (for a progress bar).
    """
    axis = prompts.axis
    unit = intensity.to_unit_range(volume.array, window=window, level=level, width=width)
    geometry = _Geometry(_in_plane_spacing(volume, axis), float(volume.spacing[axis]))
    if crop is None:
        merged, scores, features = _track(unit, prompts, predictor, progress, stop, geometry)
    else:
        region = prompt_crop(prompts, geometry.spacing, crop)
        merged, scores, features = _track(region.slices(unit, axis), region.prompts(prompts), predictor, progress,
                                          stop, geometry)
        merged = region.paste(merged, prompts.slice_shape, NO_OBJECT_LOGIT)
    object_ids = list(prompts.object_ids)
    probabilities = expit(merged)  # (n, objects, h, w)
    labels = _labels(merged, object_ids)
    if largest_component:
        labels = _largest_components(labels, object_ids)
    # Frames are slices along `axis`: put the slice axis back in its canonical place.
    labels = np.moveaxis(labels, 0, axis)
    probabilities = np.moveaxis(np.moveaxis(probabilities, 1, 0), 1, axis + 1)
    return Segmentation(labels.astype(np.int32), probabilities.astype(np.float32), object_ids, scores, features)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    spacing: tuple[float, float]  # in-plane (row, column) mm
    slice_mm: float  # between slices along the prompts' axis


def _track(unit: np.ndarray, prompts: VolumePrompts, predictor, progress, stop: StopRule | None,
           geometry: _Geometry) -> tuple[np.ndarray, dict, dict]:
    """(slices, objects, h, w) logits over the whole volume (the tracker's "no object" logit
    outside each object's range), the per-slice object scores and stop-rule features."""
    axis = prompts.axis
    lo, hi = prompts.tracked_range()
    if (lo, hi) != (0, prompts.num_slices - 1):  # intensities from the whole volume, frames from the range
        unit = np.take(unit, np.arange(lo, hi + 1), axis=axis)
    # Slices reach the model resolution a chunk at a time, as tracking asks for them.
    frames = Frames(unit.shape[axis],
                    lambda idx: intensity.slices_to_model_input(np.take(unit, idx, axis=axis), axis,
                                                                predictor.image_size))
    state = predictor.init_state(frames, normalized=True, video_hw=prompts.slice_shape)
    for p in prompts.prompts:
        if p.mask is not None:
            predictor.add_new_mask(state, p.slice_index - lo, p.object_id, p.mask)
        else:
            predictor.add_new_points_or_box(state, p.slice_index - lo, p.object_id, points=p.points,
                                            labels=p.point_labels, box=p.box)

    object_ids = list(prompts.object_ids)
    n, (h, w) = hi - lo + 1, prompts.slice_shape
    reach = predictor.memory_window()  # how far back a pass starting at a prompted slice reads
    passes, pass_features = {}, {}
    ranged = {obj for obj in object_ids if obj in prompts.slice_ranges}
    for reverse in (False, True):
        logits = np.full((n, len(object_ids), h, w), np.nan, np.float32)
        ends = _Ends(predictor, state, prompts, object_ids, lo, geometry, stop, ranged, reverse)
        slices = [p.slice_index - lo for p in prompts.prompts]
        start = max(slices) if reverse else min(slices)
        for frame_idx, ids, masks in predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
            logits[frame_idx] = _reorder(masks[:, 0], list(ids), object_ids)
            ends.see(frame_idx, logits)
            if min(abs(frame_idx - k) for k in slices) > reach:
                predictor.release_frame(state, frame_idx)  # no pass starts near it: host memory stays flat
            if progress is not None:
                progress(1)
            if ends.all_ended(frame_idx):
                logits[np.isnan(logits)] = NO_OBJECT_LOGIT  # slices this pass no longer reaches
                break
        if reverse and start == 0:
            # SAM 2 tracks nothing backward from frame 0 (its processing order is empty): this
            # pass holds only the prompted frame, whose answer the forward pass already gave.
            logits[0] = passes[False][0]
        passes[reverse], pass_features[reverse] = logits, ends.features

    merged = _merge_passes(passes[False], passes[True], prompts, object_ids, offset=lo)
    chosen = _merge_passes(pass_features[False][..., None], pass_features[True][..., None], prompts, object_ids,
                           offset=lo, mean=False)[..., 0]
    features = {}
    for j, obj in enumerate(object_ids):
        features[obj] = np.full((prompts.num_slices, len(stopping.FEATURES)), np.nan, np.float32)
        features[obj][lo : hi + 1] = chosen[:, j]
    # Back on the whole volume: nothing outside an object's range (the tracker's "no object" logit).
    full = np.full((prompts.num_slices, len(object_ids), h, w), NO_OBJECT_LOGIT, np.float32)
    full[lo : hi + 1] = merged
    for j, obj in enumerate(object_ids):
        first, last = prompts.slice_range(obj)
        full[:first, j] = full[last + 1 :, j] = NO_OBJECT_LOGIT
    return full, _slice_scores(predictor, state, object_ids, lo, prompts), features


class _Ends:
    """One pass's stop-rule features per slice and object, and (with a rule) where each object ends.

    A prompted slice of an object is its reference (its embedding and mask extent) for the slices
    after it in this pass; from the first run of `rule.run` slices the rule calls absent, the
    object's logits are "no object" to the end of the pass."""

    def __init__(self, predictor, state, prompts, object_ids, offset, geometry, rule, ranged, reverse):
        self.predictor, self.state, self.object_ids = predictor, state, object_ids
        self.geometry, self.rule, self.reverse = geometry, rule, reverse
        self.prompted = {obj: {k - offset for k in prompts.prompted_slices(obj)} for obj in object_ids}
        self.stopping = [obj not in ranged for obj in object_ids] if rule is not None else [False] * len(object_ids)
        self.refs: dict[int, tuple[stopping.Reference, int]] = {}
        self.low = [[] for _ in object_ids]  # the current run of absent slices, per object
        self.ended = [False] * len(object_ids)
        n = prompts.tracked_range()[1] - prompts.tracked_range()[0] + 1
        self.features = np.full((n, len(object_ids), len(stopping.FEATURES)), np.nan, np.float32)

    def see(self, frame_idx: int, logits: np.ndarray) -> None:
        for j, obj in enumerate(self.object_ids):
            embedding = self.predictor.object_embedding(self.state, obj, frame_idx)
            if frame_idx in self.prompted[obj]:
                self.refs[j] = (stopping.reference(embedding, logits[frame_idx, j] > 0, self.geometry.spacing),
                                frame_idx)
                self.low[j], self.ended[j] = [], False
                continue
            if j not in self.refs:
                continue
            ref, at = self.refs[j]
            f = stopping.slice_features(ref, embedding, abs(frame_idx - at) * self.geometry.slice_mm)
            self.features[frame_idx, j] = f
            if not self.stopping[j]:
                continue
            if not self.ended[j]:
                absent = self.rule.presence(f) < self.rule.threshold
                self.low[j] = self.low[j] + [frame_idx] if absent else []
                if len(self.low[j]) >= self.rule.run:
                    self.ended[j] = True
                    logits[self.low[j], j] = NO_OBJECT_LOGIT
            if self.ended[j]:
                logits[frame_idx, j] = NO_OBJECT_LOGIT

    def all_ended(self, frame_idx: int) -> bool:
        """Every object has ended (or has no rule to end by) and none is prompted further on."""
        if self.rule is None or not all(e or not s for e, s in zip(self.ended, self.stopping)) or not any(self.ended):
            return False
        ahead = (lambda k: k < frame_idx) if self.reverse else (lambda k: k > frame_idx)
        return not any(ahead(k) for slices in self.prompted.values() for k in slices)


@dataclasses.dataclass(frozen=True)
class Crop:
    """An in-plane window of every slice: rows `row : row + height`, columns `col : col + width`
    of the slice grid. It may reach past the slice's edges; those pixels read as 0 (the unit
    range's background)."""

    row: int
    col: int
    height: int
    width: int

    def slices(self, unit: np.ndarray, axis: int) -> np.ndarray:
        """The window of every slice of a (X, Y, Z) volume, zero where it leaves the volume."""
        frames = np.moveaxis(unit, axis, 0)
        out = np.zeros((frames.shape[0], self.height, self.width), frames.dtype)
        (src_r, dst_r), (src_c, dst_c) = self._overlap(frames.shape[1:])
        out[:, dst_r, dst_c] = frames[:, src_r, src_c]
        return np.moveaxis(out, 0, axis)

    def prompts(self, prompts: VolumePrompts) -> VolumePrompts:
        """`prompts` in the window's coordinates."""
        shift = np.array([self.col, self.row], np.float32)
        moved = []
        for p in prompts.prompts:
            mask = None
            if p.mask is not None:
                mask = np.zeros((self.height, self.width), bool)
                (src_r, dst_r), (src_c, dst_c) = self._overlap(p.mask.shape)
                mask[dst_r, dst_c] = p.mask[src_r, src_c]
            moved.append(dataclasses.replace(
                p, points=None if p.points is None else p.points - shift,
                box=None if p.box is None else p.box - np.tile(shift, 2), mask=mask))
        return dataclasses.replace(prompts, slice_shape=(self.height, self.width), prompts=tuple(moved))

    def paste(self, values: np.ndarray, slice_shape: tuple[int, int], fill: float) -> np.ndarray:
        """(..., height, width) window values -> (..., H, W) slices, `fill` outside the window."""
        out = np.full(values.shape[:-2] + tuple(slice_shape), fill, values.dtype)
        (src_r, dst_r), (src_c, dst_c) = self._overlap(slice_shape)
        out[..., src_r, src_c] = values[..., dst_r, dst_c]
        return out

    def _overlap(self, shape: tuple[int, int]) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """Per in-plane axis, (slice of the slice grid, slice of the window) that coincide."""
        pairs = []
        for start, size, n in ((self.row, self.height, shape[0]), (self.col, self.width, shape[1])):
            a, b = max(start, 0), min(start + size, n)
            pairs.append((slice(a, b), slice(a - start, b - start)))
        return tuple(pairs)


MIN_CROP_MM = 32.0  # the smallest window side: small prompts still get some context


def prompt_crop(prompts: VolumePrompts, spacing: tuple[float, float], factor: float,
                min_mm: float = MIN_CROP_MM) -> Crop:
    """A square window (in mm) centred on the extent of all prompts (boxes, points, mask pixels),
    `factor` times its longer side and at least `min_mm`; `spacing` is (row, column) mm."""
    if not factor >= 1.0:
        raise ValueError(f"crop factor {factor} must be at least 1 (the window holds the prompts)")
    xy = []
    for p in prompts.prompts:
        if p.box is not None:
            xy.append(p.box.reshape(2, 2))
        if p.points is not None:
            xy.append(p.points[p.point_labels == 1] if (p.point_labels == 1).any() else p.points)
        if p.mask is not None:
            rows, cols = np.nonzero(p.mask)
            xy.append(np.array([[cols.min(), rows.min()], [cols.max(), rows.max()]], np.float32))
    xy = np.concatenate(xy).astype(np.float64)
    (x0, y0), (x1, y1) = xy.min(axis=0), xy.max(axis=0)
    row_mm, col_mm = spacing
    side_mm = max(factor * max((y1 - y0 + 1) * row_mm, (x1 - x0 + 1) * col_mm), min_mm)
    height, width = int(np.ceil(side_mm / row_mm)), int(np.ceil(side_mm / col_mm))
    row = int(np.floor((y0 + y1) / 2 - (height - 1) / 2))
    col = int(np.floor((x0 + x1) / 2 - (width - 1) / 2))
    return Crop(row, col, height, width)


def _in_plane_spacing(volume: Volume, axis: int) -> tuple[float, float]:
    row_axis, col_axis = (a for a in range(3) if a != axis)
    return float(volume.spacing[row_axis]), float(volume.spacing[col_axis])


FUSIONS = ("mean", "vote")


def segment_volume_multi_orientation(volume: Volume, prompts: VolumePrompts, predictor, *, fusion: str = "mean",
                                     **kwargs) -> Segmentation:
    """The prompted-axis pass, then one pass along each other axis seeded by its result."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    first = segment_volume(volume, prompts, predictor, **kwargs)
    results = [first]
    for axis in (a for a in range(3) if a != prompts.axis):
        seeds = []
        for obj in first.object_ids:
            present = first.labels == obj
            along = np.nonzero(present.sum(axis=tuple(a for a in range(3) if a != axis)))[0]
            if along.size == 0:
                continue  # the first pass lost this object: nothing to seed
            k = int(along[len(along) // 2])
            seeds.append(SlicePrompt(obj, k, mask=np.take(present, k, axis=axis)))
        if seeds:
            results.append(segment_volume(volume, make_volume_prompts(volume, seeds, axis, prompts.object_names),
                                          predictor, **kwargs))
    return _fuse(results, first.object_ids, fusion)


def _fuse(results: list[Segmentation], object_ids: list[int], fusion: str) -> Segmentation:
    stacks = []
    for r in results:
        p = np.zeros((len(object_ids),) + r.labels.shape, np.float32)
        for j, obj in enumerate(r.object_ids):
            p[object_ids.index(obj)] = r.probabilities[j]
        stacks.append(p)
    stacks = np.stack(stacks)
    if fusion == "mean":
        probabilities = stacks.mean(axis=0)
    else:  # majority of the passes that ran
        probabilities = (stacks > 0.5).mean(axis=0).astype(np.float32)
    best = np.argmax(probabilities, axis=0)
    positive = np.take_along_axis(probabilities, best[None], axis=0)[0] > 0.5
    labels = np.where(positive, np.asarray(object_ids, np.int32)[best], 0).astype(np.int32)
    return Segmentation(labels, probabilities, object_ids, results[0].slice_scores, results[0].slice_features)


def _reorder(masks, ids, object_ids):
    return np.stack([masks[ids.index(o)] for o in object_ids])


def _merge_passes(forward, backward, prompts: VolumePrompts, object_ids, offset: int = 0, mean: bool = True):
    """Per object and slice, the logits of the pass that started from the nearer prompt.

    The forward pass covers every slice at or after an object's first prompt and the backward
    pass every slice at or before its last, so the chosen pass always reached the slice.
    `mean=False`: at equal distances take the forward pass's values (for non-logits).
    """
    n = forward.shape[0]
    z = np.arange(n)[:, None]
    merged = np.empty_like(forward)
    for j, obj in enumerate(object_ids):
        prompted = np.asarray(sorted(prompts.prompted_slices(obj)))[None, :] - offset
        d_fwd = np.where(prompted <= z, z - prompted, np.inf).min(axis=1)
        d_bwd = np.where(prompted >= z, prompted - z, np.inf).min(axis=1)
        fwd, bwd = forward[:, j], backward[:, j]
        merged[:, j] = np.where((d_fwd < d_bwd)[:, None, None], fwd, bwd)
        # Equal distances (prompted slices, midpoints between two prompts): both passes reached
        # the slice, so the mean is only computed where it is used.
        tie = d_fwd == d_bwd
        merged[tie, j] = _mean_prob_logit(fwd[tie], bwd[tie]) if mean else fwd[tie]
    return merged


def _mean_prob_logit(a, b):
    """The logit of the mean of two probabilities (equal distance to two prompts)."""
    p = np.clip(0.5 * (expit(a) + expit(b)), 1e-7, 1 - 1e-7)
    return logit(p).astype(np.float32)


def _labels(merged, object_ids):
    """(n, objects, h, w) logits -> (n, h, w) ids: the highest positive logit wins a voxel."""
    best = np.argmax(merged, axis=1)
    positive = np.take_along_axis(merged, best[:, None], axis=1)[:, 0] > 0
    ids = np.asarray(object_ids, np.int32)[best]
    return np.where(positive, ids, 0)


def _largest_components(labels, object_ids):
    from scipy import ndimage

    out = np.zeros_like(labels)
    for obj in object_ids:
        comp, count = ndimage.label(labels == obj, structure=np.ones((3, 3, 3)))
        if count:
            sizes = np.bincount(comp.ravel())[1:]
            out[comp == 1 + int(np.argmax(sizes))] = obj
    return out


def _slice_scores(predictor, state, object_ids, offset, prompts: VolumePrompts):
    """Per object, the object-score logit of every slice of the volume (NaN where not tracked)."""
    scores = {}
    for obj in object_ids:
        per_slice = predictor.object_scores(state, obj)
        first, last = prompts.slice_range(obj)
        scores[obj] = [float(per_slice.get(k - offset, np.nan)) if first <= k <= last else float("nan")
                       for k in range(prompts.num_slices)]
    return scores

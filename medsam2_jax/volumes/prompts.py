"""Prompts for a volume: points, boxes and seed masks, turned into per-slice prompts.

Users give 3D coordinates in one of four spaces:
  "voxel"      voxel indices of the input file as stored (what a viewer shows for that file);
  "canonical"  indices into `Volume.array` (RAS+ order);
  "world"      millimetres, RAS+ (NIfTI's world frame);
  "world_lps"  millimetres, LPS+ (DICOM's patient frame, what a DICOM viewer shows).
All are converted to canonical voxel coordinates, then to a slice along the chosen axis
("sagittal" = canonical axis 0, "coronal" = 1, "axial" = 2). Slice k is
`np.take(volume.array, k, axis)`; its rows and columns are the two remaining canonical axes in
order, and in-plane coordinates follow SAM: x = column, y = row.

The result, `VolumePrompts`, is a neutral description a propagation pipeline consumes: per
object, on each prompted slice, points (x, y) with labels (1 foreground, 0 background), or a box
(x0, y0, x1, y1), or a mask. `to_model_frame` rescales it to the model's S x S frames.

JSON prompt file (version 1), for many objects at once:

    {
      "version": 1,
      "space": "voxel",            # optional: voxel | canonical | world | world_lps
      "axis": "axial",             # optional: axial | coronal | sagittal
      "objects": [
        {
          "id": 1,                           # positive integer: the label value written out
          "name": "left caudate",            # optional
          "points": [[x, y, z], ...],        # optional, coordinates in "space"
          "point_labels": [1, 0, ...],       # optional: 1 foreground (default), 0 background
          "boxes": [[[x0, y0, z0], [x1, y1, z1]], ...],  # optional: two opposite corners,
                                                         #   both on one slice along "axis"
          "z_range": [z_first, z_last]       # optional: the object's first and last slice, in
        }                                    #   the prompts' third coordinate; propagation
                                             #   stays inside (the 3D box of 3D Slicer's MedSAM)
      ]
    }

Every object needs at least one point or box. Points and a box of one object on the same slice
form one prompt (SAM takes them together). Anything unusable is a `PromptError` with a one-line
message. What is usable but was tidied on the way in (box corners given high before low, a
fractional slice number in voxel or canonical space) is done and said in `VolumePrompts.notes`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from medsam2_jax.volumes.io import LPS_TO_RAS, Volume, loads_json

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
SPACES = ("voxel", "canonical", "world", "world_lps")
PROMPT_FILE_VERSION = 1
MAX_OBJECT_ID = np.iinfo(np.int32).max  # the label volume is int32 at most


class PromptError(ValueError):
    """A prompt that cannot be placed on the volume."""


@dataclasses.dataclass(frozen=True, eq=False)
class SlicePrompt:
    """The prompt of one object on one slice, in slice pixel coordinates (x = column, y = row)."""

    object_id: int
    slice_index: int
    points: np.ndarray | None = None  # (P, 2) float32
    point_labels: np.ndarray | None = None  # (P,) int32
    box: np.ndarray | None = None  # (4,) float32: x0, y0, x1, y1
    mask: np.ndarray | None = None  # (H, W) bool


@dataclasses.dataclass(frozen=True, eq=False)
class VolumePrompts:
    """All prompts of one segmentation run; slices are taken along canonical `axis`."""

    axis: int
    num_slices: int
    slice_shape: tuple[int, int]  # (H, W) of the frames the coordinates refer to
    prompts: tuple[SlicePrompt, ...]
    object_names: Mapping[int, str] = dataclasses.field(default_factory=dict)
    # Per object, the first and last slice (inclusive) it may occupy: propagation stays inside.
    slice_ranges: Mapping[int, tuple[int, int]] = dataclasses.field(default_factory=dict)
    # What was tidied on the way in, one line each (corners sorted, slices rounded): the user was
    # understood, but not to the letter, and should be told.
    notes: tuple[str, ...] = ()

    @property
    def object_ids(self) -> tuple[int, ...]:
        return tuple(sorted({p.object_id for p in self.prompts}))

    def prompted_slices(self, object_id: int) -> tuple[int, ...]:
        return tuple(sorted(p.slice_index for p in self.prompts if p.object_id == object_id))

    def slice_range(self, object_id: int) -> tuple[int, int]:
        """The slices `object_id` may occupy (inclusive): its given range, else the whole volume."""
        return tuple(self.slice_ranges.get(object_id, (0, self.num_slices - 1)))

    def tracked_range(self) -> tuple[int, int]:
        """The slices any object may occupy (inclusive): what propagation has to cover."""
        ranges = [self.slice_range(o) for o in self.object_ids]
        return min(r[0] for r in ranges), max(r[1] for r in ranges)

    def to_json(self) -> dict:
        """A JSON-ready summary (masks as voxel count and bounding box) for the sidecar."""
        out = {
            "axis": axis_name(self.axis),
            "num_slices": self.num_slices,
            "slice_shape": list(self.slice_shape),
            "object_names": {str(k): v for k, v in self.object_names.items()},
            "prompts": [_slice_prompt_json(p) for p in self.prompts],
        }
        if self.slice_ranges:
            out["slice_ranges"] = {str(k): list(v) for k, v in self.slice_ranges.items()}
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def canonical_axis(axis: str | int) -> int:
    """'axial' / 'coronal' / 'sagittal' or 0 / 1 / 2 -> canonical axis index."""
    if isinstance(axis, str) and axis in AXES:
        return AXES[axis]
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and 0 <= axis <= 2:
        return int(axis)
    raise PromptError(f"unknown slice axis {axis!r}; use axial, coronal or sagittal")


def canonical_axis_of_file_axis(volume: Volume, file_axis: int) -> int:
    """Which canonical axis the input file's voxel axis `file_axis` became (for '@Z' style input)."""
    return int(volume.to_canonical[file_axis, 0])


def to_canonical_voxels(volume: Volume, coords: np.ndarray, space: str) -> np.ndarray:
    """(N, 3) coordinates in `space` -> continuous canonical voxel coordinates (N, 3)."""
    coords = np.atleast_2d(np.asarray(coords, dtype=np.float64))
    if coords.shape[-1] != 3:
        raise PromptError(f"coordinates must be (x, y, z) triples, got shape {coords.shape}")
    if space == "canonical":
        return coords
    if space == "voxel":
        return volume.original_to_canonical_index(coords)
    if space in ("world", "world_lps"):
        world_ras = coords if space == "world" else coords * np.diag(LPS_TO_RAS)[:3]
        homogeneous = np.c_[world_ras, np.ones(len(world_ras))]
        return (homogeneous @ np.linalg.inv(volume.affine).T)[:, :3]
    raise PromptError(f"unknown coordinate space {space!r}; use one of {', '.join(SPACES)}")


def build_prompts(volume: Volume, objects: Sequence[Mapping], *, space: str = "voxel",
                  axis: str | int = "axial") -> VolumePrompts:
    """Objects as in the JSON schema (module docstring) -> validated `VolumePrompts`."""
    axis = canonical_axis(axis)
    if not objects:
        raise PromptError("no objects to segment; give at least one point or box")
    slice_prompts, names, ranges, notes = [], {}, {}, []
    for entry in objects:
        object_id = _object_id(entry)
        if object_id in names:
            raise PromptError(f"object id {object_id} is given twice; merge its prompts into one entry")
        name = entry.get("name", f"object {object_id}")
        if not isinstance(name, str):
            raise PromptError(f"object {object_id}: name must be text, got {name!r}")
        names[object_id] = name
        slice_prompts += _object_slice_prompts(volume, entry, object_id, space, axis, notes=notes)
        if entry.get("z_range") is not None:
            ranges[object_id] = _z_range(volume, entry, object_id, space, axis)
    prompts = dataclasses.replace(make_volume_prompts(volume, slice_prompts, axis, names), notes=tuple(notes))
    return with_slice_ranges(prompts, ranges) if ranges else prompts


def _z_range(volume: Volume, entry: Mapping, object_id: int, space: str, axis: int) -> tuple[float, float]:
    """An object's "z_range": [z0, z1], in the third coordinate of its prompts (voxel space: the
    file's third axis), -> canonical slice indices along `axis`."""
    bounds = entry["z_range"]
    if (not isinstance(bounds, (list, tuple)) or len(bounds) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and np.isfinite(b) for b in bounds)):
        raise PromptError(f"object {object_id}: z_range must be two numbers [z0, z1], got {bounds!r}")
    points = entry.get("points") or []
    reference = _as_coordinates(points, (-1, 3), "points")[0] if points else \
        _as_coordinates(entry["boxes"][0], (2, 3), "box").mean(axis=0)
    ends = np.stack([reference, reference])
    ends[:, 2] = bounds
    canonical = to_canonical_voxels(volume, ends, space)
    in_plane = np.abs(np.delete(canonical[1] - canonical[0], axis))
    if (in_plane > 1.0).any():
        raise PromptError(f"object {object_id}: z_range runs along the file's third axis, which is not the "
                          f"{axis_name(axis)} slice axis; give the range along the slice axis")
    return float(canonical[0, axis]), float(canonical[1, axis])


def load_prompt_file(path: str | Path, volume: Volume) -> VolumePrompts:
    """Reads a JSON prompt file (schema in the module docstring)."""
    path = Path(path)
    try:
        data = loads_json(path.read_text())
    except OSError as error:
        raise PromptError(f"{path}: cannot read the prompt file ({error.strerror}); check the path") from error
    except UnicodeDecodeError as error:
        raise PromptError(f"{path}: not text (byte {error.start} is not UTF-8); a prompt file is JSON text") from error
    except json.JSONDecodeError as error:
        raise PromptError(f"{path}: not valid JSON (line {error.lineno}: {error.msg}); fix the prompt file") from error
    except ValueError as error:  # NaN or Infinity (loads_json)
        raise PromptError(f"{path}: {error}") from None
    except RecursionError:
        raise PromptError(f"{path}: JSON nested too deeply for a prompt file; see the schema in prompts.py") from None
    if not isinstance(data, dict) or not isinstance(data.get("objects"), list):
        raise PromptError(f"{path}: a prompt file is a JSON object with an 'objects' list; "
                          "see the schema in prompts.py")
    if data.get("version", PROMPT_FILE_VERSION) != PROMPT_FILE_VERSION:
        raise PromptError(f"{path}: prompt file version {data['version']} is not {PROMPT_FILE_VERSION}")
    try:
        return build_prompts(volume, data["objects"], space=data.get("space", "voxel"), axis=data.get("axis", "axial"))
    except PromptError as error:
        raise PromptError(f"{path}: {error}") from error


def prompts_from_seed_labels(volume: Volume, seed_labels: np.ndarray, *, axis: str | int = "axial",
                             prompt_with: str = "box") -> VolumePrompts:
    """Each non-zero label value becomes an object, prompted on the slice where it is largest.

    seed_labels: integer array on the canonical grid (io.load_label_volume gives one).
    prompt_with: "box" (its bounding box on that slice) or "mask" (its mask there). An object
    one voxel thin on that slice has no box area and is prompted with its mask instead.
    """
    axis = canonical_axis(axis)
    if prompt_with not in ("box", "mask"):
        raise PromptError(f"prompt_with must be 'box' or 'mask', got {prompt_with!r}")
    seed_labels = np.asarray(seed_labels)
    if seed_labels.shape != volume.shape:
        raise PromptError(f"seed label shape {seed_labels.shape} is not the volume's {volume.shape}; "
                          "draw it on the image's grid")
    values = [int(v) for v in np.unique(seed_labels) if v != 0]
    if not values:
        raise PromptError(f"the seed label volume for {volume.source_path} is empty (all zero); "
                          "label at least one object")
    frames = np.moveaxis(seed_labels, axis, 0)
    prompts = [_seed_prompt(frames == value, value, prompt_with) for value in values]
    return make_volume_prompts(volume, prompts, axis, {v: f"label {v}" for v in values})


def make_volume_prompts(volume: Volume, slice_prompts: Iterable[SlicePrompt], axis: int,
                        object_names: Mapping[int, str] | None = None) -> VolumePrompts:
    """Checks slice prompts against the volume and merges those of one object on one slice."""
    num_slices = volume.shape[axis]
    slice_shape = tuple(n for i, n in enumerate(volume.shape) if i != axis)
    merged: dict[tuple[int, int], SlicePrompt] = {}
    for prompt in slice_prompts:
        _check_in_volume(prompt, num_slices, slice_shape)
        key = (prompt.object_id, prompt.slice_index)
        merged[key] = _merge(merged[key], prompt) if key in merged else prompt
    return VolumePrompts(axis, num_slices, slice_shape, tuple(merged[k] for k in sorted(merged)),
                         dict(object_names or {}))


def with_slice_ranges(prompts: VolumePrompts, ranges: Mapping[int, Sequence[float]]) -> VolumePrompts:
    """`prompts` with per-object slice ranges (canonical slice indices along `prompts.axis`,
    inclusive, either order): each object is segmented only between its first and last slice,
    which must hold its prompts."""
    checked = dict(prompts.slice_ranges)
    for object_id, bounds in ranges.items():
        if object_id not in prompts.object_ids:
            raise PromptError(f"a slice range is given for object {object_id}, which has no prompt")
        lo, hi = sorted(float(np.rint(b)) for b in bounds)
        if not 0 <= lo <= hi < prompts.num_slices:  # also false for NaN and for millimetres that overflowed
            raise PromptError(f"object {object_id}: slice range {lo:g}:{hi:g} lies outside the volume's "
                              f"{prompts.num_slices} {axis_name(prompts.axis)} slices (0 to {prompts.num_slices - 1})")
        lo, hi = int(lo), int(hi)
        outside = [k for k in prompts.prompted_slices(object_id) if not lo <= k <= hi]
        if outside:
            raise PromptError(f"object {object_id}: prompted slice {outside[0]} lies outside its slice range "
                              f"{lo}:{hi}; the range must hold the prompts")
        checked[object_id] = (lo, hi)
    return dataclasses.replace(prompts, slice_ranges=checked)


def to_model_frame(prompts: VolumePrompts, image_size: int) -> VolumePrompts:
    """Coordinates scaled from (H, W) slices to S x S model frames, as SAM 2 scales clicks:
    x * S / W, y * S / H; masks resized (bilinear, then > 0.5, like SAM 2's add_new_mask)."""
    height, width = prompts.slice_shape
    scale = np.array([image_size / width, image_size / height], dtype=np.float32)
    scaled = [_scaled(p, scale, image_size) for p in prompts.prompts]
    return dataclasses.replace(prompts, slice_shape=(image_size, image_size), prompts=tuple(scaled))


def _object_slice_prompts(volume: Volume, entry: Mapping, object_id: int, space: str, axis: int, *,
                          notes: list[str]) -> list[SlicePrompt]:
    points, boxes = entry.get("points") or [], entry.get("boxes") or []
    if not points and not boxes:
        raise PromptError(f"object {object_id} has no points and no boxes; give at least one")
    if not isinstance(boxes, (list, tuple)):
        raise PromptError(f"object {object_id}: boxes must be a list [[[x0, y0, z0], [x1, y1, z1]], ...], "
                          f"got {boxes!r}")
    prompts = []
    if points:
        prompts += _point_prompts(volume, object_id, points, entry.get("point_labels"), space, axis, notes=notes)
    for box in boxes:
        prompts.append(_box_prompt(volume, object_id, box, space, axis, notes=notes))
    return prompts


def _point_prompts(volume: Volume, object_id: int, points, labels, space: str, axis: int, *,
                   notes: list[str]) -> list[SlicePrompt]:
    points = _as_coordinates(points, (-1, 3), f"object {object_id} points")
    try:
        labels = np.ones(len(points)) if labels is None else np.asarray(labels, np.float64)
    except (TypeError, ValueError):  # nested lists, strings: not one number per point
        labels = None
    if labels is None or labels.shape != (len(points),) or not np.isin(labels, (0, 1)).all():
        raise PromptError(f"object {object_id}: point_labels must be one 0 or 1 per point")
    labels = labels.astype(np.int32)
    whole = _on_whole_slices(volume, points, space, axis, f"object {object_id}: point", notes)
    canonical = to_canonical_voxels(volume, whole, space)
    _check_inside(volume, canonical, points, space, f"object {object_id}: point")
    slices = np.rint(canonical[:, axis]).astype(int)
    in_plane = _in_plane_xy(canonical, axis)
    return [
        SlicePrompt(object_id, int(k), points=in_plane[slices == k].astype(np.float32),
                    point_labels=labels[slices == k])
        for k in np.unique(slices)
    ]


def _box_prompt(volume: Volume, object_id: int, box, space: str, axis: int, *, notes: list[str]) -> SlicePrompt:
    corners = _as_coordinates(box, (2, 3), f"object {object_id} box")
    along = _slice_coordinate(volume, space, axis)
    # Two opposite corners in any order make a box; X0,Y0,X1,Y1 promises low before high, so a
    # box given the other way round is sorted below and said to be.
    high_first = [name for c, name in enumerate("XYZ") if c != along and corners[1, c] < corners[0, c]]
    if high_first:
        notes.append(f"object {object_id}: box corners given as "
                     f"{' and '.join(f'{n}1<{n}0' for n in high_first)}; sorted")
    whole = _on_whole_slices(volume, corners, space, axis, f"object {object_id}: box", notes)
    canonical = to_canonical_voxels(volume, whole, space)
    _check_inside(volume, canonical, corners, space, f"object {object_id}: box corner")
    first, second = canonical[:, axis]
    if abs(first - second) > 1.0:  # one slice of rounding slack for world coordinates
        raise PromptError(
            f"object {object_id}: box corners lie on different {axis_name(axis)} slices "
            f"({first:.0f} and {second:.0f}); put both corners on one slice"
        )
    (x0, y0), (x1, y1) = np.sort(_in_plane_xy(canonical, axis), axis=0)
    return SlicePrompt(object_id, int(np.rint((first + second) / 2)), box=np.array([x0, y0, x1, y1], np.float32))


def _slice_coordinate(volume: Volume, space: str, axis: int) -> int:
    """Which of the user's (x, y, z) runs along the canonical slice `axis` (in world space, the
    one it runs most along)."""
    if space == "canonical":
        return axis
    if space == "voxel":
        return next(f for f in range(3) if canonical_axis_of_file_axis(volume, f) == axis)
    return int(np.argmax(np.abs(np.asarray(volume.affine)[:3, axis])))


def _on_whole_slices(volume: Volume, coords: np.ndarray, space: str, axis: int, what: str,
                     notes: list[str]) -> np.ndarray:
    """Voxel and canonical coordinates name slices by number: a fractional one is rounded in the
    user's own numbering (78.5 -> 78 whichever way the file's axis runs) and said to be. World
    coordinates are millimetres, which fall between slices as a matter of course."""
    if space not in ("voxel", "canonical"):
        return coords
    along = _slice_coordinate(volume, space, axis)
    whole = coords.copy()
    whole[:, along] = np.rint(coords[:, along])
    for given, rounded in dict.fromkeys(zip(coords[:, along].tolist(), whole[:, along].tolist())):
        if given != rounded:
            notes.append(f"{what} slice {given:g} rounded to {rounded:g}")
    return whole


def _seed_prompt(object_frames: np.ndarray, object_id: int, prompt_with: str) -> SlicePrompt:
    areas = object_frames.reshape(len(object_frames), -1).sum(axis=1)
    slice_index = int(np.argmax(areas))
    mask = object_frames[slice_index]
    rows, cols = np.nonzero(mask)
    box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], np.float32)
    if prompt_with == "mask" or box[2] == box[0] or box[3] == box[1]:
        return SlicePrompt(object_id, slice_index, mask=mask.copy())
    return SlicePrompt(object_id, slice_index, box=box)


def _check_in_volume(prompt: SlicePrompt, num_slices: int, slice_shape: tuple[int, int]) -> None:
    where = f"object {prompt.object_id} on slice {prompt.slice_index}"
    if not 0 <= prompt.slice_index < num_slices:
        raise PromptError(f"{where}: the slice is outside the volume (0..{num_slices - 1}); choose a slice inside it")
    height, width = slice_shape
    if prompt.points is not None and not _xy_inside(prompt.points, width, height):
        raise PromptError(f"{where}: a point lies outside the {width}x{height} slice; give points inside the image")
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        if not _xy_inside(prompt.box.reshape(2, 2), width, height):
            raise PromptError(f"{where}: box {prompt.box.tolist()} reaches outside the {width}x{height} slice; "
                              "keep it inside")
        if x1 <= x0 or y1 <= y0:
            raise PromptError(f"{where}: box {prompt.box.tolist()} has zero area; "
                              "give two opposite corners of the object")
    if prompt.mask is not None and (prompt.mask.shape != slice_shape or not prompt.mask.any()):
        raise PromptError(f"{where}: the mask is empty or not {height}x{width}; give a mask on the slice's grid")


def _xy_inside(xy: np.ndarray, width: int, height: int) -> bool:
    # Voxel centres are whole numbers; half a voxel of slack admits world coordinates on the edge.
    return bool(np.all((xy >= -0.5) & (xy <= np.array([width, height]) - 0.5)))


def _check_inside(volume: Volume, canonical: np.ndarray, given: np.ndarray, space: str, what: str) -> None:
    inside = (canonical >= -0.5) & (canonical <= np.array(volume.shape) - 0.5)
    outside = np.nonzero(~inside.all(axis=1))[0]
    if outside.size:
        row = outside[0]
        grid = "x".join(str(n) for n in (volume.original_shape[:3] if space == "voxel" else volume.shape))
        raise PromptError(
            f"{what} {given[row].tolist()} ({space}) lies outside the volume (voxel grid {grid}); "
            "give coordinates inside the image"
        )


def _merge(first: SlicePrompt, second: SlicePrompt) -> SlicePrompt:
    where = f"object {first.object_id} on slice {first.slice_index}"
    if first.box is not None and second.box is not None:
        raise PromptError(f"{where}: two boxes on one slice; give one box per slice")
    if first.mask is not None or second.mask is not None:
        raise PromptError(f"{where}: a mask cannot be combined with other prompts on its slice; use one")
    points = [p for p in (first.points, second.points) if p is not None]
    labels = [p for p in (first.point_labels, second.point_labels) if p is not None]
    return dataclasses.replace(
        first,
        points=np.concatenate(points) if points else None,
        point_labels=np.concatenate(labels) if labels else None,
        box=first.box if first.box is not None else second.box,
    )


def _scaled(prompt: SlicePrompt, scale: np.ndarray, image_size: int) -> SlicePrompt:
    from medsam2_jax.volumes import intensity

    mask = None
    if prompt.mask is not None:
        resized = intensity.probabilities_to_slices(prompt.mask[None].astype(np.float32), (image_size, image_size))
        mask = resized[0] > 0.5
    return dataclasses.replace(
        prompt,
        points=None if prompt.points is None else prompt.points * scale,
        box=None if prompt.box is None else prompt.box * np.tile(scale, 2),
        mask=mask,
    )


def _in_plane_xy(canonical: np.ndarray, axis: int) -> np.ndarray:
    """Canonical (N, 3) -> slice (N, 2) as (x = column, y = row)."""
    row_axis, col_axis = (a for a in range(3) if a != axis)
    return np.stack([canonical[:, col_axis], canonical[:, row_axis]], axis=1)


def _as_coordinates(values, shape: tuple[int, int], what: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise PromptError(f"{what}: expected numbers shaped like {_shape_text(shape)}, got {values!r}") from error
    if array.ndim != 2 or array.shape[1] != 3 or shape[0] not in (-1, array.shape[0]):
        raise PromptError(f"{what}: expected numbers shaped like {_shape_text(shape)}, got {values!r}")
    if not np.isfinite(array).all():
        raise PromptError(f"{what}: coordinates must be finite numbers, got {values!r}")
    return array


def _shape_text(shape: tuple[int, int]) -> str:
    return "[[x, y, z], ...]" if shape[0] == -1 else "[[x0, y0, z0], [x1, y1, z1]]"


def _object_id(entry: Mapping) -> int:
    object_id = entry.get("id") if isinstance(entry, Mapping) else None
    if isinstance(object_id, bool) or not isinstance(object_id, int) or not 1 <= object_id <= MAX_OBJECT_ID:
        raise PromptError(f"each object needs an integer 'id' from 1 to {MAX_OBJECT_ID} (its label value), "
                          f"got {entry!r}")
    return object_id


def axis_name(axis: int) -> str:
    return {v: k for k, v in AXES.items()}[axis]


def _slice_prompt_json(prompt: SlicePrompt) -> dict:
    entry = {"object_id": prompt.object_id, "slice_index": prompt.slice_index}
    if prompt.points is not None:
        entry["points"] = prompt.points.tolist()
        entry["point_labels"] = prompt.point_labels.tolist()
    if prompt.box is not None:
        entry["box"] = prompt.box.tolist()
    if prompt.mask is not None:
        rows, cols = np.nonzero(prompt.mask)
        entry["mask"] = {"pixels": int(rows.size),
                         "bbox": [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]}
    return entry

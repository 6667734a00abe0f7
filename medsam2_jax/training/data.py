"""grain input: a manifest of image/label volumes -> batches of clips of T consecutive slices.

Pipeline (per host, deterministic given the seed):
  manifest entries -> this host's share (ShardOptions(process_index, process_count))
  -> shuffle (reshuffled every epoch) -> repeat -> sample a clip (random_map: the per-record rng
  grain derives from the seed and the record index) -> drop bad records -> batch.
The iterator's state is a small dict (`get_state()`) that checkpointing.py saves with the model.

A clip: pick the slice axis (config or random), an anchor object, a start slice where the anchor
appears (so the first frame can be a conditioning frame), T consecutive slices, and up to N
objects present in the first frame (with `max_slice_stride` > 1, every k-th slice for a k drawn per
clip); then one affine per clip (resize to S x S, flips, rotation,
scale, shift) and an intensity jitter. Record layout (numpy, batched with a leading B):
  image         (T, S, S)     float32 in [0, 1] (grey; the train step makes RGB + normalises)
  masks         (T, N, S, S)  uint8 {0, 1}
  object_valid  (N,)          bool, False for padding objects
  object_ids    (N,)          int32 label values (0 for padding)
  entry, axis, start, stride  int32: manifest line index, slice axis, first slice, slices between frames

Bad entries (a garbage manifest line, a missing or unreadable file, a label grid that does not
match its image, no labelled voxels, too few slices) raise `DataError` naming the file, or with
`on_bad_record="skip"` are logged as a warning and skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import math
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from medsam2_jax.training.prompts import PromptConfig, simulate_prompts
from medsam2_jax.volumes import intensity
from medsam2_jax.volumes.io import VolumeError, load_label_volume, load_volume, loads_json

log = logging.getLogger(__name__)

AXIS_NAMES = {"sagittal": 0, "coronal": 1, "axial": 2}


class DataError(ValueError):
    """A manifest entry that cannot become a training clip; the message names the file."""


# ----------------------------------------------------------------------------------------------
# Manifest


@dataclasses.dataclass(frozen=True)
class Entry:
    """One image/label pair. `objects` restricts the label values used (empty = all non-zero)."""

    index: int
    image: str
    label: str
    objects: tuple[int, ...] = ()
    axis: int | None = None  # overrides the config's slice axis
    window: str | None = None  # a CT window name (intensity.CT_WINDOWS); None = percentile clip


def _parse_axis(value, where: str) -> int | None:
    if value in (None, ""):
        return None
    if isinstance(value, str) and value.lower() in AXIS_NAMES:
        return AXIS_NAMES[value.lower()]
    try:
        axis = int(value) if not isinstance(value, float) or value.is_integer() else -1
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        axis = -1
    if axis not in (0, 1, 2):
        raise DataError(f"{where}: axis {value!r} is not 0, 1, 2, sagittal, coronal or axial")
    return axis


def _parse_window(value, where: str) -> str | None:
    if value in (None, ""):
        return None
    if isinstance(value, str) and value in intensity.CT_WINDOWS:
        return value
    raise DataError(f"{where}: window {value!r} is not one of {', '.join(intensity.CT_WINDOWS)}")


def _entry(index: int, fields: dict, base: Path, where: str) -> Entry:
    if not isinstance(fields, dict):
        raise DataError(f"{where}: expected an object with 'image' and 'label', got {type(fields).__name__}")
    missing = [k for k in ("image", "label") if not fields.get(k)]
    if missing:
        raise DataError(f"{where}: missing {' and '.join(missing)}; each entry needs an image and a label path")
    not_paths = [k for k in ("image", "label") if not isinstance(fields[k], str)]
    if not_paths:
        raise DataError(f"{where}: {not_paths[0]} {fields[not_paths[0]]!r} is not a path; "
                        "give the file's path as a string")
    objects = fields.get("objects") or ()
    if isinstance(objects, str):
        objects = [o for o in objects.replace(";", " ").split() if o]
    try:
        objects = tuple(int(o) for o in objects)
    except (TypeError, ValueError):
        raise DataError(f"{where}: objects {fields.get('objects')!r} must be whole label values") from None

    def resolve(p):
        return str(p if Path(p).is_absolute() else base / p)

    return Entry(index=index, image=resolve(fields["image"]), label=resolve(fields["label"]), objects=objects,
                 axis=_parse_axis(fields.get("axis"), where), window=_parse_window(fields.get("window"), where))


_warned: set[str] = set()


def _bad(message: str, on_bad_record: str) -> None:
    if on_bad_record == "raise":
        raise DataError(message)
    if message not in _warned:  # a bad entry comes back every epoch; say so once per process
        _warned.add(message)
        log.warning("skipping bad record: %s", message)


def read_manifest(path, on_bad_record: str = "raise") -> list[Entry]:
    """JSONL (one object per line) or CSV (header with image,label[,objects,axis,window]).

    Relative paths are relative to the manifest's folder. Blank lines and lines starting with
    '#' are ignored. Files are not opened here; that happens when a clip is read.
    """
    if on_bad_record not in ("raise", "skip"):
        raise ValueError(f"on_bad_record must be 'raise' or 'skip', got {on_bad_record!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest file")
    base = path.parent
    rows: list[tuple[str, Any]] = []
    try:
        text = path.read_text()
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not text (byte {error.start} is not UTF-8); "
                        "a manifest is JSONL or CSV text") from None
    if path.suffix.lower() == ".csv":
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        reader = csv.DictReader(lines)
        if not reader.fieldnames or not {"image", "label"} <= {f.strip() for f in reader.fieldnames}:
            raise DataError(f"{path}: the CSV header must name 'image' and 'label' columns")
        for n, row in enumerate(reader, start=2):
            rows.append((f"{path}:{n}", {k.strip(): (v or "").strip() for k, v in row.items() if k}))
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                rows.append((f"{path}:{n}", loads_json(line)))
            except ValueError as error:  # json.JSONDecodeError, or NaN / Infinity
                reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
                rows.append((f"{path}:{n}", DataError(f"{path}:{n}: not valid JSON ({reason}): {line[:60]!r}")))
    entries = []
    for where, fields in rows:
        try:
            if isinstance(fields, DataError):
                raise fields
            entries.append(_entry(len(entries), fields, base, where))
        except DataError as error:
            _bad(str(error), on_bad_record)
    if not entries:
        raise DataError(f"{path}: no usable entries")
    return entries


# ----------------------------------------------------------------------------------------------
# Reading a pair


def load_pair(entry: Entry) -> tuple[np.ndarray, np.ndarray]:
    """(image in [0, 1], integer labels), both (X, Y, Z) in canonical RAS order on one grid.

    The last few pairs read stay in memory (read-only arrays), keyed by path, size and mtime:
    a small manifest is read from disk once, not once per clip."""
    def stamp(path):
        try:
            st = os.stat(path)
            return (st.st_size, st.st_mtime_ns)
        except OSError:
            return None
    return _load_pair_cached(entry.image, stamp(entry.image), entry.label, stamp(entry.label), entry.window)


@functools.lru_cache(maxsize=8)  # ~40 MB per 1 mm brain; a CT of 512 x 512 x 300 is ~470 MB
def _load_pair_cached(image: str, _image_stamp, label: str, _label_stamp, window: str | None):
    try:
        volume = load_volume(image)
        labels = load_label_volume(label, volume)
        unit = intensity.to_unit_range(volume.array, window=window)
    except (VolumeError, ValueError) as error:
        raise DataError(str(error)) from None
    unit.flags.writeable = False
    labels.flags.writeable = False
    return unit, labels


# ----------------------------------------------------------------------------------------------
# Clip sampling and augmentation


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    clip_length: int = 8
    objects_per_clip: int = 3
    image_size: int = 512
    slice_axis: int | str = "random"
    hflip_prob: float = 0.5
    vflip_prob: float = 0.0
    rotate_degrees: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    translate_fraction: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.2
    gamma: float = 0.2
    slice_flip_prob: float = 0.0  # reverse the slice order, so clips are tracked in both directions
    exit_prob: float = 0.0  # start near the anchor's last slice, so the clip runs past its end
    max_slice_stride: int = 1  # frames are every k-th slice, k drawn from 1..max_slice_stride per clip
    # Prompt-centred windows (what `segment_volume(crop=...)` shows the model): with probability
    # crop_prob the clip is the square window centred on the anchor's first-frame bounding box,
    # a factor drawn from crop_factor times its longer side (at least crop_min_side pixels).
    crop_prob: float = 0.0
    crop_factor: tuple[float, float] = (2.5, 4.0)
    crop_min_side: float = 32.0

    @classmethod
    def from_config(cls, data_config) -> ClipConfig:
        a = data_config.augment
        return cls(clip_length=data_config.clip_length, objects_per_clip=data_config.objects_per_clip,
                   image_size=data_config.image_size, slice_axis=data_config.slice_axis,
                   hflip_prob=a.hflip_prob, vflip_prob=a.vflip_prob, rotate_degrees=a.rotate_degrees,
                   scale_range=tuple(a.scale_range), translate_fraction=a.translate_fraction,
                   brightness=a.brightness, contrast=a.contrast, gamma=a.gamma,
                   slice_flip_prob=a.get("slice_flip_prob", 0.0), exit_prob=data_config.get("exit_prob", 0.0),
                   max_slice_stride=data_config.get("max_slice_stride", 1),
                   crop_prob=data_config.get("crop_prob", 0.0),
                   crop_factor=tuple(data_config.get("crop_factor", (2.5, 4.0))),
                   crop_min_side=data_config.get("crop_min_side", 32.0))

    def without_augmentation(self) -> ClipConfig:
        return dataclasses.replace(self, **NO_AUGMENTATION)


# The augmentation settings that leave a clip as sampled (ClipConfig fields and config.data.augment keys).
NO_AUGMENTATION = dict(hflip_prob=0.0, vflip_prob=0.0, rotate_degrees=0.0, scale_range=(1.0, 1.0),
                       translate_fraction=0.0, brightness=0.0, contrast=0.0, gamma=0.0, slice_flip_prob=0.0)


def _output_to_input(rng: np.random.Generator, in_shape: tuple[int, int], size: int, cfg: ClipConfig,
                     window: tuple[float, float, float] | None = None) -> np.ndarray:
    """3x3 map from output pixel centres (row, col) to input coordinates: square resize, then
    flips, rotation, scale and shift about the slice centre (drawn once per clip). `window`
    (row, col, side): the square region around (row, col) takes the slice's place."""
    h, w = in_shape
    centre_out = np.array([size / 2.0, size / 2.0])
    centre_in = np.array([h / 2.0, w / 2.0])
    if window is not None:
        centre_in = np.array(window[:2]) + 0.5  # pixel centres sit at index + 0.5
        h = w = window[2]
    flip = np.diag([-1.0 if rng.random() < cfg.vflip_prob else 1.0, -1.0 if rng.random() < cfg.hflip_prob else 1.0])
    angle = math.radians(rng.uniform(-cfg.rotate_degrees, cfg.rotate_degrees))
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    zoom = rng.uniform(*cfg.scale_range)
    shift = rng.uniform(-cfg.translate_fraction, cfg.translate_fraction, size=2) * np.array([h, w])
    resize = np.diag([h / size, w / size])
    linear = resize @ rotation @ flip / zoom
    offset = centre_in + shift - linear @ centre_out
    m = np.eye(3)
    m[:2, :2], m[:2, 2] = linear, offset
    return m


def _sample_coords(m: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    centres = np.arange(size) + 0.5
    rr, cc = np.meshgrid(centres, centres, indexing="ij")
    r = m[0, 0] * rr + m[0, 1] * cc + m[0, 2] - 0.5
    c = m[1, 0] * rr + m[1, 1] * cc + m[1, 2] - 0.5
    return r, c


def warp_bilinear(frames: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """(T, H, W) -> (T, S, S) sampled at m(output pixel centres); zero outside."""
    _, h, w = frames.shape
    r, c = _sample_coords(m, size)
    r0, c0 = np.floor(r).astype(np.int64), np.floor(c).astype(np.int64)
    fr, fc = (r - r0).astype(np.float32), (c - c0).astype(np.float32)
    out = np.zeros((frames.shape[0], size, size), np.float32)
    for dr, dc, weight in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        rows, cols = r0 + dr, c0 + dc
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        values = frames[:, np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)]
        out += values * (weight * inside)[None]
    return out


def warp_nearest(frames: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """(T, H, W) integer labels -> (T, S, S) by nearest neighbour; 0 outside."""
    _, h, w = frames.shape
    r, c = _sample_coords(m, size)
    rows, cols = np.floor(r + 0.5).astype(np.int64), np.floor(c + 0.5).astype(np.int64)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    out = frames[:, np.clip(rows, 0, h - 1), np.clip(cols, 0, w - 1)]
    return np.where(inside[None], out, 0)


def _jitter_intensity(rng: np.random.Generator, image: np.ndarray, cfg: ClipConfig) -> np.ndarray:
    gamma = math.exp(rng.uniform(-cfg.gamma, cfg.gamma))
    contrast = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
    brightness = rng.uniform(-cfg.brightness, cfg.brightness)
    image = np.clip(image, 0.0, 1.0) ** gamma
    mean = image.mean()
    return np.clip((image - mean) * contrast + mean + brightness, 0.0, 1.0).astype(np.float32)


def _label_ids(labels: np.ndarray) -> np.ndarray:
    """The nonzero labels present, sorted (np.unique's answer; a count is 10x faster on a volume)."""
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi < 1 << 16:
        ids = np.flatnonzero(np.bincount(labels.ravel(), minlength=hi + 1))
    else:
        ids = np.unique(labels)
    return ids[ids != 0].astype(labels.dtype)


def sample_clip(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, cfg: ClipConfig, *,
                objects: Sequence[int] = (), axis: int | None = None, where: str = "") -> dict:
    """One training clip from a unit-range volume and its label volume (see the module doc)."""
    t, n = cfg.clip_length, cfg.objects_per_clip
    if axis is None:
        axis = int(rng.integers(3)) if cfg.slice_axis == "random" else int(cfg.slice_axis)
    ids = _label_ids(labels)
    if objects:
        ids = ids[np.isin(ids, np.asarray(objects))]
    if ids.size == 0:
        raise DataError(f"{where}: no labelled voxels{' of objects ' + str(list(objects)) if objects else ''}")
    depth = labels.shape[axis]
    if depth < t:
        raise DataError(f"{where}: {depth} slices along axis {axis}, fewer than the clip length {t}")
    other_axes = tuple(a for a in range(3) if a != axis)
    if cfg.slice_flip_prob > 0 and rng.random() < cfg.slice_flip_prob:
        image, labels = np.flip(image, axis), np.flip(labels, axis)  # `start` then counts from the far end
    anchor = ids[rng.integers(ids.size)]
    # Frames every `stride` slices (thicker slices, larger changes between frames); drawn only
    # when allowed, so clips of the default stride 1 consume the same random numbers as before.
    stride = 1
    if cfg.max_slice_stride > 1:
        stride = int(rng.integers(1, min(cfg.max_slice_stride, (depth - 1) // max(t - 1, 1)) + 1))
    span = (t - 1) * stride + 1  # slices covered by the clip
    present = np.flatnonzero(np.any(labels == anchor, axis=other_axes))
    starts = present[present <= depth - span]
    if cfg.exit_prob > 0 and rng.random() < cfg.exit_prob:
        # Starts from which the clip's last frame lies past the anchor's last slice.
        exits = starts[starts > present.max() - span + 1]
        starts = exits if exits.size else starts
    start = int(rng.choice(starts)) if starts.size else int(min(rng.choice(present), depth - span))
    frames = start + stride * np.arange(t)
    image_clip = np.moveaxis(np.take(image, frames, axis=axis), axis, 0)
    label_clip = np.moveaxis(np.take(labels, frames, axis=axis), axis, 0)
    in_first = np.intersect1d(np.unique(label_clip[0]), ids)
    others = in_first[in_first != anchor]
    chosen = [anchor] + list(rng.permutation(others)[: n - 1]) if n > 1 else [anchor]
    window = None
    if cfg.crop_prob > 0 and rng.random() < cfg.crop_prob:
        rows, cols = np.nonzero(label_clip[0] == anchor)
        if rows.size:  # (a clip of a too-short volume may start where the anchor is not)
            side = max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) * rng.uniform(*cfg.crop_factor)
            window = ((rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2, max(side, cfg.crop_min_side))
    m = _output_to_input(rng, label_clip.shape[1:], cfg.image_size, cfg, window)
    warped_image = _jitter_intensity(rng, warp_bilinear(image_clip.astype(np.float32), m, cfg.image_size), cfg)
    warped_labels = warp_nearest(label_clip, m, cfg.image_size)
    object_ids = np.zeros((n,), np.int32)
    object_ids[: len(chosen)] = chosen
    valid = np.arange(n) < len(chosen)
    masks = (warped_labels[:, None] == object_ids[None, :, None, None]) & valid[None, :, None, None]
    return {
        "image": warped_image,
        "masks": masks.astype(np.uint8),
        "object_valid": valid,
        "object_ids": object_ids,
        "axis": np.int32(axis),
        "start": np.int32(start),
        "stride": np.int32(stride),
    }


class ClipSampler(grain.transforms.RandomMap):
    """Reads one manifest entry and samples a clip from it with the record's own rng."""

    def __init__(self, cfg: ClipConfig, on_bad_record: str = "raise", prompt_config=None,
                 max_consecutive_failures: int = 64):
        self.cfg = cfg
        self.on_bad_record = on_bad_record
        self.prompt_config = prompt_config  # prompts.PromptConfig: add simulated prompts
        self.max_consecutive_failures = max_consecutive_failures
        self._lock = threading.Lock()
        self._failures = 0

    def __getstate__(self):  # grain workers get a copy without the lock
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def random_map(self, entry: Entry, rng: np.random.Generator):
        try:
            image, labels = load_pair(entry)
            clip = sample_clip(image, labels, rng, self.cfg, objects=entry.objects, axis=entry.axis,
                               where=f"{entry.label} (image {entry.image})")
        except DataError as error:
            _bad(str(error), self.on_bad_record)
            with self._lock:
                self._failures += 1
                failures = self._failures
            if failures >= self.max_consecutive_failures:
                # Skipping must not become an endless loop over a manifest with no usable entry.
                raise DataError(f"{failures} records in a row could not be read (the last: {error}); "
                                "check the manifest's paths (relative ones are relative to the manifest's "
                                "folder)") from None
            return None  # grain drops None records
        with self._lock:
            self._failures = 0
        clip["entry"] = np.int32(entry.index)
        if self.prompt_config is not None:
            clip.update(simulate_prompts(clip["masks"], rng, self.prompt_config))
        return clip


# ----------------------------------------------------------------------------------------------
# The dataset


def shard_entries(entries: Sequence[Entry], shard: grain.sharding.ShardOptions) -> list[Entry]:
    """This host's entries: every shard_count-th from shard_index (disjoint over hosts); with
    drop_remainder every host gets the same number."""
    mine = list(entries[shard.shard_index :: shard.shard_count])
    if shard.drop_remainder:
        mine = mine[: len(entries) // shard.shard_count]
    if not mine:
        raise DataError(f"host {shard.shard_index} of {shard.shard_count} gets no manifest entries; add entries")
    return mine


def make_dataset(entries: Sequence[Entry], data_config, *, batch_size: int, seed: int,
                 shard: grain.sharding.ShardOptions | None = None, prompt_config=None) -> grain.IterDataset:
    """The per-host IterDataset of batches (`batch_size` = this host's clips per step); with a
    `prompt_config` (prompts.PromptConfig) each clip also carries its simulated prompts."""
    if shard is None:  # ShardOptions(jax.process_index(), jax.process_count())
        shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    num_epochs = data_config.num_epochs
    # One seed per host: with the plain seed, record k of every host would draw the same anchor
    # choice, flips and jitter.
    host_seed = int(np.random.SeedSequence([seed, shard.shard_index]).generate_state(1)[0])
    entries = shard_entries(entries, shard)
    ds = grain.MapDataset.source(entries).seed(host_seed)
    ds = ds.shuffle().repeat(None if num_epochs < 0 else num_epochs)
    # Skip mode gives up once every entry of two epochs' worth in a row has failed.
    sampler = ClipSampler(ClipConfig.from_config(data_config), data_config.on_bad_record, prompt_config,
                          max_consecutive_failures=max(2 * len(entries), 8))
    ds = ds.random_map(sampler)
    # Bounded read-ahead: grain's default (hundreds of records) would hold that many volumes.
    read = grain.ReadOptions(num_threads=data_config.read_threads, prefetch_buffer_size=data_config.prefetch_buffer)
    batches = ds.to_iter_dataset(read).batch(batch_size, drop_remainder=True)
    if data_config.worker_count > 0:
        # grain's workers read absl flags, which only an absl.app program has parsed: without this,
        # any worker_count > 0 failed with UnparsedFlagAccessError on the first batch.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_config.worker_count))
    return batches


def dataset_from_config(config, *, batch_size: int | None = None, shard=None, manifest=None,
                        data_config=None) -> grain.IterDataset:
    """`config` from configs/train.py; `batch_size` defaults to this host's share of the global
    one. Clips carry simulated prompts (config.prompts). `manifest`/`data_config` override
    config.data's (the validation set)."""
    from medsam2_jax.training.sharding import local_batch_size

    data_config = config.data if data_config is None else data_config
    entries = read_manifest(manifest or data_config.manifest, data_config.on_bad_record)
    if batch_size is None:
        batch_size = local_batch_size(config.batch_size)
    prompt_config = PromptConfig.from_config(config.prompts) if "prompts" in config else None
    return make_dataset(entries, data_config, batch_size=batch_size, seed=config.seed, shard=shard,
                        prompt_config=prompt_config)

"""grain input: manifests, clip sampling geometry, determinism, per-host shards, bad records."""

import dataclasses
import json
import logging
from pathlib import Path

import grain
import nibabel as nib
import numpy as np
import pytest

from medsam2_jax.configs.train import get_config
from medsam2_jax.training import data

SHAPE = (20, 24, 24)  # axis 0 has square 24 x 24 slices
AAL = Path("/usr/share/mricron/templates/aal.nii.gz")
CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")


def _write_pair(folder: Path, i: int, label_shape=SHAPE):
    rng = np.random.default_rng(i)
    image = rng.normal(100, 20, SHAPE).astype(np.float32)
    labels = np.zeros(label_shape, np.int16)
    labels[4:14, 5:12, 6:15] = 1
    labels[8:18, 12:20, 3:10] = 7
    nib.save(nib.Nifti1Image(image, np.eye(4)), folder / f"image{i}.nii.gz")
    nib.save(nib.Nifti1Image(labels, np.eye(4)), folder / f"label{i}.nii.gz")
    return {"image": f"image{i}.nii.gz", "label": f"label{i}.nii.gz"}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("volumes")
    entries = [_write_pair(folder, i) for i in range(6)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    return folder


def _config(manifest, **data_overrides):
    c = get_config("test")
    c.data.manifest = str(manifest)
    c.data.image_size = 32
    for k, v in data_overrides.items():
        setattr(c.data, k, v)
    return c


def _batches(config, n, shard=None, seed=None):
    shard = shard or grain.sharding.ShardOptions(0, 1)
    if seed is not None:
        config.seed = seed
    it = iter(data.dataset_from_config(config, batch_size=2, shard=shard))
    return [next(it) for _ in range(n)], it


def test_batch_layout(volumes):
    (batch,), _ = _batches(_config(volumes / "train.jsonl"), 1)
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].dtype == np.float32
    assert batch["masks"].shape == (2, 3, 2, 32, 32) and batch["masks"].dtype == np.uint8
    # The anchor object is always there; a second one only if it shows in the first frame.
    assert batch["object_valid"][:, 0].all() and set(batch["object_ids"][batch["object_valid"]]) <= {1, 7}
    assert not batch["object_ids"][~batch["object_valid"]].any()
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_same_seed_same_batches_other_seed_differs(volumes):
    first, _ = _batches(_config(volumes / "train.jsonl"), 4, seed=1)
    again, _ = _batches(_config(volumes / "train.jsonl"), 4, seed=1)
    other, _ = _batches(_config(volumes / "train.jsonl"), 4, seed=2)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))


def test_grain_workers_give_the_same_batches(volumes):
    """data.worker_count > 0 (grain worker processes) outside an absl program, same records."""
    inline, _ = _batches(_config(volumes / "train.jsonl"), 2, seed=3)
    workers, it = _batches(_config(volumes / "train.jsonl", worker_count=1), 2, seed=3)
    it.close()
    for a, b in zip(inline, workers):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_iterator_state_resumes_same_batches(volumes):
    _, it = _batches(_config(volumes / "train.jsonl"), 2)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    fresh = iter(data.dataset_from_config(_config(volumes / "train.jsonl"), batch_size=2,
                                          shard=grain.sharding.ShardOptions(0, 1)))
    fresh.set_state(state)
    for a in expected:
        np.testing.assert_array_equal(a["image"], next(fresh)["image"])


def test_hosts_read_disjoint_entries(volumes):
    entries = data.read_manifest(volumes / "train.jsonl")
    shards = [data.shard_entries(entries, grain.sharding.ShardOptions(i, 2, drop_remainder=True)) for i in range(2)]
    indices = [{e.index for e in s} for s in shards]
    assert not indices[0] & indices[1] and indices[0] | indices[1] == set(range(6))
    config = _config(volumes / "train.jsonl")
    for i in range(2):
        batches, _ = _batches(config, 4, shard=grain.sharding.ShardOptions(i, 2, drop_remainder=True))
        seen = {int(e) for b in batches for e in b["entry"]}
        assert seen <= indices[i]


def test_csv_manifest(volumes, tmp_path):
    lines = ["image,label,axis,objects"] + [f"{volumes}/image{i}.nii.gz,{volumes}/label{i}.nii.gz,axial,7"
                                            for i in range(2)]
    (tmp_path / "m.csv").write_text("\n".join(lines))
    entries = data.read_manifest(tmp_path / "m.csv")
    assert [(e.axis, e.objects) for e in entries] == [(2, (7,)), (2, (7,))]
    (batch,), _ = _batches(_config(tmp_path / "m.csv"), 1)
    assert (batch["axis"] == 2).all() and set(batch["object_ids"][:, 0]) == {7}
    assert not batch["object_valid"][:, 1].any() and not batch["masks"][:, :, 1].any()


def test_clip_geometry_without_and_with_flip():
    rng = np.random.default_rng(0)
    image = rng.uniform(size=SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, np.int32)
    labels[5:12, 2:9, 10:20] = 3
    cfg = data.ClipConfig(clip_length=4, objects_per_clip=2, image_size=24, slice_axis=0).without_augmentation()
    clip = data.sample_clip(image, labels, np.random.default_rng(1), cfg)
    start = int(clip["start"])
    assert 5 <= start <= 11  # the object is in the first frame
    np.testing.assert_allclose(clip["image"], image[start:start + 4], atol=1e-6)
    np.testing.assert_array_equal(clip["masks"][:, 0], labels[start:start + 4] == 3)
    assert clip["masks"][0, 0].any() and list(clip["object_valid"]) == [True, False]

    flipped = data.sample_clip(image, labels, np.random.default_rng(1), cfg.__class__(
        **{**cfg.__dict__, "hflip_prob": 1.0}))
    assert int(flipped["start"]) == start
    np.testing.assert_allclose(flipped["image"], image[start:start + 4, :, ::-1], atol=1e-6)


def test_slice_flip_tracks_the_other_way():
    """slice_flip_prob=1: the clip runs through the volume in decreasing slice order, still
    starting on a slice where the anchor object appears."""
    rng = np.random.default_rng(0)
    image = rng.uniform(size=SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, np.int32)
    labels[5:12, 2:9, 10:20] = 3
    cfg = data.ClipConfig(clip_length=4, objects_per_clip=1, image_size=24, slice_axis=0).without_augmentation()
    clip = data.sample_clip(image, labels, np.random.default_rng(1), dataclasses.replace(cfg, slice_flip_prob=1.0))
    first = SHAPE[0] - 1 - int(clip["start"])  # the first frame's slice in the volume's own order
    np.testing.assert_allclose(clip["image"], image[first - 3 : first + 1][::-1], atol=1e-6)
    np.testing.assert_array_equal(clip["masks"][:, 0], labels[first - 3 : first + 1][::-1] == 3)
    assert clip["masks"][0, 0].any()


def test_exit_prob_runs_clips_past_the_object_end():
    """exit_prob=1: every clip starts on the object and ends past its last slice, in either
    tracking direction; exit_prob=0 draws starts over the whole object."""
    rng = np.random.default_rng(0)
    image = rng.uniform(size=SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, np.int32)
    labels[2:12, 2:9, 10:20] = 3  # slices 2..11 along axis 0
    cfg = data.ClipConfig(clip_length=4, objects_per_clip=1, image_size=24, slice_axis=0).without_augmentation()
    for flip in (0.0, 1.0):
        exiting = dataclasses.replace(cfg, exit_prob=1.0, slice_flip_prob=flip)
        for seed in range(12):
            masks = data.sample_clip(image, labels, np.random.default_rng(seed), exiting)["masks"][:, 0]
            assert masks[0].any() and not masks[-1].any()
    # Without it, starts come from the whole object (slices 2..11), not only its last three (9..11).
    starts = {int(data.sample_clip(image, labels, np.random.default_rng(s), cfg)["start"]) for s in range(40)}
    assert starts <= set(range(2, 12)) and len(starts - {9, 10, 11}) >= 5


def test_slice_stride_takes_every_kth_slice_and_still_exits():
    """max_slice_stride=3: frames are every k-th slice for a k in 1..3 (all three drawn), the image
    and labels follow the same slices, and exit clips still end past the object."""
    rng = np.random.default_rng(0)
    image = rng.uniform(size=SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, np.int32)
    labels[2:12, 2:9, 10:20] = 3
    cfg = data.ClipConfig(clip_length=3, objects_per_clip=1, image_size=24, slice_axis=0).without_augmentation()
    strided = dataclasses.replace(cfg, max_slice_stride=3)
    seen = set()
    for seed in range(30):
        clip = data.sample_clip(image, labels, np.random.default_rng(seed), strided)
        k, start = int(clip["stride"]), int(clip["start"])
        seen.add(k)
        np.testing.assert_allclose(clip["image"], image[start : start + 2 * k + 1 : k], atol=1e-6)
        np.testing.assert_array_equal(clip["masks"][:, 0], labels[start : start + 2 * k + 1 : k] == 3)
    assert seen == {1, 2, 3}
    exiting = dataclasses.replace(strided, exit_prob=1.0)
    for seed in range(12):
        masks = data.sample_clip(image, labels, np.random.default_rng(seed), exiting)["masks"][:, 0]
        assert masks[0].any() and not masks[-1].any()


def test_crop_prob_centres_the_window_on_the_anchor_box():
    """crop_prob=1: the clip is the square around the anchor's first-frame box, crop_factor x its
    longer side (what `segment --crop` shows the model), image and labels on the same window;
    crop_prob=0 leaves the whole slice."""
    image = np.zeros((40, 64, 64), np.float32)
    labels = np.zeros((40, 64, 64), np.int32)
    labels[5:30, 20:28, 30:34] = 4  # 8 x 4 px on every slice
    image[labels == 4] = 1.0
    cfg = data.ClipConfig(clip_length=2, objects_per_clip=1, image_size=48, slice_axis=0).without_augmentation()
    cropped = dataclasses.replace(cfg, crop_prob=1.0, crop_factor=(3.0, 3.0), crop_min_side=0.0)
    for seed in range(4):
        clip = data.sample_clip(image, labels, np.random.default_rng(seed), cropped)
        rows, cols = np.nonzero(clip["masks"][0, 0])
        # The window is 24 px a side -> 48 px: the box becomes 16 x 8 px, in the middle.
        assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (16, 8)
        assert (rows.min() + rows.max() + 1) / 2 == pytest.approx(24, abs=1)
        assert (cols.min() + cols.max() + 1) / 2 == pytest.approx(24, abs=1)
        np.testing.assert_array_equal(clip["image"][0] > 0.5, clip["masks"][0, 0] == 1)
    whole = data.sample_clip(image, labels, np.random.default_rng(0), cfg)["masks"][0, 0]
    assert whole.sum() == 6 * 3  # 64 px -> 48 px: the box shrinks to 6 x 3


def test_skip_mode_gives_up_when_nothing_reads(tmp_path):
    """Skip mode over a manifest whose every entry fails stops with a clear error instead of
    searching for a good record forever."""
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "gone.nii.gz", "label": "gone.nii.gz"}) + "\n")
    with pytest.raises(data.DataError, match=r"in a row could not be read .*gone\.nii\.gz"):
        _batches(_config(tmp_path / "m.jsonl", on_bad_record="skip"), 1)


def test_augmented_clip_keeps_labels_with_image():
    image = np.zeros(SHAPE, np.float32)
    labels = np.zeros(SHAPE, np.int32)
    labels[:, 6:18, 8:14] = 2
    image[labels == 2] = 1.0  # the object is the bright region
    cfg = data.ClipConfig(clip_length=3, objects_per_clip=1, image_size=48, slice_axis=0, brightness=0, contrast=0,
                          gamma=0, rotate_degrees=20, hflip_prob=0.5, vflip_prob=0.5)
    for seed in range(5):
        clip = data.sample_clip(image, labels, np.random.default_rng(seed), cfg)
        inside = clip["image"][clip["masks"][:, 0] == 1]
        outside = clip["image"][clip["masks"][:, 0] == 0]
        assert inside.mean() > 0.8 and outside.mean() < 0.1


def test_garbage_line_raises_naming_line(volumes, tmp_path):
    good = (volumes / "train.jsonl").read_text().splitlines()
    (tmp_path / "m.jsonl").write_text("\n".join([good[0], "{not json", json.dumps({"image": "x.nii.gz"})]))
    with pytest.raises(data.DataError, match=r"m\.jsonl:2: not valid JSON"):
        data.read_manifest(tmp_path / "m.jsonl", "raise")


def test_garbage_lines_skipped_with_warning(volumes, tmp_path, caplog):
    good = (volumes / "train.jsonl").read_text().splitlines()
    (tmp_path / "m.jsonl").write_text("\n".join([good[0], "{not json", json.dumps({"image": "x.nii.gz"})]))
    with caplog.at_level(logging.WARNING):
        entries = data.read_manifest(tmp_path / "m.jsonl", "skip")
    assert len(entries) == 1
    assert "m.jsonl:2" in caplog.text and "m.jsonl:3: missing label" in caplog.text


@pytest.mark.parametrize("content, message", [
    (json.dumps({"image": 5.0, "label": "l.nii.gz"}), r"m\.jsonl:1: image 5\.0 is not a path"),  # was a TypeError
    (json.dumps({"image": "i.nii.gz", "label": "l.nii.gz", "window": ["lung"]}), r"window \['lung'\] is not one of"),
    (json.dumps({"image": "i.nii.gz", "label": "l.nii.gz", "window": "liver"}), r"window 'liver' is not one of"),
    (b"\x80 not text", r"not text \(byte 0 is not UTF-8\)"),  # was a UnicodeDecodeError
])
def test_manifest_values_of_the_wrong_kind_raise_one_line(tmp_path, content, message):
    """Found by fuzzing the manifest reader: each input is a DataError, never another exception
    (a window that is no CT window failed only when the first clip was read)."""
    path = tmp_path / "m.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(data.DataError, match=message):
        data.read_manifest(path, "raise")


def _bad_manifest(volumes, tmp_path):
    """Two good entries, a missing file and a label on another grid."""
    _write_pair(tmp_path, 99, label_shape=(20, 24, 23))
    lines = [json.dumps({"image": str(volumes / f"image{i}.nii.gz"), "label": str(volumes / f"label{i}.nii.gz")})
             for i in range(2)]
    lines.append(json.dumps({"image": "missing.nii.gz", "label": "label99.nii.gz"}))
    lines.append(json.dumps({"image": "image99.nii.gz", "label": "label99.nii.gz"}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    return tmp_path / "m.jsonl"


def test_bad_files_raise_naming_the_file(volumes, tmp_path):
    manifest = _bad_manifest(volumes, tmp_path)
    sampler = data.ClipSampler(data.ClipConfig(clip_length=3, objects_per_clip=2, image_size=16), "raise")
    entries = data.read_manifest(manifest, "raise")
    with pytest.raises(data.DataError, match=r"missing\.nii\.gz: no such file"):
        sampler.random_map(entries[2], np.random.default_rng(0))
    with pytest.raises(data.DataError, match=r"label99\.nii\.gz: label grid \(20, 24, 23\) does not match"):
        sampler.random_map(entries[3], np.random.default_rng(0))
    # Through the grain pipeline the job stops with the same message.
    with pytest.raises(Exception, match=r"missing\.nii\.gz|label99\.nii\.gz"):
        _batches(_config(manifest, on_bad_record="raise"), 4)


def test_bad_files_skipped_with_warning(volumes, tmp_path, caplog):
    manifest = _bad_manifest(volumes, tmp_path)
    with caplog.at_level(logging.WARNING):
        batches, _ = _batches(_config(manifest, on_bad_record="skip"), 4)
    assert {int(e) for b in batches for e in b["entry"]} <= {0, 1}
    assert "missing.nii.gz" in caplog.text and "label99.nii.gz" in caplog.text


@pytest.mark.skipif(not (AAL.exists() and CH2.exists()), reason="mricron-data not installed")
def test_real_colin27_with_aal(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": str(CH2), "label": str(AAL), "objects": [37, 38, 71, 72],
                                                  "axis": "axial"}))
    config = _config(tmp_path / "m.jsonl", clip_length=4, objects_per_clip=3)
    (batch,), _ = _batches(config, 1)
    assert batch["image"].shape == (2, 4, 32, 32)
    ids = batch["object_ids"][batch["object_valid"]]
    assert set(ids) <= {37, 38, 71, 72}
    assert batch["masks"][:, 0, 0].reshape(2, -1).any(-1).all()  # the anchor shows in frame 0

"""Fuzzed parsers (issue 16, item 7): whatever a user hands the command line, it either works or is
refused with one line on stderr and exit status 2: never a traceback, never a partial output.

Inputs reach the parsers through `cli.main` in this process. The model is never run: `_model`
gives a one-leaf stand-in and `_run_segmentation` does only the cheap steps before the model
(intensity window, prompt window) and then labels each object on its prompted slices with the real
label rule, so every argument check, every reader and every writer is the shipped code. The
training manifest is read by `read_manifest` itself (the `train` command reads it only after
building the model); its contract is the same: entries, or a `DataError` (one line, exit 2).

Examples per property are bounded (`max_examples`) so the file runs in well under a minute. The
default run is derandomized (the same examples every run, so CI is reproducible); set
MEDSAM2_JAX_FUZZ_EXPLORE=1 to draw new examples each run and look for new failures (a failure found
that way becomes an `@example` here once fixed).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import string
import struct
import warnings
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from medsam2_jax import cli

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                derandomize=not os.environ.get("MEDSAM2_JAX_FUZZ_EXPLORE"))


# ----------------------------------------------------------------------------------------------
# Running the CLI without a model


def _stub_segmentation(volume, prompts, model, args):
    """The steps of `segment_volume` before the model, then each object on its prompted slices."""
    from medsam2_jax.volumes import intensity
    from medsam2_jax.volumes.segment import Segmentation, _in_plane_spacing, _labels, prompt_crop

    unit = intensity.to_unit_range(volume.array, window=args.window, level=args.level, width=args.width)
    assert np.isfinite(unit).all(), "the model would see NaN or Inf"
    crop = cli._crop(args, model)
    if crop is not None:
        prompt_crop(prompts, _in_plane_spacing(volume, prompts.axis), crop)
    ids = list(prompts.object_ids)
    logits = np.full((prompts.num_slices, len(ids), *prompts.slice_shape), -1.0, np.float32)
    for p in prompts.prompts:
        logits[p.slice_index, ids.index(p.object_id)] = 1.0
    labels = np.moveaxis(_labels(logits, ids), 0, prompts.axis)
    probabilities = np.moveaxis(logits > 0, 0, prompts.axis + 1).astype(np.float32)
    return Segmentation(labels.astype(np.int32), probabilities, ids, {o: [0.0] * prompts.num_slices for o in ids})


def _stub_model(args):
    return cli.Model({"w": np.zeros(1, np.float32)}, SimpleNamespace(name="fuzz"), "fuzz", {})


@pytest.fixture(scope="module", autouse=True)
def no_model():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "_run_segmentation", _stub_segmentation)
        patch.setattr(cli, "_model", _stub_model)
        yield


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _fresh(folder: Path) -> Path:
    """An empty folder (hypothesis reuses the test's fixtures for every example)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def run_cli(argv: list[str]) -> tuple[int, list[str]]:
    """cli.main in this process: (exit status, stderr lines other than the CLI's own warnings).
    A traceback fails the test where it happens. Python warnings from the libraries are counted
    in the statistics (pytest --hypothesis-show-statistics), not as lines: the only one seen is
    torch's note on an old pickle protocol."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = cli.main(argv)
    for w in caught:
        event(f"WARNING {w.category.__name__}: {str(w.message)[:60]} ({Path(w.filename).name}:{w.lineno})")
    return code, [line for line in err.getvalue().splitlines() if not line.startswith("warning: ")]


def assert_works_or_one_line(code: int, errors: list[str], out_dir: Path, expected: tuple[str, ...]):
    """Exit 0 with every expected output, or exit 2, one line and nothing written."""
    written = sorted(p.name for p in out_dir.iterdir())
    event(f"exit {code}" + "".join(f": {' '.join(e.split('error: ', 1)[-1].split()[1:5])}" for e in errors[:1]))
    if code == 0:
        assert set(expected) <= set(written), written
    else:
        assert code == cli.EXIT_USER_ERROR, (code, errors)
        assert len(errors) == 1 and errors[0].startswith("medsam2-jax "), errors
        assert written == [], written


def segment(inputs: str | Path, out_dir: Path, *options: str) -> None:
    out = out_dir / "seg.nii.gz"
    code, errors = run_cli(["segment", str(inputs), "--out", str(out), "--no-montage", *options])
    assert_works_or_one_line(code, errors, out_dir, ("seg.nii.gz", "seg.json"))


@pytest.fixture(scope="module")
def small_volume(workdir):
    """9 x 8 x 7, flipped in x, half-millimetre slices: voxel, canonical and world differ, and
    world millimetres can overflow into slice numbers."""
    rng = np.random.default_rng(0)
    affine = np.array([[-1.5, 0, 0, 12], [0, 2.0, 0, 0], [0, 0, 0.5, 0], [0, 0, 0, 1]])
    path = workdir / "small.nii.gz"
    nib.save(nib.Nifti1Image(rng.integers(0, 200, (9, 8, 7)).astype(np.int16), affine), path)
    return path


# ----------------------------------------------------------------------------------------------
# Prompt strings: --box, --point, --neg-point, --z-range (and the window and crop numbers)
#
# Each input is a valid one with at most one part made odd: random text alone would stop at the
# first check and never reach the later ones.

def mostly(valid, odd):
    """`valid` three times in four (one_of(valid, valid, valid, odd) would not weigh: it merges
    the repeated branches)."""
    return st.integers(0, 3).flatmap(lambda pick: odd if pick == 0 else valid)


VALID_NUMBER = st.integers(0, 6).map(str) | st.floats(0, 6).map(lambda x: f"{x:.3g}")
ODD_NUMBER = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", " ", "1e999", "-0", "0x1", "1_0", "\u0663", "nan", "-inf", "1e308", "+4", "7.5", "-1", "9"]),
    st.text(string.printable, max_size=3),
)


@st.composite
def prompt_text(draw, n: int) -> str:
    """X0,Y0,X1,Y1@Z (n = 4) or X,Y@Z (n = 2) inside the volume, then at most one part made odd."""
    numbers = [draw(VALID_NUMBER) for _ in range(n + 1)]
    separators = [","] * (n - 1) + ["@"]
    odd = draw(st.sampled_from(["none", "none", "number", "separator", "text"]))
    if odd == "number":
        numbers[draw(st.integers(0, n))] = draw(ODD_NUMBER)
    elif odd == "separator":
        separators[draw(st.integers(0, n - 1))] = draw(st.sampled_from(["", ";", "@", ",,", ":", " "]))
    elif odd == "text":
        return draw(st.text(max_size=12))
    return "".join(x + s for x, s in zip(numbers, separators)) + numbers[-1]


@settings(FUZZ, max_examples=100)
@given(boxes=st.lists(prompt_text(4), max_size=2), points=st.lists(prompt_text(2), max_size=2),
       neg_points=st.lists(prompt_text(2), max_size=1),
       z_range=mostly(st.none(), st.builds(lambda a, b: f"{a}:{b}", VALID_NUMBER | ODD_NUMBER, VALID_NUMBER)),
       space=mostly(st.sampled_from(["voxel", "canonical"]), st.sampled_from(["world", "world_lps"])),
       axis=mostly(st.none(), st.sampled_from(["axial", "coronal", "sagittal"])),
       window=mostly(st.none(), st.sampled_from([["--window", "brain"], ["--window", "liver"], ["--level=40"],
                                                 ["--level=40", "--width=nan"], ["--level=inf", "--width=400"],
                                                 ["--level=1e308", "--width=1e308"], ["--level=0", "--width=-1"]])),
       crop=mostly(st.none(), st.sampled_from(["0", "1", "2.5", "0.5", "nan", "inf", "-inf", "1e308"])))
def test_prompt_strings(workdir, small_volume, boxes, points, neg_points, z_range, space, axis, window, crop):
    out_dir = _fresh(workdir / "prompt_strings")
    options = [f"--box={b}" for b in boxes] + [f"--point={p}" for p in points]
    options += [f"--neg-point={p}" for p in neg_points] + [f"--space={space}"]
    options += [f"--z-range={z_range}"] * (z_range is not None) + [f"--axis={axis}"] * (axis is not None)
    options += (window or []) + [f"--crop={crop}"] * (crop is not None)
    segment(small_volume, out_dir, *options)


# ----------------------------------------------------------------------------------------------
# JSON prompt files: a valid file with up to two of its values (any depth) replaced by odd ones

JSON_LEAF = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4)
JSON_ANY = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)
ODD_JSON = st.one_of(JSON_ANY, st.sampled_from([0, -1, 2**31, 2**63, 1e308, -1e308, 0.5, True, "1", [], {}, [1, 2],
                                                float("nan"), float("inf"), "world", "coronal", 9, 7]))
COORD = st.integers(0, 6) | st.floats(0, 6)


@st.composite
def prompt_object(draw, object_id: int) -> dict:
    """A box, clicks or both inside the volume; now and then an id a label file cannot hold."""
    x0, y0, x1, y1, z, z_other = (draw(COORD) for _ in range(6))
    entry = {"id": draw(mostly(st.just(object_id), st.sampled_from([0, 2**31 - 1, 2**31, 1.0, True, "1"])))}
    kinds = draw(st.sampled_from([("boxes",), ("points",), ("boxes", "points")]))
    if "boxes" in kinds:
        entry["boxes"] = [[[x0, y0, z], [x1, y1, z]]]
    if "points" in kinds:
        entry["points"] = [[x0, y0, z], [x1, y1, z_other]]
        entry["point_labels"] = draw(st.lists(st.sampled_from([0, 1]), min_size=2, max_size=2))
    if draw(st.booleans()):
        entry["z_range"] = sorted([z, z_other])
    if draw(st.booleans()):
        entry["name"] = draw(st.text(max_size=6))
    return entry


@st.composite
def valid_prompt_file(draw) -> dict:
    objects = [draw(prompt_object(i + 1)) for i in range(draw(st.integers(1, 3)))]
    data = {"version": 1, "objects": objects}
    for key, choices in (("space", ["voxel", "canonical"]), ("axis", ["axial"])):
        if draw(st.booleans()):
            data[key] = draw(st.sampled_from(choices))
    return data


def _nodes(value, path=()):
    """Every (path, value) of a JSON tree, the root included."""
    yield path, value
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from _nodes(child, path + (key,))


def _replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replaced(value[path[0]], path[1:], new)
    return copy


@st.composite
def prompt_file_bytes(draw) -> bytes:
    if draw(st.integers(0, 9)) == 0:  # not JSON text at all
        return draw(st.binary(max_size=30) | st.sampled_from([b"\xff\xfe{}", b'{"objects": [' * 3, b"[" * 5000]))
    data = draw(valid_prompt_file())
    for _ in range(draw(st.integers(0, 2))):  # a value made odd, or a key left out
        nodes = dict(_nodes(data))
        path = draw(st.sampled_from(list(nodes)))
        if path and isinstance(path[-1], str) and draw(st.booleans()):
            parent = nodes[path[:-1]]
            data = _replaced(data, path[:-1], {k: v for k, v in parent.items() if k != path[-1]})
        else:
            data = _replaced(data, path, draw(ODD_JSON))
    return json.dumps(data).encode()


@settings(FUZZ, max_examples=100)
@given(content=prompt_file_bytes())
# Found by an exploring run: Python's json reads NaN, which the sidecar (strict JSON) could not repeat.
@example(content=b'{"objects": [{"id": 1, "boxes": [[[0, 0, 0], [1, 1, 0]]], "name": NaN}]}')
@example(content=b'{"objects": [{"id": 1, "boxes": [[[0, 0, 0], [1, 1, 0]]], "name": 5, "z_range": [0, Infinity]}]}')
def test_json_prompt_files(workdir, small_volume, content):
    out_dir = _fresh(workdir / "prompt_files")
    prompt_file = workdir / "prompts.json"
    prompt_file.write_bytes(content)
    segment(small_volume, out_dir, "--prompts", str(prompt_file))


# ----------------------------------------------------------------------------------------------
# NIfTI headers: odd dtypes, 1D to 5D, zero-size axes, singular and non-finite affines, scaling

RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])
NIFTI_DTYPES = [np.int16, np.float32, np.uint8, np.int8, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
                np.float64, np.complex64, np.complex128, RGB24]
ODD_FLOAT = st.sampled_from([0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e308, 1e-308])


@st.composite
def nifti_file(draw, path: Path) -> Path:
    """A small NIfTI written by nibabel, then its header fields overwritten in place (nibabel
    would tidy them on save): a valid 3D file with a few odd parts."""
    shape = draw(mostly(st.lists(st.integers(2, 5), min_size=3, max_size=3),
                        st.lists(st.integers(0, 4), min_size=1, max_size=5)))
    dtype = draw(mostly(st.sampled_from(NIFTI_DTYPES[:3]), st.sampled_from(NIFTI_DTYPES)))
    seed = draw(st.integers(0, 2**32 - 1))
    values = np.random.default_rng(seed).integers(0, 100, shape)
    if dtype is RGB24:
        data = np.zeros(shape, RGB24)
        data["R"] = values
    else:
        data = values.astype(dtype)
        if np.issubdtype(dtype, np.floating) and data.size and draw(st.integers(0, 5)) == 0:
            data.flat[draw(st.integers(0, data.size - 1))] = draw(ODD_FLOAT)
    affine = np.diag([*draw(st.lists(st.sampled_from([1.0, -1.0, 0.5, 2.0]), min_size=3, max_size=3)), 1.0])
    nib.save(nib.Nifti1Image(data, affine, dtype=data.dtype), path)
    header = nib.Nifti1Header.from_fileobj(open(path, "rb"))
    for _ in range(draw(st.integers(0, 2))):
        field = draw(st.sampled_from(["srow", "qform", "pixdim", "scl", "codes", "datatype", "dim"]))
        if field == "srow":  # a singular, non-finite or huge sform
            row, col = draw(st.integers(0, 2)), draw(st.integers(0, 3))
            srow = header[f"srow_{'xyz'[row]}"]
            srow[col] = draw(ODD_FLOAT)
            header[f"srow_{'xyz'[row]}"] = srow
        elif field == "qform":
            header["qform_code"], header["sform_code"] = 1, draw(st.sampled_from([0, 1]))
            header[draw(st.sampled_from(["quatern_b", "quatern_c", "quatern_d", "qoffset_x"]))] = \
                draw(ODD_FLOAT | st.floats(-2, 2))
        elif field == "pixdim":
            header["pixdim"][draw(st.integers(0, 4))] = draw(ODD_FLOAT)
        elif field == "scl":
            header["scl_slope"], header["scl_inter"] = draw(ODD_FLOAT | st.just(1.0)), draw(ODD_FLOAT | st.just(0.0))
        elif field == "codes":  # no sform and no qform: the affine comes from pixdim alone
            header["sform_code"], header["qform_code"] = (draw(st.sampled_from([0, 5, -1])),
                                                          draw(st.sampled_from([0, 7])))
        elif field == "datatype":
            header["datatype"] = draw(st.sampled_from([0, 1, 128, 1536, 2048, 2304, 32767]))
        else:  # a dim that does not match the data written
            header["dim"][draw(st.integers(0, 7))] = draw(st.integers(-1, 6))
    with open(path, "r+b") as file:
        file.write(header.binaryblock)
    return path


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_nifti_headers(workdir, data):
    out_dir = _fresh(workdir / "nifti_out")
    path = data.draw(nifti_file(_fresh(workdir / "nifti_in") / "image.nii"))
    segment(path, out_dir, "--box=0,0,1,1@0")


# ----------------------------------------------------------------------------------------------
# DICOM headers: a small greyscale series or multi-frame file with a few odd header values

def _put(dataset, keyword: str, value) -> None:
    """A header value as a scanner may write it: numbers as DS, anything else as text (a reader
    sees the same string either way); None leaves the attribute out."""
    if value is None:
        return
    numbers = value if isinstance(value, list) else [value]
    if all(isinstance(v, (int, float)) and np.isfinite(v) for v in numbers):
        setattr(dataset, keyword, value)
    else:
        from pydicom.datadict import tag_for_keyword

        dataset.add_new(tag_for_keyword(keyword), "LO", "\\".join(str(v) for v in numbers))


ORIENTATIONS = [[1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 0, -1]]
ODD_VALUES = st.sampled_from([0, -1, float("nan"), float("inf"), "abc", "", [1], [1, 2, 3], [0, 0, 0, 0, 0, 0],
                              [1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 1], [1e308, 0, 0, 0, 1e308, 0]])


@st.composite
def dicom_input(draw, folder: Path) -> Path:
    """A series folder (one file per slice) or one multi-frame file; at most a few odd values."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    multi_frame = draw(st.booleans())
    slices, rows, columns = draw(mostly(st.just(3), st.integers(1, 2))), 4, 5
    header = {"ImageOrientationPatient": draw(st.sampled_from(ORIENTATIONS)), "PixelSpacing": [1.0, 0.5],
              "RescaleSlope": 1, "RescaleIntercept": 0, "SpacingBetweenSlices": 2.0 if multi_frame else None,
              "BitsAllocated": 16, "PixelRepresentation": 0, "SamplesPerPixel": 1}
    odd = draw(st.lists(st.sampled_from(sorted(header) + ["position", "uid", "size", "pixels"]),
                        max_size=2, unique=True))
    for name in odd:
        if name in header:
            header[name] = draw(st.sampled_from([8, 32, 12, 3]) if name.startswith(("Bits", "Samples", "PixelR"))
                                else ODD_VALUES | st.none())
    iop = header["ImageOrientationPatient"]
    normal = np.cross(iop[:3], iop[3:]) if iop in ORIENTATIONS else np.array([0, 0, 1.0])
    positions = [list(normal * 2.0 * k) for k in range(slices)]
    if "position" in odd:
        positions[-1] = draw(st.sampled_from([positions[0], [float("nan"), 0, 0], [1, 2], "abc", None]))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 1000, (slices, rows, columns)).astype(np.uint16)
    series_uid = generate_uid()

    def dataset(frames: np.ndarray, k: int):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.SeriesInstanceUID = generate_uid() if "uid" in odd and k == 1 else series_uid
        ds.Rows, ds.Columns = (rows + 1 if "size" in odd and k == 1 else rows), columns
        ds.PhotometricInterpretation = "MONOCHROME2" if header["SamplesPerPixel"] == 1 else "RGB"
        for name in ("BitsAllocated", "PixelRepresentation", "SamplesPerPixel"):
            setattr(ds, name, header[name])
        ds.BitsStored = ds.HighBit + 1 if "HighBit" in ds else ds.BitsAllocated
        ds.HighBit = ds.BitsStored - 1
        for name in ("ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept",
                     "SpacingBetweenSlices"):
            _put(ds, name, header[name])
        if multi_frame:
            ds.NumberOfFrames = len(frames)
        else:
            _put(ds, "ImagePositionPatient", positions[k])
        data = frames.astype(f"<u{max(header['BitsAllocated'] // 8, 1)}").tobytes()
        if "pixels" in odd:
            data = data[: draw(st.integers(0, len(data) - 1))]
        ds.PixelData = data + b"\0" * (len(data) % 2)
        return ds

    if multi_frame:
        path = folder / "volume.dcm"
        pydicom.dcmwrite(path, dataset(pixels, 0), enforce_file_format=True)
        return path
    for k in range(slices):
        pydicom.dcmwrite(folder / f"IM{k}", dataset(pixels[k], k), enforce_file_format=True)
    return folder


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_dicom_headers(workdir, data):
    out_dir = _fresh(workdir / "dicom_out")
    path = data.draw(dicom_input(_fresh(workdir / "dicom_in")))
    segment(path, out_dir, "--box=0,0,1,1@0")


# ----------------------------------------------------------------------------------------------
# Training manifests (JSONL and CSV): entries or a DataError, in both on_bad_record modes

MANIFEST_ENTRY = st.fixed_dictionaries(
    {"image": mostly(st.sampled_from(["a.nii.gz", "/data/b.nii", "sub/c.nii.gz"]), ODD_JSON),
     "label": mostly(st.sampled_from(["a_seg.nii.gz", "/data/b_seg.nii"]), ODD_JSON)},
    optional={"objects": mostly(st.lists(st.integers(1, 9), max_size=3) | st.just("1;2 3"), ODD_JSON),
              "axis": mostly(st.sampled_from([0, 1, 2, "axial", "Coronal", None, ""]), ODD_JSON),
              "window": mostly(st.sampled_from(["abdomen", "lung", None]), ODD_JSON)})
CSV_CELL = mostly(st.sampled_from(["a.nii.gz", "1;2", "2", "axial", "lung", ""]), st.text(max_size=6))


@st.composite
def manifest_text(draw) -> tuple[str, str]:
    """(suffix, text) of a JSONL or CSV manifest, most lines well formed."""
    if draw(st.booleans()):
        lines = [draw(mostly(MANIFEST_ENTRY.map(json.dumps), st.sampled_from(["", "# note", "{", "[1]", "null"])
                             | st.text(max_size=10))) for _ in range(draw(st.integers(0, 4)))]
        return ".jsonl", "\n".join(lines)
    header = draw(mostly(st.sampled_from(["image,label", "image,label,objects,axis,window", " image , label ,axis"]),
                         st.sampled_from(["", "img,lbl", "image", "image,label,,", "#image,label"])
                         | st.text(max_size=10)))
    columns = max(len(header.split(",")), 1)
    rows = [",".join(draw(CSV_CELL) for _ in range(draw(mostly(st.just(columns), st.integers(0, columns + 2)))))
            for _ in range(draw(st.integers(0, 4)))]
    return ".csv", "\n".join([header, *rows])


@settings(FUZZ, max_examples=100)
@given(manifest=manifest_text(), binary=mostly(st.none(), st.binary(max_size=12)),
       on_bad_record=st.sampled_from(["raise", "skip"]))
# Found by an exploring run: int(inf) raised OverflowError, not a DataError.
@example(manifest=(".jsonl", '{"image": "a.nii.gz", "label": "a_seg.nii.gz", "axis": Infinity}'), binary=None,
         on_bad_record="raise")
@example(manifest=(".csv", "image,label,axis\na.nii.gz,a_seg.nii.gz,inf\nb.nii.gz,b_seg.nii.gz,1.5"), binary=None,
         on_bad_record="raise")
def test_training_manifests(workdir, manifest, binary, on_bad_record):
    from medsam2_jax.training.data import AXIS_NAMES, DataError, Entry, read_manifest
    from medsam2_jax.volumes.intensity import CT_WINDOWS

    suffix, text = manifest
    path = workdir / f"manifest{suffix}"
    path.write_bytes(text.encode() + (binary or b""))
    try:
        entries = read_manifest(path, on_bad_record)
    except DataError as error:
        assert "\n" not in str(error) and str(error)
        event(f"DataError: {' '.join(str(error).split(': ', 1)[-1].split()[:4])}")
        return
    event("entries")
    for entry in entries:
        assert isinstance(entry, Entry) and isinstance(entry.image, str) and isinstance(entry.label, str)
        assert all(isinstance(o, int) for o in entry.objects)
        assert entry.axis in (None, *AXIS_NAMES.values()) and entry.window in (None, *CT_WINDOWS)


# ----------------------------------------------------------------------------------------------
# Checkpoints: `convert FILE` on any bytes, and `segment --checkpoint DIR` / `convert DIR --to-torch`
# on a folder whose manifest is fuzzed

REAL_MODEL = cli._model


@pytest.fixture(scope="module", autouse=True)
def abstract_params_once():
    """abstract_params is pure and costs half a second a call: compute it once per config."""
    from medsam2_jax.convert import checkpoint

    cache = {}
    original = checkpoint.abstract_params
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint, "abstract_params",
                      lambda config: cache.setdefault(config.name, None)
                      or cache.update({config.name: original(config)}) or cache[config.name])
        yield


TENSOR_DTYPES = ["float32", "float16", "bfloat16", "int64", "bool", "complex64", "uint8"]


@st.composite
def checkpoint_bytes(draw, path: Path) -> Path:
    """A torch.save or safetensors file of a fuzzed state dict, maybe cut short, or other bytes."""
    import torch

    kind = draw(st.sampled_from(["torch", "torch", "safetensors", "bytes"]))
    if kind == "bytes":
        head = draw(st.sampled_from([b"PK\x03\x04", b"\x80\x02", struct.pack("<Q", 40) + b"{", b"", b"\x89HDF", b"#!"]))
        path.write_bytes(head + draw(st.binary(max_size=40)))
        return path
    keys = draw(st.lists(mostly(st.sampled_from(["image_encoder.trunk.pos_embed", "sam_mask_decoder.iou_token.weight",
                                                  "module.no_obj_ptr", "maskmem_tpos_enc"]), st.text(max_size=8)),
                         max_size=3, unique=True))
    state = {key: torch.zeros(draw(st.lists(st.integers(0, 3), max_size=3)),
                              dtype=getattr(torch, draw(st.sampled_from(TENSOR_DTYPES)))) for key in keys}
    if kind == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v for k, v in state.items() if v.dtype != torch.complex64}, str(path))
    else:
        wrapped = draw(st.sampled_from(["model", "bare", "odd"]))
        obj = {"model": state} if wrapped == "model" else state if wrapped == "bare" else \
            draw(st.sampled_from([[1, 2], 5, "text", None, {"model": 5}, {"model": {"a": [1]}}, {3: torch.zeros(2)},
                                  {"model": {(1, 2): torch.zeros(1)}}]))
        torch.save(obj, path)
    if draw(st.integers(0, 4)) == 0:  # cut short, as an interrupted download is
        data = path.read_bytes()
        path.write_bytes(data[: draw(st.integers(0, max(len(data) - 1, 0)))])
    return path


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_checkpoint_files(workdir, data):
    out_dir = _fresh(workdir / "convert_out")
    path = data.draw(checkpoint_bytes(_fresh(workdir / "convert_in")
                                      / data.draw(st.sampled_from(["ck.pt", "ck.safetensors", "ck"]))))
    code, errors = run_cli(["convert", str(path), str(out_dir / "converted"), "--config", "test"])
    assert_works_or_one_line(code, errors, out_dir, ("converted",))


MANIFEST = {"config": "test", "version": "sam2.1", "image_size": 256, "source": None, "entries": [],
            "inference": {"crop": 3.0}}


@st.composite
def checkpoint_folder(draw, folder: Path) -> Path:
    """A checkpoint folder: a params/ folder (empty: Orbax refuses it) or not, and a manifest
    with up to two values made odd, or bytes that are no JSON."""
    if draw(mostly(st.just(True), st.booleans())):
        (folder / "params").mkdir()
    if draw(st.integers(0, 5)) == 0:
        content = draw(st.binary(max_size=20) | st.sampled_from([b"\xff", b"[" * 5000, b"[]", b""]))
    else:
        manifest = json.loads(json.dumps(MANIFEST))
        for _ in range(draw(st.integers(0, 2))):
            path = draw(st.sampled_from([path for path, _ in _nodes(manifest)]))
            manifest = _replaced(manifest, path, draw(ODD_JSON | st.sampled_from(["medsam2", "sam2_tiny", "nope"])))
        content = json.dumps(manifest).encode()
    (folder / "manifest.json").write_bytes(content)
    return folder


@settings(FUZZ, max_examples=40)
@given(data=st.data(), command=st.sampled_from(["segment", "to-torch"]))
def test_checkpoint_folders(workdir, small_volume, data, command):
    folder = data.draw(checkpoint_folder(_fresh(workdir / "checkpoint")))
    out_dir = _fresh(workdir / "checkpoint_out")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "_model", REAL_MODEL)
        if command == "segment":
            segment(small_volume, out_dir, "--box=0,0,1,1@0", "--checkpoint", str(folder))
        else:
            code, errors = run_cli(["convert", str(folder), str(out_dir / "back.pt"), "--to-torch", "--config", "test"])
            assert_works_or_one_line(code, errors, out_dir, ("back.pt",))

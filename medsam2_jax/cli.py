"""`medsam2-jax` command line.

    medsam2-jax demo                                               segment a real volume end to end
    medsam2-jax segment CT.nii.gz --box 80,90,140,150@45 --out seg.nii.gz [--checkpoint DIR]
    medsam2-jax segment-2d TEMPLATE.png IMG1.png IMG2.tif ... --box 10,20,60,80 --out-dir masks/
    medsam2-jax convert IN.pt OUT_DIR --config sam2.1_tiny        official checkpoint -> ours
    medsam2-jax convert OUT_DIR OUT.pt --config sam2.1_tiny --to-torch
    medsam2-jax train --config demo --workdir runs/x --config.data.manifest=train.jsonl [--config.num_steps=100]

User errors print one line on stderr and exit with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

EXIT_USER_ERROR = 2
TORCH_SUFFIXES = (".pt", ".pth", ".safetensors")  # what `convert --to-torch` writes
MAX_CROP = 1000.0  # a window 1000 x even a one-voxel prompt is wider than any scanner's field of view


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


def _config(name: str):
    from medsam2_jax.configs.model import get_config

    try:
        return get_config(name)
    except ValueError as e:
        raise UserError(str(e)) from None


def cmd_convert(args) -> int:
    from medsam2_jax.convert.checkpoint import (
        load_params,
        params_to_torch,
        read_state_dict,
        save_params,
        torch_to_params,
        write_torch_state_dict,
    )

    config = _config(args.config)
    src, dst = Path(args.input), Path(args.output)
    if args.to_torch:
        if dst.suffix not in TORCH_SUFFIXES:
            raise UserError(f"{dst}: --to-torch writes a PyTorch file; give it a .pt, .pth or .safetensors name")
        if dst.exists() and not args.overwrite:
            raise UserError(f"{dst} exists; pass --overwrite to replace it")
        params = load_params(src, config)
        write_torch_state_dict(params_to_torch(params), dst)
        print(f"wrote {dst} ({config.name}, loadable by the official build_sam2)")
        return 0
    if (dst / "params").exists():
        raise UserError(f"{dst} already holds a converted checkpoint; choose an empty folder")
    state = read_state_dict(src)
    params, manifest = torch_to_params(state, config, source=str(src))
    save_params(params, dst, config, manifest, source=str(src))
    print(f"converted {len(manifest)} tensors from {src} to {dst} ({config.name}); manifest: {dst / 'manifest.json'}")
    return 0


# ----------------------------------------------------------------------------------------------
# segment / demo


@dataclasses.dataclass(frozen=True)
class Model:
    params: object
    config: object
    checkpoint: str  # what the sidecar and reports name: a folder, shipped:NAME or untrained-random-init
    inference: dict  # the checkpoint manifest's run settings, e.g. {"crop": 3.0}


def _model(args) -> Model:
    """The model of --checkpoint (its config from --config, else its manifest, else medsam2) or
    the shipped weights."""
    import jax

    from medsam2_jax import weights
    from medsam2_jax.convert.checkpoint import load_params, read_manifest

    if args.checkpoint:
        info = read_manifest(args.checkpoint) if Path(args.checkpoint).is_dir() else {}
        config = _config(args.config or info.get("config") or "medsam2")
        return Model(load_params(args.checkpoint, config), config, str(args.checkpoint),
                     dict(info.get("inference", {})))
    shipped = weights.default_checkpoint()
    if shipped is not None:
        config = _config(args.config or shipped.config)
        if config.name != shipped.config:
            raise UserError(f"the shipped weights are for config {shipped.config}; pass --checkpoint for {config.name}")
        return Model(load_params(shipped.path, config), config, f"shipped:{shipped.name}", shipped.inference)
    from medsam2_jax.model.sam2 import init_params

    config = _config(args.config or "test")
    print("warning: no trained weights ship with this version and no --checkpoint was given: "
          "running UNTRAINED random weights, so the masks mean nothing", file=sys.stderr)
    return Model(init_params(jax.random.PRNGKey(0), config), config, "untrained-random-init", {})


def _crop(args, model: Model) -> float | None:
    """The prompt window factor: --crop (0 = whole slices), else the checkpoint's own."""
    crop = args.crop if args.crop is not None else model.inference.get("crop")
    if not crop:
        return None
    if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 1 <= crop <= MAX_CROP:  # --crop: checked
        raise UserError(f"{model.checkpoint}: its manifest's inference crop {crop!r} is not a window factor from 1 "
                        f"to {MAX_CROP:g} (or 0); fix the manifest or pass --crop")
    return float(crop)


def _stop(args, model: Model):
    """The stop rule (volumes/stopping.py): the checkpoint manifest's inference.stop, unless --no-stop."""
    from medsam2_jax.volumes.stopping import StopRule

    found = model.inference.get("stop")
    if getattr(args, "no_stop", False) or not found:
        return None
    try:
        return StopRule.from_dict(found)
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{model.checkpoint}: its manifest's inference.stop is not a stop rule ({error}); "
                        "fix the manifest or pass --no-stop") from None


def _parse_coords(text: str, what: str, n: int, *, at_slice: bool) -> list[float]:
    """'X0,Y0,X1,Y1' (n 4) or 'X,Y' (n 2) -> its n numbers; with `at_slice`, 'X0,Y0,X1,Y1@Z' ->
    the n numbers and Z."""
    example = ("X0,Y0,X1,Y1" if n == 4 else "X,Y") + ("@Z" if at_slice else "")
    try:
        coords, *z = text.split("@") if at_slice else [text]
        values = [float(v) for v in coords.split(",")] + [float(v) for v in z]
        if len(values) != n + at_slice:
            raise ValueError
        return values
    except ValueError:
        raise UserError(f"cannot read {what} {text!r}; expected {example}") from None


def _prompts(args, volume):
    from medsam2_jax.volumes import prompts as P

    sources = [bool(args.box or args.point or args.neg_point), bool(args.prompts), bool(args.seed)]
    if sum(sources) != 1:
        raise UserError("give the prompt one way: --box/--point, --prompts FILE.json, or --seed LABELS.nii.gz")
    if args.z_range and not (args.box or args.point or args.neg_point):
        raise UserError("--z-range goes with --box/--point; in a --prompts file give each object a \"z_range\"")
    if args.prompts:
        return P.load_prompt_file(args.prompts, volume)
    if args.seed:
        from medsam2_jax.volumes.io import load_label_volume

        seed = load_label_volume(args.seed, volume)
        return P.prompts_from_seed_labels(volume, seed, axis=args.axis or "axial", prompt_with=args.seed_prompt)
    objects = []
    for i, text in enumerate(args.box or []):
        x0, y0, x1, y1, z = _parse_coords(text, "--box", 4, at_slice=True)
        objects.append({"id": i + 1, "boxes": [[[x0, y0, z], [x1, y1, z]]]})
    clicks = [(_parse_coords(t, "--point", 2, at_slice=True), 1) for t in args.point or []]
    clicks += [(_parse_coords(t, "--neg-point", 2, at_slice=True), 0) for t in args.neg_point or []]
    if clicks:
        if not objects:
            objects.append({"id": 1})
        objects[0]["points"] = [xyz for xyz, _ in clicks]
        objects[0]["point_labels"] = [label for _, label in clicks]
    if args.z_range:
        z_range = _parse_z_range(args.z_range)
        for entry in objects:
            entry["z_range"] = z_range
    # Without --axis, Z is the file's third voxel axis, whatever its anatomical direction.
    axis = args.axis if args.axis else P.canonical_axis_of_file_axis(volume, 2)
    return P.build_prompts(volume, objects, space=args.space, axis=axis)


def _given_prompts(args) -> dict:
    """The prompts as the user gave them, for the sidecar next to their canonical form."""
    if args.prompts:
        return {"prompts": args.prompts, "content": json.loads(Path(args.prompts).read_text())}
    if args.seed:
        return {"seed": args.seed, "seed_prompt": args.seed_prompt, "axis": args.axis or "axial"}
    typed = {"box": args.box, "point": args.point, "neg_point": args.neg_point, "z_range": args.z_range,
             "axis": args.axis}
    return {"space": args.space, **{option: text for option, text in typed.items() if text}}


def _parse_z_range(text: str) -> list[float]:
    """'Z0:Z1' -> [Z0, Z1] (the first and last slice, in the prompts' Z)."""
    try:
        first, last = (float(v) for v in text.split(":"))
    except ValueError:
        raise UserError(f"cannot read --z-range {text!r}; expected Z0:Z1, "
                        "the structure's first and last slice") from None
    return [first, last]


def _default_policy(args, model: Model, prompts=None) -> None:
    """The 3D default policy: POLICY_RANGED when every object has its slice range, else the policy the
    checkpoint's stop rule was fitted with (POLICY_STOPPED), else POLICY_3D."""
    if args.policy is None:
        ranged = prompts is not None and set(prompts.object_ids) <= set(prompts.slice_ranges)
        stop = _stop(args, model)
        args.policy = POLICY_RANGED if ranged else (stop.policy or POLICY_STOPPED) if stop else POLICY_3D


def _run_segmentation(volume, prompts, model: Model, args):
    from medsam2_jax.tracker.config import get_tracker_config
    from medsam2_jax.tracker.predictor import VideoPredictor
    from medsam2_jax.volumes.segment import segment_volume, segment_volume_multi_orientation

    predictor = VideoPredictor(model.params, model.config, get_tracker_config(memory_policy=args.policy))
    first, last = prompts.tracked_range()
    total = 2 * (last - first + 1)
    if args.multi_orientation:
        total = 2 * sum(volume.shape)
    bar = _progress_bar(total, "slices")
    kwargs = dict(window=args.window, level=args.level, width=args.width, largest_component=args.largest_component,
                  crop=_crop(args, model), stop=_stop(args, model), progress=bar.update)
    try:
        if args.multi_orientation:
            return segment_volume_multi_orientation(volume, prompts, predictor, fusion=args.fusion, **kwargs)
        return segment_volume(volume, prompts, predictor, **kwargs)
    finally:
        bar.close()


def _progress_bar(total: int, unit: str):
    """A tqdm bar on a terminal; silent when stderr is not one (CI logs, pipes)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not sys.stderr.isatty():
        class _Silent:
            def update(self, n=1):
                pass

            def close(self):
                pass

        return _Silent()
    return tqdm(total=total, unit=unit, dynamic_ncols=True)


def params_sha256(params) -> str:
    """A digest of the weights themselves (path order, dtype, shape, bytes): what the sidecar records."""
    import hashlib

    import jax

    from medsam2_jax.convert.checkpoint import flatten_params

    h = hashlib.sha256()
    for path, leaf in sorted(flatten_params(jax.device_get(params)).items()):
        a = np.ascontiguousarray(leaf)
        h.update(f"{path}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _write_outputs(volume, prompts, result, out: Path, model: Model, args, given: dict | None = None):
    """given: the prompts as the user typed them (the sidecar keeps them beside the canonical form)."""
    from medsam2_jax.volumes.montage import write_montage
    from medsam2_jax.volumes.output import write_segmentation

    stop = _stop(args, model)
    extra = {"checkpoint": model.checkpoint, "memory_policy": args.policy, "crop": _crop(args, model),
             "stop": None if stop is None else stop.to_dict()}
    if given is not None:
        extra["given"] = given
    paths = write_segmentation(volume, result.labels, out, prompts=prompts, config_name=model.config.name,
                               checkpoint_hash=params_sha256(model.params), slice_object_scores=result.slice_scores,
                               probabilities=np.moveaxis(result.probabilities, 0, -1) if args.probabilities else None,
                               extra=extra)
    if not args.no_montage:
        paths["montage"] = write_montage(volume, result.labels, _montage_path(out), prompts=prompts,
                                         title=f"{Path(volume.source_path).name}: {model.config.name}, "
                                               f"{model.checkpoint}")
    return paths


def _montage_path(out: Path) -> Path:
    name = out.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return out.with_name(name + "_montage.png")


def _check_options(args) -> None:
    """Everything that can be checked before any work (a wrong window must not cost a segmentation)."""
    from medsam2_jax.tracker.policies import REGISTRY
    from medsam2_jax.volumes import intensity

    if args.policy is not None and args.policy not in REGISTRY:
        raise UserError(f"unknown --policy {args.policy!r}; choose one of {', '.join(sorted(REGISTRY))}")
    crop = getattr(args, "crop", None)
    if crop is not None and crop != 0 and not 1 <= crop <= MAX_CROP:  # also refuses NaN and Inf
        raise UserError(f"--crop {crop:g}: give a window factor from 1 (the window holds the prompts) to {MAX_CROP:g}, "
                        "or 0 for whole slices")
    level, width = getattr(args, "level", None), getattr(args, "width", None)
    if args.window is not None or level is not None or width is not None:
        try:
            intensity.window_level_width(args.window, level, width)
        except ValueError as error:
            raise UserError(f"{error} (--window NAME, or --level L --width W)") from None


def cmd_segment(args) -> int:
    from medsam2_jax.volumes.io import load_volume
    from medsam2_jax.volumes.output import check_output_folder

    out = Path(args.out)
    _check_options(args)
    if not out.name.lower().endswith((".nii", ".nii.gz")):
        raise UserError(f"--out {out}: the label output is NIfTI; give a .nii.gz (or .nii) name")
    check_output_folder(out)  # before the slow part: an unwritable folder fails at once
    volume = load_volume(args.input)
    prompts = _prompts(args, volume)
    for note in prompts.notes:
        print(f"warning: {note}", file=sys.stderr)
    model = _model(args)
    _default_policy(args, model, prompts)
    result = _run_segmentation(volume, prompts, model, args)
    paths = _write_outputs(volume, prompts, result, out, model, args, given=_given_prompts(args))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


# Default memory policies, chosen from measurements (docs/memory_selection, written by
# scripts/memory_selection.py: the shipped demo model on structures it never saw labelled).
# Chosen on the weights shipped before 2026-12-07: 3D from one box fifo (held-out AAL Dice 0.275
# against 0.150 self_sorting and 0.160 medsam2_released); with the slice range on every object
# self_sorting (0.464 against 0.307 fifo); One-Prompt 2D self_sorting (0.204 against 0.151 fifo).
# On the weights shipped now they are ties (every difference under 0.02: one box 0.160 / 0.143 /
# 0.155, with the range 0.522 / 0.521 / 0.523, One-Prompt 0.218 for all three).
# With the checkpoint's stop rule (manifest inference.stop; volumes/stopping.py), 3D uses the policy the
# rule was fitted with (its `policy`; POLICY_STOPPED when it names none): the rule's threshold was
# chosen on that policy's masks (fifo for the shipped weights: the weights' eval_held_out.md).
POLICY_3D, POLICY_2D, POLICY_RANGED, POLICY_STOPPED = "fifo", "self_sorting", "self_sorting", "fifo"
POLICY_DEFAULT_TEXT = (f"{POLICY_RANGED} when every object has a --z-range, else the policy of the checkpoint's "
                       f"stop rule, else {POLICY_3D}")


def _mask_paths(out_dir: Path, images: list[str]) -> list[Path]:
    """One mask PNG per image, named after it; two images that would write one file are refused
    (the second mask would silently replace the first)."""
    sources: dict[Path, str] = {}
    for src in images:
        target = out_dir / (Path(src).name.split(".")[0] + "_mask.png")
        if target in sources:
            raise UserError(f"{sources[target]} and {src} would both write {target}; "
                            "give the images distinct names or segment them in separate runs")
        sources[target] = src
    return list(sources)


def cmd_segment_2d(args) -> int:
    """One-Prompt 2D: the template's prompt segments every other image from memory alone."""
    from PIL import Image

    from medsam2_jax.one_prompt import segment_one_prompt
    from medsam2_jax.tracker.config import get_tracker_config
    from medsam2_jax.volumes.io import load_image_2d
    from medsam2_jax.volumes.output import atomic_path, check_output_folder

    out_dir = Path(args.out_dir)
    if not out_dir.is_dir():
        raise UserError(f"the output folder {out_dir} does not exist; create it first")
    check_output_folder(out_dir / "probe.png")
    targets = _mask_paths(out_dir, [args.template, *args.images])
    template = load_image_2d(args.template)
    images = [load_image_2d(p) for p in args.images]
    h, w = template.shape[:2]
    prompt = {}
    if args.box:
        x0, y0, x1, y1 = _parse_coords(args.box, "--box", 4, at_slice=False)
        if x1 <= x0 or y1 <= y0:
            raise UserError(f"--box {args.box} has zero area; give X0 < X1 and Y0 < Y1")
        prompt["box"] = [x0, y0, x1, y1]
    clicks = [(_parse_coords(t, "--point", 2, at_slice=False), 1) for t in args.point or []]
    clicks += [(_parse_coords(t, "--neg-point", 2, at_slice=False), 0) for t in args.neg_point or []]
    if clicks:
        prompt["points"] = [xy for xy, _ in clicks]
        prompt["labels"] = [label for _, label in clicks]
    if args.mask:
        mask = load_image_2d(args.mask)
        mask = (mask if mask.ndim == 2 else mask[..., 0]) > 0
        if mask.shape != (h, w) or not mask.any():
            raise UserError(f"--mask {args.mask} must be a non-empty mask of the template's size {w}x{h}")
        prompt["mask"] = mask
    if not prompt:
        raise UserError("give the template a prompt: --box, --point or --mask")
    for x, y in [xy for xy, _ in clicks] + ([prompt["box"][:2], prompt["box"][2:]] if args.box else []):
        if not (0 <= x <= w and 0 <= y <= h):
            raise UserError(f"prompt point ({x:g}, {y:g}) lies outside the {w}x{h} template")
    model = _model(args)
    masks = segment_one_prompt(images, template, prompt, params=model.params, config=model.config,
                               tracker_config=get_tracker_config(memory_policy=args.policy), with_template=True)
    for src, target, mask in zip([args.template, *args.images], targets, masks):
        with atomic_path(target) as tmp:
            Image.fromarray((mask * 255).astype(np.uint8)).save(tmp, format="PNG")
        print(f"{src}: {int(mask.sum())} px -> {target}" + (" (the template)" if src == args.template else ""))
    if not args.no_montage:
        from medsam2_jax.volumes.montage import write_montage_2d

        montage = write_montage_2d([template, *images], masks, out_dir / "montage.png",
                                   names=[Path(p).name for p in [args.template, *args.images]], prompt=prompt,
                                   title=f"One-Prompt 2D, memory policy {args.policy}")
        print(f"montage: {montage}")
    return 0


DEMO_STRUCTURE = (77, "left thalamus")  # an AAL region of Colin27


def cmd_demo(args) -> int:
    """Colin27 T1 + one box on the largest slice of an AAL structure -> labels, montage, report,
    measured against the AAL label next to the naive baselines (medsam2_jax.evaluation)."""
    import time

    from medsam2_jax import datasets
    from medsam2_jax.evaluation import evaluate as E
    from medsam2_jax.evaluation.sets import Structure
    from medsam2_jax.volumes.io import load_label_volume, load_volume
    from medsam2_jax.volumes.montage import truth_montage_slices, write_montage
    from medsam2_jax.volumes.output import atomic_path
    from medsam2_jax.volumes.prompts import build_prompts

    _check_options(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    volume = load_volume(datasets.colin27())
    atlas = load_label_volume(datasets.aal(), volume)
    label, name = DEMO_STRUCTURE
    structure = Structure(name, "colin27", label, volume, atlas == label, axis=2)
    options = E.Options(protocol="box_largest")
    entry = E.make_prompt(structure, options, np.random.default_rng(0))
    prompts = build_prompts(volume, [entry], space="canonical", axis="axial")
    z = prompts.prompts[0].slice_index
    model = _model(args)
    config, checkpoint = model.config, model.checkpoint
    t0 = time.perf_counter()
    _default_policy(args, model, prompts)
    result = _run_segmentation(volume, prompts, model, args)
    seconds = time.perf_counter() - t0
    montage, args.no_montage = not args.no_montage, True  # the demo draws its own: prediction and truth
    paths = _write_outputs(volume, prompts, result, out_dir / "demo_labels.nii.gz", model, args)
    pred = result.labels == 1
    if montage:
        paths["montage"] = write_montage(
            volume, result.labels, out_dir / "demo_labels_montage.png", prompts=prompts, truth=structure.target,
            slices=truth_montage_slices(structure.target, 2, (z,)),
            title=f"Colin27, AAL {label} ({name}): prediction vs AAL label; {config.name}, {checkpoint}")
    scores = {"model": E.score(pred, structure, z, options.tolerance_mm)}
    for baseline, mask in E.baselines(structure, z, entry).items():
        scores[baseline] = E.score(mask, structure, z, options.tolerance_mm)
    truth = scores["model"]["range"]

    def line(method):
        x = scores[method]
        r = x["range"]
        span = "nothing" if r["pred_first"] is None else f"slices {r['pred_first']}-{r['pred_last']}"
        return (f"| {E.LABELS[method]} | {x['dice']:.3f} | {x['nsd']:.3f} | {E._fmt(x['hd95'], 1)} | {span} "
                f"({r['slices_predicted']} slices, {r['predicted_outside']} outside the truth) |")

    report = "\n".join([
        "# medsam2-jax demo",
        f"volume: Colin27 T1 ({'x'.join(map(str, volume.shape))}), structure: AAL {label} ({name}), "
        f"true axial slices {truth['true_first']}-{truth['true_last']}",
        f"prompt: one box on axial slice {z} (the structure's largest), propagated forward and backward",
        f"model: {config.name} at {config.image_size} px, weights: {checkpoint}"
        + (f", window {crop:g}x the box (--crop)" if (crop := _crop(args, model)) else ""),
        "",
        f"| against the AAL label | Dice | NSD ({options.tolerance_mm:g} mm) | HD95 (mm) | predicted |",
        "|---|---|---|---|---|",
        *(line(m) for m in ("model", "copy_mask", "box", "copy_mask_in_range")),
        "",
        "(the in-range copy is told where the structure ends: the ceiling for stopping, not a baseline)",
        f"segmentation time: {seconds:.1f} s for {volume.shape[2]} slices x 2 passes",
        *(f"{k}: {v}" for k, v in paths.items()),
    ]) + "\n"
    report_path = out_dir / "demo_report.md"
    with atomic_path(report_path) as tmp:
        Path(tmp).write_text(report)
    print(report, end="")
    print(f"report: {report_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsam2-jax", description="MedSAM-2 / SAM 2 in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "convert",
        help="convert an official SAM 2 / SAM 2.1 / MedSAM2 checkpoint to ours, or back",
        description="Convert an official PyTorch checkpoint (.pt or .safetensors) into an Orbax "
        "checkpoint folder with a manifest, or (--to-torch) such a folder back into a .pt file that "
        "the official build_sam2 loads strictly.",
    )
    p.add_argument("input", help="official .pt/.safetensors file, or our checkpoint folder with --to-torch")
    p.add_argument("output", help="output folder, or the .pt/.safetensors file to write with --to-torch")
    p.add_argument("--config", default="sam2.1_tiny",
                   help="model variant: sam2[.1]_{tiny,small,base_plus,large}, medsam2 (default: sam2.1_tiny)")
    p.add_argument("--to-torch", action="store_true", help="convert our checkpoint back to PyTorch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file (--to-torch)")
    p.set_defaults(func=cmd_convert)

    def model_options(q, policy=POLICY_3D, default_text=None):
        q.add_argument("--checkpoint", help="our converted checkpoint folder (medsam2-jax convert); "
                       "default: the weights that ship with the package")
        q.add_argument("--config", default=None, help="model variant (default: the one in the checkpoint's "
                       "manifest.json; medsam2 without one)")
        q.add_argument("--policy", default=policy, help="memory policy: fifo (SAM 2's), self_sorting (MedSAM-2's) "
                       f"or medsam2_released (default: {default_text or policy}, the best measured here: "
                       "docs/memory_selection)")

    def volume_options(q):  # a 3D volume's window, propagation and outputs: segment and demo
        q.add_argument("--window", help="CT window by name: abdomen, lung, bone, brain, soft_tissue")
        q.add_argument("--level", type=float, help="CT window level in HU (with --width)")
        q.add_argument("--width", type=float, help="CT window width in HU (with --level)")
        q.add_argument("--largest-component", action="store_true", help="keep each object's largest 3D component")
        q.add_argument("--multi-orientation", action="store_true",
                       help="also propagate along the two other axes, seeded by the first result, and fuse")
        q.add_argument("--fusion", choices=("mean", "vote"), default="mean",
                       help="how --multi-orientation fuses the three passes (default: mean of probabilities)")
        q.add_argument("--probabilities", action="store_true", help="also write per-object probabilities")
        q.add_argument("--no-montage", action="store_true", help="skip the overlay montage PNG")

    def stop_option(q):
        q.add_argument("--no-stop", action="store_true",
                       help="track to the volume's ends, as SAM 2 does, instead of ending each object where the "
                       "checkpoint's stop rule (manifest inference.stop; medsam2_jax/volumes/stopping.py) says it ends")

    def crop_option(q):
        q.add_argument("--crop", type=float, default=None, metavar="FACTOR",
                       help="show the model only a square window FACTOR x the prompts' extent on every slice "
                       "(0: whole slices; default: the checkpoint's own manifest inference.crop, else whole slices)")

    q = sub.add_parser(
        "segment",
        help="segment a 3D volume (NIfTI or DICOM folder) from prompts on one or more slices",
        description="Propagate prompts through a volume forward and backward along the slice axis and write "
        "a label NIfTI on the input's grid, a JSON sidecar, and an overlay montage PNG. Coordinates are "
        "voxel indices of the input file (--space world for millimetres); Z is the file's third axis.",
    )
    q.add_argument("input", help="a .nii/.nii.gz file or a DICOM series folder")
    q.add_argument("--out", required=True, help="output label file (.nii.gz)")
    q.add_argument("--box", action="append", metavar="X0,Y0,X1,Y1@Z", help="a box on slice Z; each --box is one object")
    q.add_argument("--point", action="append", metavar="X,Y@Z", help="a foreground click (object 1)")
    q.add_argument("--neg-point", action="append", metavar="X,Y@Z", help="a background click (object 1)")
    q.add_argument("--prompts", help="a JSON prompt file for many objects (see medsam2_jax/volumes/prompts.py)")
    q.add_argument("--seed", help="a seed label volume: every label value is an object")
    q.add_argument("--seed-prompt", choices=("box", "mask"), default="box",
                   help="prompt seed objects on their largest slice with a box or their mask")
    q.add_argument("--space", choices=("voxel", "canonical", "world", "world_lps"), default="voxel",
                   help="what the numbers of --box/--point/--z-range are: voxel, the file's voxel indices (default); "
                   "canonical, voxel indices in RAS+ order; world, millimetres RAS+ (NIfTI's frame); world_lps, "
                   "millimetres LPS+ (a DICOM viewer's). A negative number needs the = form, --box=-23,40,10,60@12 "
                   "(argparse reads a leading '-' as an option)")
    q.add_argument("--axis", choices=("axial", "coronal", "sagittal"),
                   help="slice axis (default: the file's third axis)")
    q.add_argument("--z-range", metavar="Z0:Z1",
                   help="the structure's first and last slice (in the prompts' Z): propagation stays inside, "
                   "nothing is segmented beyond (a box plus a slice range, as 3D Slicer's MedSAM plugins ask)")
    model_options(q, policy=None, default_text=POLICY_DEFAULT_TEXT)
    volume_options(q)
    crop_option(q)
    stop_option(q)
    q.set_defaults(func=cmd_segment)

    t = sub.add_parser(
        "segment-2d",
        help="One-Prompt 2D: segment a set of images from one prompted template",
        description="The template carries the prompt; every other image (any size, grey or RGB) is segmented "
        "from the memory bank alone. Writes one binary mask PNG per image (the template's too: the "
        "decoder's answer to its prompt) and an overview montage.png into --out-dir.",
    )
    t.add_argument("template", help="the prompted image (PNG, TIFF or JPEG)")
    t.add_argument("images", nargs="+", help="the images to segment")
    t.add_argument("--out-dir", required=True, help="an existing folder for the mask PNGs")
    t.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box on the template, in its pixels")
    t.add_argument("--point", action="append", metavar="X,Y", help="a foreground click on the template")
    t.add_argument("--neg-point", action="append", metavar="X,Y", help="a background click on the template")
    t.add_argument("--mask", help="a mask image of the template (non-zero = object)")
    t.add_argument("--no-montage", action="store_true", help="skip montage.png (the template and up to 11 "
                   "images with their masks)")
    model_options(t, policy=POLICY_2D)
    t.set_defaults(func=cmd_segment_2d)

    sub.add_parser("train", help="train or fine-tune (see: medsam2-jax train --help)", add_help=False)

    d = sub.add_parser("demo", help="segment a real brain MRI (Colin27) from one box, end to end",
                       description="Runs the whole 3D pipeline on the Colin27 T1 (installed by "
                       "scripts/install_data.sh): one box on the left thalamus, forward and backward propagation, "
                       "label NIfTI, montage, report.")
    d.add_argument("--out-dir", default="medsam2_demo", help="where to write the outputs (default: ./medsam2_demo)")
    model_options(d, policy=None, default_text=POLICY_DEFAULT_TEXT)
    volume_options(d)
    crop_option(d)
    stop_option(d)
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser(
        "evaluate",
        help="measure a model on labelled volumes against the truth and naive baselines",
        description="Prompt each labelled structure once (a box or a click on one slice), propagate through "
        "the volume, and report per structure volume Dice, NSD, HD95, the predicted slice range and per-slice "
        "Dice against the distance from the prompt, next to three naive baselines (the prompted slice's true "
        "mask copied to every slice, copied inside the true slice range, the box on every slice), and the model "
        "given the true slice range as well. Writes evaluation.json, evaluation.md and evaluation.png.",
    )
    e.add_argument("--set", dest="structure_set", default=None,
                   help="a built-in structure set: aal_held_out (default), aal_seen, stardist3d")
    e.add_argument("--manifest",
                   help="a JSONL/CSV manifest of image/label pairs (the training format) instead of --set")
    e.add_argument("--protocol", choices=("box_largest", "box_central", "click"), default="box_central",
                   help="the one prompt: a box on the largest or the central slice, or a click (default: box_central)")
    e.add_argument("--jitter", type=float, default=0.0,
                   help="box perturbation: move each box edge by up to this fraction of the box side (default 0)")
    e.add_argument("--seed", type=int, default=0, help="seed of the box jitter (default 0)")
    e.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    e.add_argument("--no-z-range", action="store_true", help="skip the box + true slice range run")
    e.add_argument("--limit", type=int, help="evaluate only the first N structures")
    e.add_argument("--out-dir", default="medsam2_eval", help="where to write the report (default: ./medsam2_eval)")
    e.add_argument("--checkpoint", help="our converted checkpoint folder (default: the shipped weights)")
    e.add_argument("--config", default=None, help="model variant (default: the checkpoint's)")
    e.add_argument("--policy", default=None,
                   help="memory policy (default: the one the checkpoint's stop rule was fitted with, else "
                   f"{POLICY_3D}: the best measured in 3D, docs/memory_selection)")
    e.add_argument("--window", help="CT window by name for every volume (default: each manifest entry's own)")
    crop_option(e)
    stop_option(e)
    e.set_defaults(func=cmd_evaluate)
    return parser


def cmd_evaluate(args) -> int:
    from medsam2_jax.evaluation import evaluate as E
    from medsam2_jax.evaluation import sets
    from medsam2_jax.tracker.config import get_tracker_config
    from medsam2_jax.tracker.predictor import VideoPredictor
    from medsam2_jax.volumes.output import check_output_folder

    if args.manifest and args.structure_set:
        raise UserError("give --set or --manifest, not both")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: give a positive number of structures")
    _check_options(args)
    try:
        options = E.Options(protocol=args.protocol, jitter=args.jitter, seed=args.seed,
                            tolerance_mm=args.tolerance_mm, z_range=not args.no_z_range, window=args.window)
    except ValueError as error:
        raise UserError(str(error)) from None
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_output_folder(out_dir / "evaluation.json")
    try:
        if args.manifest:
            structures = sets.from_manifest(args.manifest, limit=args.limit)
        else:
            structures = sets.built_in(args.structure_set or "aal_held_out", limit=args.limit)
    except ValueError as error:  # DataError and unknown set names
        raise UserError(str(error)) from None
    model = _model(args)
    config, checkpoint = model.config, model.checkpoint
    options = dataclasses.replace(options, crop=_crop(args, model))
    _default_policy(args, model)
    stop = _stop(args, model)
    predictor = VideoPredictor(model.params, config, get_tracker_config(memory_policy=args.policy))
    runs = 2 if options.z_range else 1
    bar = _progress_bar(runs * 2 * sum(s.target.shape[s.axis] for s in structures), "slices")
    try:
        results = E.evaluate(structures, predictor, options, policy=args.policy, stop=stop, progress=bar.update,
                             log=lambda line: print(line, flush=True))
    finally:
        bar.close()
    results["checkpoint"], results["config"], results["crop"] = checkpoint, config.name, options.crop
    results["structures"] = args.manifest or args.structure_set or "aal_held_out"
    paths = E.write_report(results, out_dir, title=f"{results['structures']}: {config.name}, {checkpoint}")
    summary = results["summary"]
    for m in E.methods(results["rows"]):
        s = summary[m]
        print(f"{E.LABELS[m]:36s} Dice {s['dice']:.3f}  NSD {s['nsd']:.3f}  HD95 {E._fmt(s['hd95'], 1)} mm  "
              f"range ok {s['range_within_25pct']}/{summary['num_structures']}")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from medsam2_jax.convert.checkpoint import CheckpointError
    from medsam2_jax.datasets import DatasetChecksumError, DatasetMissingError
    from medsam2_jax.volumes.io import VolumeError
    from medsam2_jax.volumes.output import OutputError
    from medsam2_jax.volumes.prompts import PromptError

    return (UserError, CheckpointError, VolumeError, PromptError, OutputError, DatasetMissingError,
            DatasetChecksumError)


def _persist_compilation() -> None:
    """Keep compiled functions across runs, so a second `segment` or `demo` loads them instead of
    compiling again: in $MEDSAM2_JAX_COMPILE_CACHE, by default `xla/` in the package's cache folder
    (~/.cache/medsam2_jax or $MEDSAM2_JAX_CACHE); `MEDSAM2_JAX_COMPILE_CACHE=0` turns it off. JAX's
    own cache folder, when set (JAX_COMPILATION_CACHE_DIR, read when jax is imported), wins."""
    import jax

    from medsam2_jax import datasets

    if jax.config.jax_compilation_cache_dir:
        return
    where = os.environ.get("MEDSAM2_JAX_COMPILE_CACHE", str(datasets.cache_dir() / "xla"))
    if where not in ("", "0"):
        jax.config.update("jax_compilation_cache_dir", where)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # its ml_collections overrides (--config.a.b=v) need its own parser
        from medsam2_jax.training.cli import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    _persist_compilation()
    USER_ERRORS = _user_errors()
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"medsam2-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())

"""Train, export and evaluate the demo model that ships with medsam2_jax (issue 6).

    python scripts/train_demo_model.py                      # prepare, train, export, evaluate
    python scripts/train_demo_model.py --stage evaluate     # re-evaluate the shipped weights
    python scripts/train_demo_model.py --stage export --out DIR   # the latest checkpoint -> DIR

Data (shared/DATA.md, installed by scripts/install_data.sh, nothing downloaded):
  - Colin27 T1 with its AAL regions, minus the HELD_OUT structures (zeroed in the training label
    volume, so they are never a training object nor a prompt);
  - the MNI152 2009a T1 with its white matter (wm > 127) as one more object;
  - synthetic: both T1s with random ellipsoids painted in at random intensities (4 volumes of 24).
Training runs `medsam2_jax.training.loop.train` once per stage (STAGES, configs/train.py
variants), each in WORKDIR/<variant> and each from the previous stage's exported weights: single
prompted slices from scratch, slice pairs on GT masks (the memory path, started local), then
clips that run past the object; killed, it resumes from the last checkpoint when started again.
Export writes the final params to WORKDIR/export (Orbax + manifest.json); only if the evaluation
beats both baselines are they copied to medsam2_jax/weights/medsam2_jax_demo/, the default
weights of `medsam2-jax demo`. Evaluation prompts each held-out structure with the box of its
central axial slice, propagates through the whole volume (forward and backward passes, as `segment` does) and
compares its Dice with two naive baselines computed in the same run: the prompted slice's true
mask copied to every slice, and the box itself filled on every slice. Results go to
eval.json and the model card's results table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "medsam2_jax" / "weights" / "medsam2_jax_demo"

# AAL structures never seen in training (both hemispheres, so the mirror image is unseen too).
HELD_OUT = {
    37: "Hippocampus_L", 38: "Hippocampus_R",
    71: "Caudate_L", 72: "Caudate_R",
    73: "Putamen_L", 74: "Putamen_R",
    77: "Thalamus_L", 78: "Thalamus_R",
}
SYNTHETIC_VOLUMES, SYNTHETIC_BLOBS = 4, 24
# Training structures evaluated the same way, for comparison (seen in training, same brain).
SEEN = {75: "Pallidum_L", 41: "Amygdala_L", 1: "Precentral_L", 91: "Cerebelum_Crus1_L"}


def prepare(data_dir: Path) -> Path:
    """Label volumes and the training manifest in `data_dir`; returns the manifest path."""
    import nibabel as nib

    from medsam2_jax import datasets

    data_dir.mkdir(parents=True, exist_ok=True)
    aal = nib.load(datasets.aal())
    labels = np.asarray(aal.dataobj).astype(np.int16)
    missing = [k for k in HELD_OUT if not (labels == k).any()]
    if missing:
        raise SystemExit(f"AAL volume lacks held-out labels {missing}: not the expected atlas")
    labels[np.isin(labels, list(HELD_OUT))] = 0
    _save(nib.Nifti1Image(labels, aal.affine), data_dir / "colin27_aal_train.nii.gz")

    wm = nib.load(datasets.mni152_wm())
    tissue = (np.asarray(wm.dataobj) > 127).astype(np.int16)
    _save(nib.Nifti1Image(tissue, wm.affine), data_dir / "mni152_wm.nii.gz")

    colin = {"image": str(datasets.colin27()), "label": str(data_dir / "colin27_aal_train.nii.gz")}
    mni = {"image": str(datasets.mni152_t1()), "label": str(data_dir / "mni152_wm.nii.gz")}
    synthetic = []
    for i in range(SYNTHETIC_VOLUMES):
        base = datasets.colin27() if i % 2 == 0 else datasets.mni152_t1()
        synthetic.append(_synthetic_volume(base, data_dir / f"synthetic{i}", np.random.default_rng(i)))
    # A record is one volume; the clip sampler draws its anchor object uniformly from the volume's
    # labels. Half the clips follow a synthetic blob, 3/8 an AAL region, 1/8 the white matter.
    lines = [colin] * 3 + [mni] + synthetic
    manifest = data_dir / "train.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest


def _synthetic_volume(base: Path, stem: Path, rng: np.random.Generator) -> dict:
    """A real T1 with SYNTHETIC_BLOBS random ellipsoids painted in (each at its own intensity,
    blended over the anatomy) and labelled 1..n: compact objects of every size and contrast, each
    with a clear end, for learning what a box means and when an object is gone."""
    import nibabel as nib

    image = nib.load(base)
    data = np.asarray(image.dataobj, np.float32)
    labels = np.zeros(data.shape, np.int16)
    inside = np.argwhere(data > np.percentile(data, 60))  # centres in the head, not in the air
    top = np.percentile(data, 99)
    for label in range(1, SYNTHETIC_BLOBS + 1):
        centre = inside[rng.integers(len(inside))].astype(np.float32)
        radii = rng.uniform(3.0, 14.0, size=3)
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        lo = np.maximum((centre - radii.max() - 1).astype(int), 0)
        hi = np.minimum((centre + radii.max() + 2).astype(int), data.shape)
        grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1) - centre
        local = grid @ rotation
        blob = ((local / radii) ** 2).sum(-1) <= 1.0
        region = tuple(slice(a, b) for a, b in zip(lo, hi))
        alpha = rng.uniform(0.5, 1.0)
        value = rng.uniform(0.05, 1.0) * top
        patch = data[region]
        patch[blob] = (1 - alpha) * patch[blob] + alpha * value
        labels[region][blob] = label
    out = {"image": str(stem) + "_image.nii.gz", "label": str(stem) + "_label.nii.gz"}
    _save(nib.Nifti1Image(data, image.affine), Path(out["image"]))
    _save(nib.Nifti1Image(labels, image.affine), Path(out["label"]))
    return out


def _save(image, path: Path) -> None:
    import nibabel as nib

    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(image, tmp)
    os.replace(tmp, path)


STAGES = ("demo_images", "demo_tracking", "demo")  # configs/train.py variants, in order


def train_model(manifest: Path, workdir: Path, steps: dict[str, int]):
    """Both training stages, each in WORKDIR/<variant>; the second starts from the first's final
    weights (exported to WORKDIR/<variant>/export every time, so they always match its checkpoint).
    A finished stage restores and runs no steps; a killed one resumes."""
    from medsam2_jax.configs.train import get_config
    from medsam2_jax.training.loop import train

    import jax

    # A resumed run loads the compiled train step instead of compiling it again.
    jax.config.update("jax_compilation_cache_dir", str(workdir / "jax_cache"))
    init, seconds = "", {}
    for variant in STAGES:
        config = get_config(variant)
        config.data.manifest = str(manifest)
        config.num_steps = steps.setdefault(variant, config.num_steps)
        t0 = time.time()
        state = train(config, workdir / variant, init_checkpoint=init)
        seconds[variant] = round(time.time() - t0, 1)
        if variant != STAGES[-1]:
            init = str(workdir / variant / "export")
            export(state.params, config, Path(init), {"config": f"configs/train.py:{variant}",
                                                       "num_steps": int(config.num_steps)})
    return config, state, seconds


def training_minutes(stage_dir: Path, log_every: int) -> float:
    """Time spent in training steps by a stage, over all its runs, from its metrics log (each logged
    row covers the steps since the previous one at its steps/s; the first row after a resume, the
    steps since the last multiple of `log_every`)."""
    minutes, previous = 0.0, 0
    for line in (stage_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "steps_per_s" in row:
            steps = row["step"] - previous if row["step"] > previous else (row["step"] % log_every or log_every)
            minutes += steps / row["steps_per_s"] / 60
            previous = row["step"]
    return round(minutes, 1)


def export(params, config, out_dir: Path, info: dict) -> None:
    """Params -> out_dir (replaced atomically: written beside it, then renamed)."""
    import jax

    from medsam2_jax.convert.checkpoint import save_params

    params = jax.device_get(params)
    tmp = Path(tempfile.mkdtemp(prefix=".demo_export_", dir=out_dir.parent))
    try:
        save_params(params, tmp / "w", config.model_config, source=None)
        (tmp / "w" / "training.json").write_text(json.dumps(info, indent=1) + "\n")
        card = out_dir / "MODEL_CARD.md"
        if card.exists():
            shutil.copy(card, tmp / "w" / "MODEL_CARD.md")
        old = out_dir.with_name(out_dir.name + ".old")
        if out_dir.exists():
            out_dir.rename(old)
        (tmp / "w").rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install(out: Path) -> None:
    """Copy an evaluated export into the package as the demo's default weights (atomically)."""
    tmp = WEIGHTS.with_name(".medsam2_jax_demo.new")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out, tmp)
    old = WEIGHTS.with_name(".medsam2_jax_demo.old")
    if WEIGHTS.exists():
        WEIGHTS.rename(old)
    tmp.rename(WEIGHTS)
    shutil.rmtree(old, ignore_errors=True)
    print(f"installed as the default weights of medsam2-jax demo: {WEIGHTS}")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def evaluate(weights: Path, structures: dict[int, str]) -> list[dict]:
    """Box on the central axial slice -> propagated Dice, and the two baselines, per structure."""
    from medsam2_jax import datasets
    from medsam2_jax.configs.model import get_config
    from medsam2_jax.convert.checkpoint import load_params
    from medsam2_jax.tracker.config import get_tracker_config
    from medsam2_jax.tracker.predictor import VideoPredictor
    from medsam2_jax.volumes.io import load_label_volume, load_volume
    from medsam2_jax.volumes.prompts import build_prompts
    from medsam2_jax.volumes.segment import segment_volume

    config = get_config(json.loads((weights / "manifest.json").read_text())["config"])
    params = load_params(weights, config)
    predictor = VideoPredictor(params, config, get_tracker_config(max_cond_frames=1))
    volume = load_volume(datasets.colin27())
    atlas = load_label_volume(datasets.aal(), volume)
    rows = []
    for label, name in structures.items():
        target = atlas == label
        zs = np.flatnonzero(target.any(axis=(0, 1)))
        z = int((zs.min() + zs.max()) // 2)  # the central slice of the structure's axial extent
        if not target[:, :, z].any():
            z = int(zs[np.argmin(np.abs(zs - z))])
        xs, ys = np.nonzero(target[:, :, z])  # canonical axes 0 (x) and 1 (y)
        box = [[int(xs.min()), int(ys.min()), z], [int(xs.max()), int(ys.max()), z]]
        prompts = build_prompts(volume, [{"id": 1, "name": name, "boxes": [box]}], space="canonical", axis="axial")
        t0 = time.perf_counter()
        result = segment_volume(volume, prompts, predictor)
        seconds = time.perf_counter() - t0
        pred = result.labels == 1
        copy = np.repeat(target[:, :, z : z + 1], target.shape[2], axis=2)
        boxed = np.zeros_like(target)
        boxed[xs.min() : xs.max() + 1, ys.min() : ys.max() + 1, :] = True
        rows.append({
            "label": label, "name": name, "slice": z, "extent": [int(zs.min()), int(zs.max())],
            "dice": dice(pred, target), "dice_copy_mask": dice(copy, target), "dice_box": dice(boxed, target),
            "dice_prompted_slice": dice(pred[:, :, z], target[:, :, z]),
            "predicted_slices": int(pred.any(axis=(0, 1)).sum()), "true_slices": int(target.any(axis=(0, 1)).sum()),
            "num_slices": int(target.shape[2]), "seconds": seconds,
        })
        r = rows[-1]
        print(f"{label:3d} {name:18s} dice {r['dice']:.3f}  copy-mask {r['dice_copy_mask']:.3f}  "
              f"box {r['dice_box']:.3f}  slices {r['predicted_slices']}/{r['true_slices']}  {seconds:.1f}s", flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    keys = ("dice", "dice_copy_mask", "dice_box", "dice_prompted_slice")
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


def write_card(out: Path) -> None:
    """MODEL_CARD.md from the training record (training.json) and the evaluation (eval.json)."""
    from medsam2_jax.configs.train import get_config

    info = json.loads((out / "training.json").read_text())
    results = json.loads((out / "eval.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    config = get_config("demo")
    m = config.model_config
    size_mb = sum(f.stat().st_size for f in (out / "params").rglob("*") if f.is_file()) / 1e6

    def table(rows, mean):
        lines = ["| AAL label | structure | Dice (model) | Dice (copy prompted mask) | Dice (box) | "
                 "Dice on the prompted slice | slices predicted / true | seconds |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['label']} | {r['name']} | {r['dice']:.3f} | {r['dice_copy_mask']:.3f} | "
                         f"{r['dice_box']:.3f} | {r['dice_prompted_slice']:.3f} | {r['predicted_slices']} / "
                         f"{r['true_slices']} | {r['seconds']:.1f} |")
        lines.append(f"| | **mean** | **{mean['dice']:.3f}** | {mean['dice_copy_mask']:.3f} | {mean['dice_box']:.3f} | "
                     f"{mean['dice_prompted_slice']:.3f} | | |")
        return "\n".join(lines)

    held = ", ".join(f"{k} {v}" for k, v in HELD_OUT.items())
    if "train_minutes" in info:
        wall = ", ".join(f"{v} {minutes:.0f} min" for v, minutes in info["train_minutes"].items()) + (
            " (from each stage's metrics log: steps over steps/s, so compiles and pauses between resumed runs"
            " are left out)")
    elif "train_seconds_this_run" in info:
        wall = ", ".join(f"{v} {sec / 60:.0f} min" for v, sec in info["train_seconds_this_run"].items()) + (
            " (the last run; it resumed from a checkpoint)" if info.get("resumed") else "")
    else:
        wall = "not recorded (exported from a checkpoint)"
    stage_lines = []
    for variant in STAGES:
        c = get_config(variant)
        p = c.prompts
        what = "single slices" if c.data.clip_length == 1 else f"clips of {c.data.clip_length} consecutive slices"
        if c.data.exit_prob:
            what += f" ({c.data.exit_prob:.0%} of them started near the object's last slice, so they run past its end)"
        local = "; memory cross-attention started local (`local_memory_attention_init`)" \
            if c.local_memory_attention_init else ""
        stage_lines.append(
            f"- `configs/train.py:{variant}`: {info.get('steps', {}).get(variant, c.num_steps)} steps of {c.batch_size} {what}; peak lr {c.lr:g} after "
            f"{c.warmup_steps} warmup steps{'; image encoder frozen' if c.freeze else ''}{local}; prompts: box "
            f"{p.prob_point_input * p.prob_box_input:.2f}, click "
            f"{p.prob_point_input * (1 - p.prob_box_input):.2f}, mask {1 - p.prob_point_input:.2f}.")
    stage_lines = "\n".join(stage_lines)
    held_rows, mean, seen = results["held_out"], results["held_out_mean"], results["seen_mean"]
    below_on_seen = seen["dice"] < seen["dice_copy_mask"]
    predicted = np.mean([r["predicted_slices"] for r in held_rows])
    true = np.mean([r["true_slices"] for r in held_rows])
    stopping = (f"- On the held-out structures it predicts a mask on {predicted:.0f} of {results['num_slices']} axial "
                f"slices on average, against {true:.0f} true ones: it tracks inside a structure but does not stop "
                "where the structure ends, and most of its volume Dice is lost there. Its margin over copying the "
                f"prompted mask is {mean['dice'] - mean['dice_copy_mask']:+.3f}"
                f"{'; on the structures seen in training it is below that baseline' if below_on_seen else ''}.")
    text = f"""# medsam2_jax demo model

A **demonstration model, not for clinical or research use.** It exists so that `medsam2-jax demo`
and the README's commands run a model that has learned something, and to show that this project's
training pipeline trains. It was trained here, from scratch, on one brain.

## Model
- Config `demo` (`configs/model.py`): the SAM 2.1 layout cut down: Hiera trunk with embed dim
  {m.trunk.embed_dim} and stages {tuple(m.trunk.stages)}, one two-way transformer layer in the mask decoder (MLP
  {m.mask_decoder.transformer_mlp_dim}), one memory-attention layer (feed-forward {m.memory_attention.dim_feedforward}), {m.num_maskmem} memories, image size
  {m.image_size} px. {manifest['num_params']:,} parameters, float32, {size_mb:.1f} MB on disk (Orbax).
- Unlike SAM 2.1: a box also enters as a dense mask prompt (`box_mask_prompt`), and tracked frames
  use the single-mask output (`multimask_output_for_tracking` {m.multimask_output_for_tracking}).
- Files: `params/` (Orbax), `manifest.json` (config name), `training.json` (what trained it),
  `eval.json` (every number below).

## Training data
Installed offline by `scripts/install_data.sh` (shared/DATA.md); nothing is downloaded.
- Colin27 single-subject T1 (`mricron-data` `ch2.nii.gz`) with its AAL atlas regions, except the
  held-out structures below, which are set to background in the training labels.
- The MNI152 2009a T1 template (nilearn) with its white matter (`wm > 127`) as one object.
- Synthetic: {SYNTHETIC_VOLUMES} volumes (the two T1s in turn), each with {SYNTHETIC_BLOBS} random ellipsoids painted in at random
  intensities, each ellipsoid one object.

Held out (both hemispheres, never a training object or prompt): {held}.

## Training
`python scripts/train_demo_model.py` (stages: prepare, train, export, evaluate), which runs
`medsam2_jax.training.loop.train` once per stage, from scratch and then each from the previous
stage's weights:
{stage_lines}
- All stages: one object per clip, at {m.image_size} px, along a random axis in a random direction, with flips,
  rotation, scaling and intensity jitter; prompts on the first frame: a noisy box, one click or the
  GT mask; no correction clicks; the SAM 2 loss (focal 20, Dice 1, IoU 1, object score 1); AdamW
  with warmup and cosine decay to 5% of the peak lr, weight decay {config.weight_decay}, gradient clipping at
  {config.clip_norm}; memory policy fifo (SAM 2's).
- Wall time on this machine (2 CPU cores, shared with other work part of the time): {wall}.

## Evaluation
On Colin27, for each structure: one box (the structure's bounding box on the central slice of its
axial extent), propagated forward and backward through all {results['num_slices']} axial slices with
`segment_volume` (as `medsam2-jax segment` does), no post-processing. Two naive baselines are
computed in the same script: the prompted slice's true mask copied to every slice, and the box
itself filled on every slice. Dice is over the whole volume.

### Held-out structures
{table(results['held_out'], results['held_out_mean'])}

### Structures seen in training (same brain: an optimistic reference)
{table(results['seen'], results['seen_mean'])}

## Limits
{stopping}
- One subject. The held-out structures were never labelled in training, but their image was seen
  (unlabelled) and the test brain is the training brain: this measures prompting and propagation
  on unseen *structures*, not generalisation to new patients, scanners or modalities.
- 128 px model input: thin or small structures lose detail; the model has seen no CT, no
  pathology, no 2D modality.
- Trained for minutes on a CPU. Fine-tune official SAM 2 / MedSAM2 weights for real work
  (`medsam2-jax convert`, then `medsam2-jax train --init_checkpoint`).
"""
    tmp = out / "MODEL_CARD.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "MODEL_CARD.md")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=("all", "prepare", "train", "export", "evaluate"), default="all")
    parser.add_argument("--workdir", default=str(Path.home() / ".cache" / "medsam2_jax" / "demo_train"))
    parser.add_argument("--steps", default="", help="override the stages' num_steps, e.g. demo_images=400,demo=600")
    parser.add_argument("--out", default=None,
                        help="where the exported weights go (default: WORKDIR/export); they are copied into "
                        "the package as the demo's default only when they beat both baselines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    workdir = Path(args.workdir)
    out = Path(args.out) if args.out else workdir / "export"
    if args.stage in ("all", "prepare", "train"):
        manifest = prepare(workdir / "data")
        print(f"manifest: {manifest}")
    if args.stage in ("all", "train"):
        resumed = any(p.name.isdigit() for p in workdir.glob("*/checkpoints/*"))
        steps = {k: int(v) for k, v in (x.split("=") for x in args.steps.split(",") if x)}
        config, state, seconds = train_model(manifest, workdir, steps)
        info = {"config": "configs/train.py:demo", "stages": list(STAGES), "steps": steps,
                "train_seconds_this_run": seconds, "resumed": resumed,
                "train_minutes": {v: training_minutes(workdir / v, config.log_every) for v in STAGES},
                "held_out": HELD_OUT, "manifest": [json.loads(x) for x in manifest.read_text().splitlines()]}
        export(state.params, config, out, info)
        print(f"weights: {out}")
    if args.stage == "export":  # the latest checkpoint, e.g. of a run that was stopped early
        from medsam2_jax.configs.train import get_config
        from medsam2_jax.training.checkpointing import latest_params

        step, params = latest_params(workdir / STAGES[-1])
        if step is None:
            raise SystemExit(f"no checkpoint in {workdir / STAGES[-1]}: run the train stage first")
        export(params, get_config("demo"), out, {"config": "configs/train.py:demo", "steps": {"demo": int(step)},
                                                 "exported_from": str(workdir), "held_out": HELD_OUT})
        print(f"weights of step {step}: {out}")
    if args.stage in ("all", "evaluate"):
        results = {"held_out": evaluate(out, HELD_OUT), "seen": evaluate(out, SEEN)}
        results["num_slices"] = results["held_out"][0]["num_slices"]
        results["held_out_mean"], results["seen_mean"] = summary(results["held_out"]), summary(results["seen"])
        (out / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps({k: results[k] for k in ("held_out_mean", "seen_mean")}, indent=1))
        write_card(out)
        print(f"model card: {out / 'MODEL_CARD.md'}")
        mean = results["held_out_mean"]
        if mean["dice"] > max(mean["dice_copy_mask"], mean["dice_box"]):
            if out.resolve() != WEIGHTS.resolve():
                install(out)
        else:
            print(f"not installed as the package's default weights: held-out mean Dice {mean['dice']:.3f} does not "
                  f"beat the baselines (copy mask {mean['dice_copy_mask']:.3f}, box {mean['dice_box']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`medsam2-jax evaluate`: a model against the truth and against naive baselines, per structure.

For each structure (sets.py) and each prompt protocol:
  box_largest   the structure's bounding box on its largest slice along the axis;
  box_central   the bounding box on the central slice of its extent (nearest labelled slice);
  click         one click on the largest slice, at the mask point farthest from its border;
optionally with seeded box jitter (each box edge moved by up to `jitter` x the box's side, the
MedSAM-2 paper's box perturbation). The model propagates from that one slice through the whole
volume (`segment_volume`, forward and backward passes); with `z_range` a second run is given the
structure's true first and last slice as well (the 3D box interaction of 3D Slicer's MedSAM
plugins), so propagation stays inside them.

Reported per structure, for the model and for three naive baselines computed from the same
prompt (the prompted slice's true mask copied to every slice; copied only inside the true slice
range; the prompt's box filled on every slice): volume Dice, NSD at `tolerance_mm`, HD95 in mm
(metrics.py, spacing-aware), the predicted slice range against the true one, and per-slice Dice
against the distance from the prompted slice. The in-range copy knows where the structure ends:
it is the ceiling for stopping, not a baseline a one-prompt model is expected to beat.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from medsam2_jax.evaluation import metrics
from medsam2_jax.evaluation.sets import Structure

PROTOCOLS = ("box_largest", "box_central", "click")
BASELINES = ("copy_mask", "copy_mask_in_range", "box")
METRICS = ("dice", "nsd", "hd95")


@dataclasses.dataclass(frozen=True)
class Options:
    protocol: str = "box_central"
    jitter: float = 0.0  # box perturbation: each edge moves by up to jitter x the box side
    seed: int = 0
    tolerance_mm: float = 2.0  # NSD tolerance
    z_range: bool = True  # also run the box + true slice range protocol
    window: str | None = None  # CT window for every structure (else the structure's own, or none)
    crop: float | None = None  # the model sees a window `crop` x the prompt's extent (segment_volume)

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown prompt protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"box jitter {self.jitter} must be in [0, 1): a fraction of the box side")
        if self.crop is not None and not self.crop >= 1.0:
            raise ValueError(f"crop factor {self.crop} must be at least 1 (the window holds the prompt)")
        if self.tolerance_mm < 0:
            raise ValueError(f"NSD tolerance {self.tolerance_mm} mm must not be negative")


def _slices_along(mask: np.ndarray, axis: int) -> np.ndarray:
    return mask.sum(axis=tuple(a for a in range(3) if a != axis))


def prompt_slice(target: np.ndarray, axis: int, protocol: str) -> int:
    areas = _slices_along(target, axis)
    present = np.flatnonzero(areas)
    if protocol == "box_central":
        centre = (present[0] + present[-1]) // 2
        return int(present[np.argmin(np.abs(present - centre))])
    return int(np.argmax(areas))  # box_largest, click: the largest slice


def make_prompt(structure: Structure, options: Options, rng: np.random.Generator) -> dict:
    """The protocol's prompt as a JSON-prompt object in canonical voxel coordinates."""
    target, axis = structure.target, structure.axis
    z = prompt_slice(target, axis, options.protocol)
    plane = np.take(target, z, axis=axis)
    in_plane = [a for a in range(3) if a != axis]
    entry = {"id": 1, "name": structure.name}
    if options.protocol == "click":
        from scipy import ndimage

        depth = ndimage.distance_transform_edt(np.pad(plane, 1))[1:-1, 1:-1]
        point = np.unravel_index(int(np.argmax(depth)), plane.shape)
        xyz = np.zeros(3)
        xyz[in_plane], xyz[axis] = point, z
        entry["points"], entry["point_labels"] = [xyz.tolist()], [1]
        return entry
    idx = np.argwhere(plane)
    lo, hi = idx.min(axis=0).astype(float), idx.max(axis=0).astype(float)
    if options.jitter:
        side = hi - lo + 1
        lo = lo + rng.uniform(-options.jitter, options.jitter, 2) * side
        hi = hi + rng.uniform(-options.jitter, options.jitter, 2) * side
        shape = np.array(plane.shape) - 1
        lo, hi = np.clip(np.minimum(lo, hi), 0, shape), np.clip(np.maximum(lo, hi), 0, shape)
        hi = np.maximum(hi, lo + 1)
    corners = np.zeros((2, 3))
    corners[0, in_plane], corners[1, in_plane] = lo, hi
    corners[:, axis] = z
    entry["boxes"] = [corners.tolist()]
    return entry


def _box_volume(structure: Structure, entry: dict) -> np.ndarray:
    """The prompt's box (or, for a click, nothing) filled on every slice."""
    out = np.zeros(structure.target.shape, bool)
    if "boxes" not in entry:
        return out
    (lo, hi), axis = np.asarray(entry["boxes"][0]), structure.axis
    region = [slice(None)] * 3
    for a in range(3):
        if a != axis:
            region[a] = slice(int(np.floor(lo[a])), int(np.ceil(hi[a])) + 1)
    out[tuple(region)] = True
    return out


def baselines(structure: Structure, z: int, entry: dict) -> dict[str, np.ndarray]:
    target, axis = structure.target, structure.axis
    plane = np.take(target, [z], axis=axis)
    copy = np.repeat(plane, target.shape[axis], axis=axis)
    present = np.flatnonzero(_slices_along(target, axis))
    in_range = np.zeros(target.shape[axis], bool)
    in_range[present[0] : present[-1] + 1] = True
    shape = [1, 1, 1]
    shape[axis] = -1
    return {"copy_mask": copy, "copy_mask_in_range": copy & in_range.reshape(shape),
            "box": _box_volume(structure, entry)}


def score(pred: np.ndarray, structure: Structure, z: int, tolerance_mm: float) -> dict:
    target, axis, spacing = structure.target, structure.axis, structure.volume.spacing
    r = metrics.slice_range(pred, target, axis)
    per_slice = metrics.per_slice_dice(pred, target, axis)
    nsd, hd95 = metrics.surface_scores(pred, target, spacing, tolerance_mm)
    return {
        "dice": metrics.dice(pred, target),
        "nsd": nsd,
        "hd95": hd95,
        "prompted_slice_dice": float(per_slice[z]),
        "range": dataclasses.asdict(r),
        "range_within_25pct": r.within(0.25),
        "per_slice_dice": [None if np.isnan(d) else round(float(d), 4) for d in per_slice],
    }


def evaluate_structure(structure: Structure, predictor, options: Options, rng: np.random.Generator,
                       progress: Callable[[int], None] | None = None, stop=None) -> dict:
    """`stop`: a `volumes.stopping.StopRule` for the one-box run (the ranged run keeps its range)."""
    from medsam2_jax.volumes.prompts import build_prompts, with_slice_ranges
    from medsam2_jax.volumes.segment import segment_volume

    entry = make_prompt(structure, options, rng)
    prompts = build_prompts(structure.volume, [entry], space="canonical", axis=structure.axis)
    z = prompts.prompts[0].slice_index
    window = options.window or structure.window
    t0 = time.perf_counter()
    result = segment_volume(structure.volume, prompts, predictor, window=window, crop=options.crop, stop=stop,
                            progress=progress)
    seconds = time.perf_counter() - t0
    row = {"structure": structure.name, "source": structure.source, "label": structure.label,
           "axis": structure.axis, "prompt_slice": z, "prompt": entry, "seconds": round(seconds, 2),
           "num_slices": int(structure.target.shape[structure.axis]),
           "model": score(result.labels == 1, structure, z, options.tolerance_mm)}
    row["model"]["object_scores"] = [None if np.isnan(s) else round(s, 3) for s in result.slice_scores[1]]
    if options.z_range:
        present = np.flatnonzero(_slices_along(structure.target, structure.axis))
        ranged = with_slice_ranges(prompts, {1: (int(present[0]), int(present[-1]))})
        ranged_result = segment_volume(structure.volume, ranged, predictor, window=window, crop=options.crop,
                                       progress=progress)
        row["model_z_range"] = score(ranged_result.labels == 1, structure, z, options.tolerance_mm)
    for name, mask in baselines(structure, z, entry).items():
        row[name] = score(mask, structure, z, options.tolerance_mm)
    return row


def methods(rows: Sequence[dict]) -> list[str]:
    first = rows[0]
    return [m for m in ("model", "model_z_range", *BASELINES) if m in first]


def summarise(rows: Sequence[dict]) -> dict:
    """Means over structures (HD95 over the structures where it is defined), slice-range counts,
    and the per-slice Dice curve by distance from the prompted slice."""
    out = {}
    for m in methods(rows):
        hd = [r[m]["hd95"] for r in rows if not np.isnan(r[m]["hd95"])]
        out[m] = {
            "dice": float(np.mean([r[m]["dice"] for r in rows])),
            "nsd": float(np.mean([r[m]["nsd"] for r in rows])),
            "hd95": float(np.mean(hd)) if hd else float("nan"),
            "hd95_undefined": len(rows) - len(hd),
            "prompted_slice_dice": float(np.mean([r[m]["prompted_slice_dice"] for r in rows])),
            "range_within_25pct": int(sum(r[m]["range_within_25pct"] for r in rows)),
            "slices_predicted": float(np.mean([r[m]["range"]["slices_predicted"] for r in rows])),
            "predicted_outside": float(np.mean([r[m]["range"]["predicted_outside"] for r in rows])),
            "dice_by_distance": dice_by_distance(rows, m),
        }
    out["slices_true"] = float(np.mean([r["model"]["range"]["slices_true"] for r in rows]))
    out["num_structures"] = len(rows)
    return out


def dice_by_distance(rows: Sequence[dict], method: str) -> list[float | None]:
    """Mean per-slice Dice at |slice - prompted slice| = 0, 1, 2, ..., over the structures' true
    slices (slices where the structure is)."""
    sums: dict[int, list[float]] = {}
    for r in rows:
        truth = r["model"]["range"]
        for k, d in enumerate(r[method]["per_slice_dice"]):
            if d is None or not (truth["true_first"] <= k <= truth["true_last"]):
                continue
            sums.setdefault(abs(k - r["prompt_slice"]), []).append(d)
    top = max(sums) if sums else -1
    return [float(np.mean(sums[k])) if k in sums else None for k in range(top + 1)]


def evaluate(structures: Sequence[Structure], predictor, options: Options, *, policy: str = "fifo", stop=None,
             progress: Callable[[int], None] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Every structure under `options`; `policy` names the predictor's memory policy in the results;
    `stop` (a `volumes.stopping.StopRule`) ends the one-box runs."""
    rng = np.random.default_rng(options.seed)
    rows = []
    for s in structures:
        rows.append(evaluate_structure(s, predictor, options, rng, progress, stop))
        if log is not None:
            r = rows[-1]
            log(f"{s.name}: Dice {r['model']['dice']:.3f}"
                + (f" (with range {r['model_z_range']['dice']:.3f})" if "model_z_range" in r else "")
                + f", copy {r['copy_mask']['dice']:.3f}, box {r['box']['dice']:.3f}; slices "
                f"{r['model']['range']['slices_predicted']}/{r['model']['range']['slices_true']}")
    return {"options": dataclasses.asdict(options), "policy": policy, "stop": None if stop is None else stop.to_dict(),
            "rows": rows, "summary": summarise(rows)}


# ----------------------------------------------------------------------------------------------
# Reports

LABELS = {"model": "model (one box)", "model_z_range": "model (box + slice range)",
          "copy_mask": "copy prompted mask", "copy_mask_in_range": "copy mask in true range (ceiling)",
          "box": "box on every slice"}


def _fmt(x, digits=3):
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def markdown(results: dict, title: str = "Evaluation") -> str:
    rows, summary = results["rows"], results["summary"]
    ms = methods(rows)
    o = results["options"]
    lines = [f"# {title}", "",
             f"Protocol `{o['protocol']}`"
             + (f" with box jitter {o['jitter']:g} (seed {o['seed']})" if o["jitter"] else "")
             + (f", the model shown a window {o['crop']:g}x the prompt on every slice (`--crop`)"
                if o.get("crop") else "")
             + f", memory policy `{results['policy']}`, NSD tolerance {o['tolerance_mm']:g} mm, "
             f"{summary['num_structures']} structures.", "",
             "## Means", "",
             "| method | Dice | NSD | HD95 (mm) | prompted-slice Dice | slices predicted (true "
             f"{summary['slices_true']:.0f}) | outside the true range | range within +/-25% |",
             "|---|---|---|---|---|---|---|---|"]
    for m in ms:
        s = summary[m]
        hd = _fmt(s["hd95"], 1) + (f" ({s['hd95_undefined']} undefined)" if s["hd95_undefined"] else "")
        lines.append(f"| {LABELS[m]} | {s['dice']:.3f} | {s['nsd']:.3f} | {hd} | {s['prompted_slice_dice']:.3f} | "
                     f"{s['slices_predicted']:.1f} | {s['predicted_outside']:.1f} | "
                     f"{s['range_within_25pct']}/{summary['num_structures']} |")
    lines += ["", "## Per structure (volume Dice / NSD / HD95 mm; slices first-last)", "",
              "| structure | true slices | " + " | ".join(LABELS[m] for m in ms) + " |",
              "|---|---|" + "---|" * len(ms)]
    for r in rows:
        t = r["model"]["range"]
        cells = []
        for m in ms:
            x = r[m]
            pr = x["range"]
            span = "none" if pr["pred_first"] is None else f"{pr['pred_first']}-{pr['pred_last']}"
            cells.append(f"{x['dice']:.3f} / {x['nsd']:.3f} / {_fmt(x['hd95'], 1)}; {span}")
        lines.append(f"| {r['structure']} | {t['true_first']}-{t['true_last']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    styles = {"model": ("C0", "-"), "model_z_range": ("C0", "--"), "copy_mask": ("C1", "-"),
              "copy_mask_in_range": ("C2", ":"), "box": ("C3", "-")}
    for m in methods(results["rows"]):
        curve = summary[m]["dice_by_distance"]
        xs = [k for k, v in enumerate(curve) if v is not None]
        color, style = styles[m]
        ax.plot(xs, [curve[k] for k in xs], style, color=color, label=LABELS[m], lw=1.6)
    ax.set_xlabel("slices from the prompted slice")
    ax.set_ylabel("per-slice Dice (mean over structures)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"Dice vs distance from the prompt ({summary['num_structures']} structures)", fontsize=10)
    fig.tight_layout()
    from medsam2_jax.volumes.output import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _jsonable(x):
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return _jsonable(x.item())
    return x


def write_report(results: dict, out_dir: Path, *, stem: str = "evaluation", title: str = "Evaluation") -> dict:
    """JSON (NaN as null), Markdown and PNG, each written atomically; returns their paths."""
    from medsam2_jax.volumes.output import atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md", "plot": out_dir / f"{stem}.png"}
    with atomic_path(paths["json"]) as tmp:
        Path(tmp).write_text(json.dumps(_jsonable(results), indent=1, allow_nan=False) + "\n")
    with atomic_path(paths["markdown"]) as tmp:
        Path(tmp).write_text(markdown(results, title))
    plot(results, paths["plot"])
    return paths

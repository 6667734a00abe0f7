"""Fit the stop rule (medsam2_jax/volumes/stopping.py) of a model on structures it trained on.

Every AAL structure of Colin27 except the held-out ones (evaluation/sets.py) is segmented from one
box on its central axial slice, tracked through the whole volume (no rule), with `--policy`. Each
tracked slice gives the rule's features and whether the structure is on it. A class-balanced
logistic regression maps features to presence; the threshold and run length are then chosen to
maximise the mean volume Dice of the cut masks over these same structures. The held-out
structures are not read.

    python scripts/fit_stop_rule.py                     # the shipped demo model, written into its manifest
    python scripts/fit_stop_rule.py --checkpoint DIR    # another export
    python scripts/fit_stop_rule.py --dry-run           # print, write nothing

Output: the manifest's `inference.stop` (with the policy it was fitted with) and `stop_rule.json` (the fit,
per-structure Dice, timings) beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medsam2_jax import datasets  # noqa: E402
from medsam2_jax.evaluation import evaluate as E  # noqa: E402
from medsam2_jax.evaluation import metrics, sets  # noqa: E402
from medsam2_jax.volumes import stopping  # noqa: E402
from medsam2_jax.volumes.output import atomic_path  # noqa: E402

THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.3, 0.96, 0.05)) + (0.97, 0.98, 0.99)
RUNS = (1, 2, 3)
MIN_SLICES = 3  # structures shorter than this along the axis teach nothing about ends


def training_structures() -> list[sets.Structure]:
    from medsam2_jax.volumes.io import load_label_volume, load_volume

    volume = load_volume(datasets.colin27())
    atlas = load_label_volume(datasets.aal(), volume)
    out = []
    for label in (int(i) for i in np.unique(atlas) if i and int(i) not in sets.AAL_HELD_OUT):
        target = atlas == label
        if target.any(axis=(0, 1)).sum() >= MIN_SLICES:
            out.append(sets.Structure(f"aal_{label}", "colin27", label, volume, target, axis=2))
    return out


def track(structures, predictor, log) -> list[dict]:
    """Per structure: prompted slice, the rule's features, whether the structure is there, and the
    predicted and overlapping voxels, per slice (what the volume Dice of any cut needs)."""
    from medsam2_jax.volumes.prompts import build_prompts
    from medsam2_jax.volumes.segment import segment_volume

    rng = np.random.default_rng(0)
    options = E.Options(protocol="box_central", z_range=False)
    rows = []
    for s in structures:
        entry = E.make_prompt(s, options, rng)
        prompts = build_prompts(s.volume, [entry], space="canonical", axis=2)
        t0 = time.perf_counter()
        result = segment_volume(s.volume, prompts, predictor)
        pred = result.labels == 1
        rows.append({"name": s.name, "z": prompts.prompts[0].slice_index, "features": result.slice_features[1],
                     "present": s.target.any(axis=(0, 1)), "truth_voxels": int(s.target.sum()),
                     "pred_voxels": pred.sum(axis=(0, 1)), "overlap_voxels": (pred & s.target).sum(axis=(0, 1))})
        log(f"{s.name}: {time.perf_counter() - t0:.1f} s, Dice without a rule {metrics.dice(pred, s.target):.3f}")
    return rows


def dice(row: dict, rule: stopping.StopRule | None) -> float:
    """The volume Dice of the prediction with the rule applied."""
    k = stopping.kept_slices(row["features"], row["z"], rule)
    return float(2 * row["overlap_voxels"][k].sum() / (row["pred_voxels"][k].sum() + row["truth_voxels"]))


def fit(rows: list[dict], policy: str, log, features=stopping.FEATURES) -> tuple[stopping.StopRule, dict]:
    """The rule on `features` only (the others' weights 0): logistic fit, then threshold and run."""
    x, y = [], []
    for r in rows:
        keep = ~np.isnan(r["features"][:, 0])
        x.append(r["features"][keep])
        y.append(r["present"][keep])
    x, y = np.concatenate(x), np.concatenate(y)
    used = [stopping.FEATURES.index(f) for f in features]
    weights = np.zeros(len(stopping.FEATURES))
    weights[used], bias = stopping.fit(x[:, used], y)
    scores = []
    for threshold in THRESHOLDS:
        for run in RUNS:
            rule = stopping.StopRule(tuple(weights), bias, threshold, run, policy)
            mean = float(np.mean([dice(r, rule) for r in rows]))
            scores.append({"threshold": threshold, "run": run, "dice": mean})
            log(f"threshold {threshold} run {run}: mean Dice {mean:.3f}")
    best = max(scores, key=lambda s: s["dice"])
    rule = stopping.StopRule(tuple(weights), bias, best["threshold"], best["run"], policy)
    report = {
        "structures": len(rows), "slices": int(len(y)), "present_fraction": float(y.mean()),
        "rule": rule.to_dict(), "grid": scores,
        "dice_without_rule": float(np.mean([dice(r, None) for r in rows])),
        "dice_with_rule": best["dice"],
        "per_structure": {r["name"]: round(dice(r, rule), 4) for r in rows},
    }
    return rule, report


def save_rows(path: Path, rows: list[dict]) -> None:
    write_json(path, [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in r.items()} for r in rows])


def load_rows(path: Path) -> list[dict]:
    rows = json.loads(path.read_text())
    return [{k: np.array(v, np.float64 if k == "features" else None) if isinstance(v, list) else v
             for k, v in r.items()} for r in rows]


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def main(argv=None) -> int:
    from medsam2_jax import load_model, weights
    from medsam2_jax.tracker.config import get_tracker_config
    from medsam2_jax.tracker.predictor import VideoPredictor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="an export folder (default: the shipped demo weights)")
    ap.add_argument("--policy", default="fifo", help="memory policy to track with (default fifo, SAM 2's)")
    ap.add_argument("--limit", type=int, help="only the first N structures (a quick try)")
    ap.add_argument("--features", default=",".join(stopping.FEATURES),
                    help=f"the features the rule may use (default all: {','.join(stopping.FEATURES)}); an ablation")
    ap.add_argument("--cache", help="a JSON file of the tracked structures' rows: read if it exists, else written "
                    "(refits without tracking again)")
    ap.add_argument("--dry-run", action="store_true", help="print the fit, write nothing")
    args = ap.parse_args(argv)

    folder = Path(args.checkpoint) if args.checkpoint else weights.default_checkpoint().path
    params, config = load_model(args.checkpoint)
    predictor = VideoPredictor(params, config, get_tracker_config(memory_policy=args.policy))
    features = tuple(args.features.split(","))
    if not set(features) <= set(stopping.FEATURES):
        ap.error(f"--features: choose from {', '.join(stopping.FEATURES)}")
    t0 = time.perf_counter()
    if args.cache and Path(args.cache).is_file():
        rows = load_rows(Path(args.cache))
    else:
        rows = track(training_structures()[: args.limit], predictor, lambda line: print(line, flush=True))
        if args.cache:
            save_rows(Path(args.cache), rows)
    rule, report = fit(rows, args.policy, lambda line: print(line, flush=True), features)
    report.update(seconds=round(time.perf_counter() - t0, 1), checkpoint=folder.name, config=config.name,
                  command=f"python scripts/fit_stop_rule.py --policy {args.policy}"
                  + (f" --features {args.features}" if features != stopping.FEATURES else ""))
    print(json.dumps(report["rule"]), f"\nmean Dice on these structures: {report['dice_without_rule']:.3f} "
          f"without the rule, {report['dice_with_rule']:.3f} with it")
    if args.dry_run:
        return 0
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.setdefault("inference", {})["stop"] = rule.to_dict()  # the rule names its policy
    write_json(folder / "stop_rule.json", report)
    write_json(folder / "manifest.json", manifest)
    print(f"wrote {folder / 'manifest.json'} (inference.stop) and {folder / 'stop_rule.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

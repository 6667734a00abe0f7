"""Clips per second of the grain training pipeline on this host (one process, one host's share).

    python benchmarks/bench_input.py [--manifest FILE.jsonl]
        [--sizes 512,1024] [--workers 0,1,2] [--clips 24] [--batch 2] [--config sam2.1_tiny]

The real path of `loop.train`: `data.dataset_from_config` (NIfTI decoding, slicing, the affine and
intensity augmentation, prompt simulation) with 8-frame clips of 3 objects, timed over `--clips`
clips after one warm-up batch (which also starts the grain workers). Two regimes:
  cached     the manifest as given: a few distinct volumes, so after the first reads every clip
             comes from the decoded volumes each process keeps (data.load_pair's cache of 8)
  decoding   the same files behind `--copies` distinct symlinked paths per entry, shuffled, so
             most clips decode their NIfTI pair again (a pod's manifest of thousands of volumes)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def _symlinked_manifest(manifest: Path, copies: int, folder: Path) -> Path:
    """Every entry `copies` times, each copy reading its files through its own symlinks."""
    lines = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    out = []
    for copy in range(copies):
        for n, entry in enumerate(lines):
            linked = dict(entry)
            for field in ("image", "label"):
                source = Path(entry[field])
                source = source if source.is_absolute() else manifest.parent / source
                link = folder / f"{copy}_{n}_{field}{''.join(source.suffixes)}"
                link.symlink_to(source.resolve())
                linked[field] = str(link)
            out.append(json.dumps(linked))
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(out) + "\n")
    return path


def clips_per_second(config, *, batch: int, clips: int) -> tuple[float, float, float]:
    """(clips/s after the warm-up batch, seconds of the warm-up batch, CPU seconds per clip of
    this process: all the work with worker_count=0, which makes it independent of the load)."""
    import grain

    from medsam2_jax.training import data

    data._load_pair_cached.cache_clear()
    it = iter(data.dataset_from_config(config, batch_size=batch, shard=grain.sharding.ShardOptions(0, 1)))
    t0 = time.perf_counter()
    next(it)
    warm = time.perf_counter() - t0
    batches = max(1, clips // batch)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - t0)
    cpu_per_clip = (time.process_time() - cpu0) / (batches * batch)
    if hasattr(it, "close"):  # stops grain's worker processes before the next row is timed
        it.close()
    return rate, warm, cpu_per_clip


# Where `scripts/train_demo_model.py --stage prepare` writes its manifest (its default --workdir).
DEMO_MANIFEST = Path.home() / ".cache" / "medsam2_jax" / "demo_train" / "data" / "train.jsonl"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=str(DEMO_MANIFEST),
                    help="a training manifest (default: the demo recipe's, made by "
                    "`python scripts/train_demo_model.py --stage prepare`)")
    ap.add_argument("--config", default="sam2.1_tiny", help="training variant whose data/prompt settings to use")
    ap.add_argument("--sizes", default="512,1024")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--regimes", default="cached,decoding")
    ap.add_argument("--copies", type=int, default=4, help="symlinked copies per entry in the decoding regime")
    ap.add_argument("--clips", type=int, default=24, help="clips timed per row")
    ap.add_argument("--batch", type=int, default=2, help="clips per batch (this host's share of a step)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if not Path(args.manifest).is_file():
        raise SystemExit(f"{args.manifest}: no such manifest; give --manifest, or make the demo's with "
                         "`python scripts/train_demo_model.py --stage prepare`")

    from medsam2_jax.configs.train import get_config

    rows = []
    # Left in place (a few symlinks): grain's read-ahead threads may still open them at exit.
    tmp = tempfile.mkdtemp(prefix="bench_input_")
    manifests = {"cached": Path(args.manifest)}
    if "decoding" in args.regimes:
        manifests["decoding"] = _symlinked_manifest(Path(args.manifest), args.copies, Path(tmp))
    for regime in args.regimes.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            for workers in (int(w) for w in args.workers.split(",")):
                config = get_config(args.config)
                config.data.manifest = str(manifests[regime])
                config.data.image_size = config.model_config.image_size = size
                config.data.clip_length = 8
                config.data.objects_per_clip = 3
                config.data.worker_count = workers
                rate, warm, cpu = clips_per_second(config, batch=args.batch, clips=args.clips)
                row = dict(regime=regime, image_size=size, workers=workers, clips_per_s=rate, warmup_s=warm,
                           cpu_s_per_clip=cpu if workers == 0 else None, load=os.getloadavg()[0])
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| regime | px | grain workers | clips/s | CPU s / clip (workers 0) | first batch (s) | load average |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cpu = "-" if r["cpu_s_per_clip"] is None else f"{r['cpu_s_per_clip']:.2f}"
        print(f"| {r['regime']} | {r['image_size']} | {r['workers']} | {r['clips_per_s']:.2f} | {cpu} "
              f"| {r['warmup_s']:.1f} | {r['load']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

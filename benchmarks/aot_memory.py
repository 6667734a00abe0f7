"""Per-device memory and FLOPs of the real train step, compiled ahead of time for a TPU mesh.

    python benchmarks/aot_memory.py [--variants sam2.1_tiny,sam2.1_base_plus,sam2.1_large]
        [--meshes 1x8,1x64] [--remat on,off] [--clips-per-device 1] [--image-size 1024]
        [--clip-length 8] [--compute-dtype bfloat16] [--target cpu|v5e|v5p] [--no-compile]
        [--compiler-option NAME=VALUE] [--json FILE] [--config.FIELD=VALUE ...]

--target cpu (the default) compiles with XLA's CPU backend for simulated host devices;
--target v5e / v5p with the TPU compiler for a compile-only slice of 8 or 64 chips
(`jax.experimental.topologies`; needs the `libtpu` that matches jax, no TPU). libtpu 0.0.42
aborts in its space-to-batch pass on this step unless started with
LIBTPU_INIT_ARGS="--xla_tpu_run_space_to_batch=false --xla_tpu_run_space_to_batch_on_new_platforms=false";
a program that cannot fit is reported with the temporaries the compiler asked for.

Nothing is allocated: the TrainState comes from `jax.eval_shape`, the batch is ShapeDtypeStructs
shaped like one record of the grain pipeline, and the step is the training loop's own
(`loop.train`'s mesh, `sharding.state_shardings`, `train_step.make_steps`), lowered and compiled
for `--xla_force_host_platform_device_count` simulated CPU devices. Per device it reports:
  params, opt state  the bytes of this device's shards, read from the executable's input shardings
  batch              this device's clips
  temporaries        memory_analysis().temp_size_in_bytes: activations, gradients, buffers
  peak               arguments + outputs - donated (aliased) + temporaries
  FLOPs              matmul + convolution FLOPs counted on the step's jaxpr with every scan body
                     times its length (remat recomputation included), divided by the devices;
                     and cost_analysis()['flops'] of the compiled per-device program, which XLA
                     counts with each loop body once, so it undercounts a step built on scans.
The CPU compiler lays out buffers and fuses differently from the TPU one, so the memory is an
estimate of what a TPU would need, not a TPU measurement. The attention implementation is set
to "fused" (what "auto" picks on a TPU), not the chunked CPU kernel.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time

GIB = 2**30
# Compile-only TPU topologies by device count (jax.experimental.topologies; v5p chips in megacore).
TOPOLOGIES = {
    "v5e": {8: "v5e:2x4", 64: "v5e:8x8"},
    "v5p": {8: "v5p:2x2x2", 64: "v5p:4x4x4"},
}
# Per-chip HBM and bf16 peak (Google Cloud TPU system architecture pages).
CHIPS = {"v5e": (16 * GIB, 197e12), "v5p": (95 * GIB, 459e12)}


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="sam2.1_tiny,sam2.1_base_plus,sam2.1_large",
                    help="training config variants (configs/train.py)")
    ap.add_argument("--meshes", default="1x8,1x64", help="DATAxFSDP mesh shapes, comma-separated")
    ap.add_argument("--remat", default="on,off", help="on, off or both (on,off)")
    ap.add_argument("--clips-per-device", type=int, default=1,
                    help="clips per device per step (SAM 2 trains 1 clip of 8 frames per GPU)")
    ap.add_argument("--image-size", type=int, default=0, help="pixels; 0 keeps the variant's")
    ap.add_argument("--clip-length", type=int, default=0, help="frames per clip; 0 keeps the variant's")
    ap.add_argument("--compute-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--attention-impl", default="fused", help="model attention_impl (fused = what a TPU runs)")
    ap.add_argument("--target", default="cpu", choices=("cpu", *TOPOLOGIES),
                    help="cpu: simulated host devices; v5e/v5p: the TPU compiler on a compile-only "
                    "topology (needs libtpu installed; no TPU)")
    ap.add_argument("--no-compile", action="store_true",
                    help="trace and lower only: shard bytes and jaxpr FLOPs, no memory_analysis (seconds, not minutes)")
    ap.add_argument("--compiler-option", action="append", default=[], metavar="NAME=VALUE",
                    help="an XLA option for the compile, e.g. xla_tpu_run_space_to_batch=false")
    ap.add_argument("--json", default="", help="also write the rows as JSON to this file ('-' = stdout)")
    args, overrides = ap.parse_known_args(argv)
    args.overrides = overrides  # --config.FIELD=VALUE, as `medsam2-jax train` takes them
    args.meshes = [tuple(int(n) for n in m.split("x")) for m in args.meshes.split(",")]
    args.remat = [{"on": True, "off": False}[r] for r in args.remat.split(",")]
    args.variants = args.variants.split(",")
    return args


def _simulate_devices(count: int) -> None:
    """Must run before jax is imported: the CPU backend reads XLA_FLAGS once."""
    if "jax" in sys.modules:
        raise RuntimeError("set the simulated device count before importing jax")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def target_devices(target: str, count: int):
    """The first `count` simulated CPU devices, or the devices of a compile-only TPU topology."""
    import jax

    if target == "cpu":
        return jax.devices()[:count]
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(
        topology_name=TOPOLOGIES[target][count], platform="tpu",
        chip_config_name="megacore" if target == "v5p" else "default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False))
    return topology.devices


def train_config(variant, *, remat, clips_per_device, devices, mesh_shape, image_size=0, clip_length=0,
                 compute_dtype="bfloat16", attention_impl="fused", overrides=()):
    """The training config of `variant` as the AOT run compiles it."""
    from medsam2_jax.configs.train import get_config
    from medsam2_jax.training.cli import apply_overrides

    config = get_config(variant)
    apply_overrides(config, overrides)
    if image_size:
        config.model_config.image_size = config.data.image_size = image_size
    if clip_length:
        config.data.clip_length = clip_length
    config.model_config.attention_impl = attention_impl
    config.remat = remat
    config.compute_dtype = compute_dtype
    config.batch_size = clips_per_device * devices
    config.mesh_shape = mesh_shape
    return config


def record_structure(config) -> dict:
    """One record of the grain pipeline (ClipSampler on a small synthetic NIfTI pair), so the
    abstract batch has exactly the fields and dtypes training feeds the step."""
    import nibabel as nib
    import numpy as np

    from medsam2_jax.training import data, prompts

    depth = config.data.clip_length + 2
    image = np.random.default_rng(0).uniform(0, 100, (24, 24, depth)).astype(np.float32)
    labels = np.zeros(image.shape, np.int16)
    labels[6:18, 6:18, :] = 1
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, name) for name in ("image.nii.gz", "label.nii.gz")]
        for array, path in zip((image, labels), paths):
            nib.save(nib.Nifti1Image(array, np.eye(4)), path)
        sampler = data.ClipSampler(data.ClipConfig.from_config(config.data), "raise",
                                   prompts.PromptConfig.from_config(config.prompts))
        record = sampler.random_map(data.Entry(0, *paths), np.random.default_rng(0))
        data._load_pair_cached.cache_clear()
    return record


def abstract_batch(config, batch_sharding):
    """ShapeDtypeStructs of a global batch (leading axis = config.batch_size clips)."""
    import jax
    import numpy as np

    record = record_structure(config)
    return {k: jax.ShapeDtypeStruct((config.batch_size, *np.shape(v)), np.asarray(v).dtype, sharding=batch_sharding)
            for k, v in record.items()}


def _sub_jaxprs(eqn):
    """(jaxpr, times it runs) for every jaxpr inside an equation; a cond counts its costliest branch."""
    import jax

    name = eqn.primitive.name
    if name == "scan":
        return [(eqn.params["jaxpr"].jaxpr, eqn.params["length"])]
    if name == "cond":
        costliest = max(eqn.params["branches"], key=lambda b: matmul_flops(b.jaxpr))
        return [(costliest.jaxpr, 1)]
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                found.append((item.jaxpr, 1))
            elif isinstance(item, jax.extend.core.Jaxpr):
                found.append((item, 1))
    return found  # a while loop's body counts once: its trip count is not static


def matmul_flops(jaxpr, *, loops_once: bool = False) -> int:
    """2 x multiply-adds of every dot_general and convolution, scan bodies times their length
    (or once with `loops_once`, as XLA's cost analysis counts them)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * (math.prod(rhs) // out_features)
        for sub, times in _sub_jaxprs(eqn):
            total += (1 if loops_once else times) * matmul_flops(sub, loops_once=loops_once)
    return total


def _shard_bytes(tree, shardings, fallback=None) -> int:
    """Bytes of one device's shards of `tree`. The executable reports None for an input it does
    not read (jit prunes it); `fallback` (the shardings passed in) covers those."""
    import jax
    import numpy as np

    fallback = shardings if fallback is None else fallback

    def size(x, s, f):
        return math.prod((s or f).shard_shape(x.shape)) * np.dtype(x.dtype).itemsize

    return int(sum(jax.tree.leaves(jax.tree.map(size, tree, shardings, fallback))))


def analyse(variant, mesh_shape, *, remat, clips_per_device=1, image_size=0, clip_length=0,
            compute_dtype="bfloat16", attention_impl="fused", target="cpu", overrides=(), compile=True,
            compiler_options=None) -> dict:
    """Traces, lowers and compiles the train step of `variant` on a (data, fsdp) mesh of the
    first data * fsdp devices; returns one table row (bytes and FLOPs per device, seconds)."""
    import jax

    from medsam2_jax.model.sam2 import init_params
    from medsam2_jax.training import sharding
    from medsam2_jax.training.optimizer import make_optimizer
    from medsam2_jax.training.state import TrainState
    from medsam2_jax.training.train_step import make_steps

    devices = math.prod(mesh_shape)
    config = train_config(variant, remat=remat, clips_per_device=clips_per_device, devices=devices,
                          mesh_shape=mesh_shape, image_size=image_size, clip_length=clip_length,
                          compute_dtype=compute_dtype, attention_impl=attention_impl, overrides=overrides)
    # loop.train's set-up, minus the data and the checkpoints.
    mesh = sharding.make_mesh(config.mesh_shape, devices=target_devices(target, devices))
    abstract_params = jax.eval_shape(lambda k: init_params(k, config.model_config), jax.random.key(0))
    tx = make_optimizer(abstract_params, config)
    abstract_state = jax.eval_shape(lambda p: TrainState.create(p, tx, jax.random.key(0)), abstract_params)
    shardings = sharding.state_shardings(abstract_state, tx, mesh, config.sharding_rules,
                                         min_size_mb=config.fsdp_min_size_mb)
    steps = make_steps(config, state_shardings=shardings, batch_sharding=sharding.batch_sharding(mesh))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
    batch = abstract_batch(config, sharding.batch_sharding(mesh))

    t0 = time.perf_counter()
    traced = steps.train_step.trace(state, batch)
    flops = matmul_flops(traced.jaxpr.jaxpr)
    flops_loops_once = matmul_flops(traced.jaxpr.jaxpr, loops_once=True)
    lowered = traced.lower()
    t1 = time.perf_counter()
    row = {
        "variant": variant, "target": target, "overrides": list(overrides), "mesh": list(mesh_shape),
        "devices": devices, "remat": remat, "clips_per_device": clips_per_device,
        "image_size": config.model_config.image_size, "clip_length": config.data.clip_length,
        "objects_per_clip": config.data.objects_per_clip, "compute_dtype": compute_dtype,
        "param_count": int(sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params))),
        "params_bytes_total": _shard_bytes(abstract_state.params,
                                           jax.tree.map(lambda _: _Whole(), abstract_state.params)),
        # As lowered: the shardings jit was given, which bind the compiled program's inputs.
        "params_bytes": _shard_bytes(abstract_state.params, shardings.params),
        "opt_state_bytes": _shard_bytes(abstract_state.opt_state, shardings.opt_state),
        "batch_bytes": _shard_bytes(batch, {k: v.sharding for k, v in batch.items()}),
        "flops_per_device": flops / devices,
        "flops_per_device_loops_once": flops_loops_once / devices,
        "trace_lower_s": t1 - t0,
    }
    if not compile:
        return row
    try:
        compiled = lowered.compile(compiler_options=compiler_options or None)
    except jax.errors.JaxRuntimeError as error:
        # The TPU compiler refuses a program that cannot fit and says how much it needed (GiB).
        needed = re.search(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", str(error))
        if not needed:
            raise
        return row | {"does_not_fit": True, "temp_bytes": float(needed.group(1)) * GIB,
                      "hbm_bytes": float(needed.group(2)) * GIB, "compile_s": time.perf_counter() - t1}
    t2 = time.perf_counter()

    (state_in, _), _ = compiled.input_shardings
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)
    return row | {
        # As compiled: the executable's own input shardings (None for an input it does not read).
        "params_bytes": _shard_bytes(abstract_state.params, state_in.params, shardings.params),
        "opt_state_bytes": _shard_bytes(abstract_state.opt_state, state_in.opt_state, shardings.opt_state),
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "peak_bytes": peak,
        "cost_analysis_flops": float(cost.get("flops", float("nan"))),
        "compile_s": t2 - t1,
    }


class _Whole:
    """A stand-in sharding that keeps the whole array (for totals)."""

    def shard_shape(self, shape):
        return shape


def fits(row) -> dict:
    return {chip: row["peak_bytes"] <= hbm for chip, (hbm, _) in CHIPS.items()}


def format_table(rows) -> str:
    """Markdown; a lower-only row (--no-compile) shows '-' where the compiler's numbers go."""
    head = ("| model | compiler | mesh (data x fsdp) | remat | params (M) | params / dev (MiB) "
            "| opt state / dev (MiB) | temporaries / dev (GiB) | peak / dev (GiB) "
            "| TFLOP / step / dev (scans x trip count) | cost_analysis TFLOP (loop bodies once) "
            "| fits v5e 16 GiB | fits v5p 95 GiB | step at v5e / v5p peak (s) | compile (s) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("does_not_fit"):
            temp, peak, cost = f">= {r['temp_bytes'] / GIB:.2f}", "over HBM", "-"
            compile_s, v5e, v5p = f"{r['compile_s']:.0f}", "no (compiler)", "-"
            if r["target"] == "v5p":
                v5e, v5p = "no", "no (compiler)"
        elif "peak_bytes" in r:
            ok = fits(r)
            temp, peak = f"{r['temp_bytes'] / GIB:.2f}", f"{r['peak_bytes'] / GIB:.2f}"
            cost, compile_s = f"{r['cost_analysis_flops'] / 1e12:.2f}", f"{r['compile_s']:.0f}"
            v5e, v5p = ("yes" if ok[c] else "no" for c in ("v5e", "v5p"))
        else:
            temp = peak = cost = compile_s = v5e = v5p = "-"
        lines.append(
            f"| {r['variant']} | {r['target']} | {r['mesh'][0]} x {r['mesh'][1]} | {'on' if r['remat'] else 'off'} "
            f"| {r['param_count'] / 1e6:.1f} | {r['params_bytes'] / 2**20:.1f} | {r['opt_state_bytes'] / 2**20:.1f} "
            f"| {temp} | {peak} | {r['flops_per_device'] / 1e12:.2f} | {cost} | {v5e} | {v5p} "
            f"| {r['flops_per_device'] / CHIPS['v5e'][1]:.3f} / {r['flops_per_device'] / CHIPS['v5p'][1]:.3f} "
            f"| {compile_s} |")
    return "\n".join(lines)


def _option(text: str):
    name, _, value = text.partition("=")
    return name, {"true": True, "false": False}.get(value.lower(), value)


def main(argv=None) -> None:
    args = _parse_args(argv)
    if args.target == "cpu":
        _simulate_devices(max(math.prod(m) for m in args.meshes))
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu only compiles here; nothing runs
    rows = []
    for variant in args.variants:
        for mesh_shape in args.meshes:
            for remat in args.remat:
                row = analyse(variant, mesh_shape, remat=remat, clips_per_device=args.clips_per_device,
                              image_size=args.image_size, clip_length=args.clip_length,
                              compute_dtype=args.compute_dtype, attention_impl=args.attention_impl,
                              target=args.target, overrides=args.overrides, compile=not args.no_compile,
                              compiler_options=dict(_option(o) for o in args.compiler_option))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print(format_table(rows))
    if args.json:
        text = json.dumps(rows, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")


if __name__ == "__main__":
    main()

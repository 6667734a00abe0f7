# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Memory selection: does MedSAM-2's self-sorting bank beat SAM 2's FIFO?
#
# MedSAM-2 claims that a self-sorting memory bank (confidence + dissimilarity, order-free) beats
# SAM 2's recent-frames FIFO in 3D and makes One-Prompt 2D work. This notebook measures that
# claim with the trained demo model that ships with the package (`medsam2_jax.load_model()`,
# 128 px; see its model card for what it can and cannot do), on structures it never saw labelled:
#
# 1. **3D**: the held-out AAL structures of Colin27 and stardist's synthetic 3D nuclei, one box on
#    the central slice, whole volume, measured by `medsam2_jax.evaluation` (what
#    `medsam2-jax evaluate` runs) under `fifo`, `self_sorting` and `medsam2_released`.
# 2. **One-Prompt 2D** (memory-bank.md section 5): one prompted template slice, then a shuffled
#    stream of other slices of the same structure and of its mirror image in the other hemisphere.
#    Dice per policy, and its spread over random image orders (the order-independence claimed).
# 3. **Sweeps compiled once**: self_sorting's numeric knobs are traced values, so one `jax.jit`
#    call evaluates a whole grid (`vmap` over the values); the structural knobs (K, read mode, R,
#    tpos) change shapes or code and compile once per value.
#
# `scripts/memory_selection.py` runs this notebook at full size and writes its tables and figures
# to `docs/memory_selection/` (shown in the README). Environment knobs shrink the run (the test
# suite executes it with one structure, two orders of four images, two-value grids, no nuclei, no
# structural sweep and no timed loop).

# %%
import json
import os
import time
from pathlib import Path

import jax
import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt
import numpy as np

import medsam2_jax
from medsam2_jax.evaluation import evaluate as E
from medsam2_jax.evaluation import metrics, sets
from medsam2_jax.one_prompt import segment_one_prompt, segment_one_prompt_batch, segment_one_prompt_sweep
from medsam2_jax.tracker import propagate
from medsam2_jax.tracker.config import get_tracker_config
from medsam2_jax.tracker.predictor import VideoPredictor

STRUCTURES = int(os.environ.get("NOTEBOOK_STRUCTURES", 8))  # held-out AAL structures (of 8)
NUCLEI = int(os.environ.get("NOTEBOOK_NUCLEI", 12))  # stardist 3D nuclei (0: skip)
ORDERS = int(os.environ.get("NOTEBOOK_ORDERS", 10))  # random image orders per One-Prompt stream
IMAGES = int(os.environ.get("NOTEBOOK_IMAGES", 12))  # images per One-Prompt stream after the template
GRID = int(os.environ.get("NOTEBOOK_GRID", 5))  # values per numeric sweep
SWEEP_STRUCTURAL = os.environ.get("NOTEBOOK_STRUCTURAL", "1") == "1"  # sweep K, read, R, tpos (a compile each)
LOOP = os.environ.get("NOTEBOOK_LOOP", "1") == "1"  # time a Python loop over each grid too (a compile per value)
OUT = os.environ.get("NOTEBOOK_OUT")  # a folder for the tables and figures, or None
POLICIES = ("fifo", "self_sorting", "medsam2_released")

params, config = medsam2_jax.load_model()
held_out = sets.built_in("aal_held_out", limit=STRUCTURES)
print(f"demo model at {config.image_size} px; {len(held_out)} held-out AAL structures; jax {jax.__version__} "
      f"on {jax.default_backend()}")
report: dict = {"image_size": config.image_size, "orders": ORDERS, "images": IMAGES}


def save(fig, name):
    if OUT:
        fig.savefig(Path(OUT) / name, dpi=110, bbox_inches="tight")


# %% [markdown]
# ## 1. 3D: one box, whole volume, each policy
#
# Every policy with its default knobs (`get_tracker_config`), under both prompt protocols of
# `evaluate`: one box on the central slice, and the same box plus the structure's true first and
# last slice (`z_range`, the 3D box interaction: propagation stays inside), which separates
# tracking from stopping. The baselines do not depend on the policy: the prompted slice's true
# mask copied to every slice, and the box filled on every slice.

# %%
options = E.Options(protocol="box_central", z_range=True)
sets_3d = {"aal_held_out": held_out}
if NUCLEI:
    sets_3d["stardist3d"] = sets.built_in("stardist3d", limit=NUCLEI)
results_3d: dict = {}
for set_name, structures in sets_3d.items():
    for name in POLICIES:
        predictor = VideoPredictor(params, config, get_tracker_config(memory_policy=name))
        start = time.perf_counter()
        results_3d[set_name, name] = E.evaluate(structures, predictor, options, policy=name)
        print(f"{set_name} {name}: {time.perf_counter() - start:.0f} s")

rows_3d = []
for set_name in sets_3d:
    methods = [(p, p, "model") for p in POLICIES] + [(f"{p} + slice range", p, "model_z_range") for p in POLICIES]
    for method, policy, key in methods + [("copy_mask", "fifo", "copy_mask"), ("box", "fifo", "box")]:
        source = results_3d[set_name, policy]["summary"]
        s = source[key]
        rows_3d.append({"set": set_name, "method": method, "dice": s["dice"], "nsd": s["nsd"], "hd95": s["hd95"],
                        "range_within_25pct": s["range_within_25pct"], "slices_predicted": s["slices_predicted"],
                        "structures": source["num_structures"], "slices_true": source["slices_true"]})
table_3d = ["| set | method | Dice | NSD | HD95 (mm) | slices predicted (true) | range within +/-25% |",
            "|---|---|---|---|---|---|---|"]
table_3d += [f"| {r['set']} | {r['method']} | {r['dice']:.3f} | {r['nsd']:.3f} | {r['hd95']:.1f} | "
             f"{r['slices_predicted']:.1f} ({r['slices_true']:.1f}) | {r['range_within_25pct']}/{r['structures']} |"
             for r in rows_3d]
print("\n".join(table_3d))
report["3d"] = rows_3d
report["3d_per_structure"] = {f"{k[0]}/{k[1]}": {r["structure"]: round(r["model"]["dice"], 4)
                                                 for r in v["rows"]} for k, v in results_3d.items()}

# %%
fig, axes = plt.subplots(1, len(sets_3d), figsize=(5.5 * len(sets_3d), 3.6), squeeze=False)
for ax, set_name in zip(axes[0], sets_3d):
    for name in POLICIES:
        curve = results_3d[set_name, name]["summary"]["model"]["dice_by_distance"]
        ax.plot([np.nan if d is None else d for d in curve], label=name)
    base = results_3d[set_name, "fifo"]["summary"]["copy_mask"]["dice_by_distance"]
    ax.plot([np.nan if d is None else d for d in base], "k--", lw=1, label="copy prompted mask")
    ax.set(title=f"{set_name}: per-slice Dice", xlabel="slices from the prompted slice", ylabel="Dice", ylim=(0, 1))
    ax.legend(fontsize=8)
save(fig, "dice_by_distance_3d.png")
plt.show()

# %% [markdown]
# ## 2. One-Prompt 2D: one template, a shuffled stream, spread over orders
#
# For each held-out structure: the template is its central axial slice with the box of the true
# mask; the stream holds `IMAGES` other slices, half from its own extent and half from its mirror
# structure in the other hemisphere (unseen too), in `ORDERS` random orders. The streams of one
# structure run as one `vmap`ped call (`segment_one_prompt_batch`). Dice per image against the
# true mask; a stream's score is its mean; the spread is over the orders.

# %%
MIRROR = {37: 38, 38: 37, 71: 72, 72: 71, 73: 74, 74: 73, 77: 78, 78: 77}
atlas_labels = {s.label: s for s in sets.built_in("aal_held_out")}


def axial(structure, z):
    return structure.volume.array[:, :, z].T, structure.target[:, :, z].T


def streams_for(structure, rng):
    """(template, prompt, [(images, truths, mirrored) per order]) of one structure."""
    zs = np.flatnonzero(structure.target.any(axis=(0, 1)))
    centre = int(zs[np.argmin(np.abs(zs - (zs[0] + zs[-1]) // 2))])
    template, truth = axial(structure, centre)
    ys, xs = np.nonzero(truth)
    prompt = {"box": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]}
    mirror = atlas_labels[MIRROR[structure.label]]
    own = [z for z in zs if z != centre]
    other = np.flatnonzero(mirror.target.any(axis=(0, 1)))
    pick = lambda pool, n: [pool[i] for i in np.linspace(0, len(pool) - 1, n).round().astype(int)]
    pool = ([axial(structure, z) for z in pick(own, IMAGES - IMAGES // 2)]
            + [axial(mirror, z) for z in pick(list(other), IMAGES // 2)])
    mirrored = np.arange(len(pool)) >= IMAGES - IMAGES // 2
    orders = [rng.permutation(len(pool)) for _ in range(ORDERS)]
    return template, prompt, [([pool[i][0] for i in o], [pool[i][1] for i in o], mirrored[o]) for o in orders]


def stream_dice(masks, truths, keep=None):
    """Mean Dice of a stream's images (those `keep` marks, else all)."""
    keep = np.ones(len(masks), bool) if keep is None else keep
    return float(np.mean([metrics.dice(m, t) for m, t, k in zip(masks, truths, keep) if k]))


rng = np.random.default_rng(0)
streams = {s.name: streams_for(s, rng) for s in held_out}
one_prompt: dict = {name: {} for name in POLICIES}
for name in POLICIES:
    tc = get_tracker_config(memory_policy=name)
    start = time.perf_counter()
    for structure, (template, prompt, orders) in streams.items():
        batch = segment_one_prompt_batch([(images, template, prompt) for images, _, _ in orders], params=params,
                                         config=config, tracker_config=tc)
        one_prompt[name][structure] = [stream_dice(m, truths) for m, (_, truths, _) in zip(batch, orders)]
        for part, pick_mirror in (("own", False), ("mirror", True)):
            one_prompt[name].setdefault(part, []).extend(
                stream_dice(m, truths, mirrored == pick_mirror) for m, (_, truths, mirrored) in zip(batch, orders))
    print(f"One-Prompt {name}: {time.perf_counter() - start:.0f} s")

table_2d = ["| policy | mean Dice | own-structure slices | mirror-structure slices | spread over orders "
            "(mean over structures of max - min) | mean std over orders |", "|---|---|---|---|---|---|"]
report["one_prompt"] = {}
for name in POLICIES:
    per = {k: v for k, v in one_prompt[name].items() if k in streams}
    dice = np.mean([np.mean(v) for v in per.values()])
    own, mirror = np.mean(one_prompt[name]["own"]), np.mean(one_prompt[name]["mirror"])
    spread = np.mean([np.ptp(v) for v in per.values()])
    std = np.mean([np.std(v) for v in per.values()])
    report["one_prompt"][name] = {"dice": float(dice), "own": float(own), "mirror": float(mirror),
                                  "spread": float(spread), "std": float(std),
                                  "per_structure": {k: [round(x, 4) for x in v] for k, v in per.items()}}
    table_2d.append(f"| {name} | {dice:.3f} | {own:.3f} | {mirror:.3f} | {spread:.3f} | {std:.3f} |")
print("\n".join(table_2d))

# %%
fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(streams)), 3.6))
width = 0.8 / len(POLICIES)
for j, name in enumerate(POLICIES):
    per = {k: v for k, v in one_prompt[name].items() if k in streams}
    x = np.arange(len(per)) + j * width
    ax.boxplot(list(per.values()), positions=x, widths=width * 0.9, patch_artist=True,
               boxprops={"facecolor": f"C{j}", "alpha": 0.6}, medianprops={"color": "k"})
    ax.plot([], [], color=f"C{j}", lw=6, alpha=0.6, label=name)
ax.set_xticks(np.arange(len(streams)) + width * (len(POLICIES) - 1) / 2, list(streams), rotation=30, fontsize=8)
ax.set(ylabel=f"stream Dice over {ORDERS} orders", title="One-Prompt 2D: Dice and its spread over image orders",
       ylim=(0, 1))
ax.legend(fontsize=8)
save(fig, "one_prompt_orders.png")
plt.show()

# %% [markdown]
# ## 3. Sweeps compiled once
#
# `segment_one_prompt_sweep` `vmap`s the One-Prompt scan over a grid of self_sorting's traced
# knobs: one executable for the grid (compiled once per grid size), the images encoded once.
# Against it, a Python loop over `segment_one_prompt` with one tracker config per value, which
# compiles a new executable for every value (the knob is a compile-time constant there).

# %%
first_structure = next(iter(streams))
template, prompt, orders = streams[first_structure]
GRIDS = {"lambda_conf": np.linspace(0.0, 1.0, GRID), "conf_threshold": np.linspace(0.0, 0.9, GRID)}
sweeps: dict = {}
for knob, values in GRIDS.items():
    traces = propagate.TRACE_COUNTS["one_prompt_sweep"]
    start = time.perf_counter()
    per_order = []
    for images, truths, _ in orders:
        masks = segment_one_prompt_sweep(images, template, prompt, {knob: values}, params=params, config=config,
                                         tracker_config=get_tracker_config(memory_policy="self_sorting"))
        per_order.append([stream_dice(m, truths) for m in masks])
    vmapped = time.perf_counter() - start
    compiles = propagate.TRACE_COUNTS["one_prompt_sweep"] - traces
    start = time.perf_counter()
    images, truths, _ = orders[0]
    loop = [stream_dice(segment_one_prompt(images, template, prompt, params=params, config=config,
                                           tracker_config=get_tracker_config(memory_policy="self_sorting",
                                                                             **{knob: float(v)})), truths)
            for v in (values if LOOP else [])]
    looped = time.perf_counter() - start
    if LOOP:
        assert np.allclose(loop, per_order[0], atol=0.01), (knob, loop, per_order[0])  # the same numbers either way
    sweeps[knob] = {"values": values.tolist(), "dice": np.asarray(per_order).tolist(), "compiles": compiles,
                    "vmapped_s": vmapped, "loop_s": looped, "loop_orders": 1}
    print(f"{knob}: {len(values)} values x {len(orders)} orders in {vmapped:.1f} s with {compiles} compile(s)"
          + (f"; a Python loop over the values for one order: {looped:.1f} s, {len(values)} compiles" if LOOP else ""))

# %% [markdown]
# The structural knobs change array shapes (K, R), the read code (read mode) or what is compiled in
# (tpos): a Python loop, one compile each, on the same streams.

# %%
STRUCTURAL = {"K": [4, 8, 16], "read": ["all", "topk", "sample"], "R": [2, 4, 6], "tpos": ["rank", "none"]}
structural: dict = {}
for knob, values in (STRUCTURAL if SWEEP_STRUCTURAL else {}).items():
    structural[knob] = {}
    for v in values:
        knobs = {knob: v, **({"read": "topk"} if knob == "R" else {})}
        tc = get_tracker_config(memory_policy="self_sorting", **knobs)
        batch = segment_one_prompt_batch([(images, template, prompt) for images, _, _ in orders], params=params,
                                         config=config, tracker_config=tc)
        structural[knob][str(v)] = [stream_dice(m, truths) for m, (_, truths, _) in zip(batch, orders)]
report["sweeps"] = {"structure": first_structure, "numeric": sweeps, "structural": structural}
table_sweep = ["| knob | value | mean Dice | spread over orders |", "|---|---|---|---|"]
for knob, s in sweeps.items():
    d = np.asarray(s["dice"])
    table_sweep += [f"| {knob} | {v:g} | {d[:, i].mean():.3f} | {np.ptp(d[:, i]):.3f} |"
                    for i, v in enumerate(s["values"])]
for knob, per in structural.items():
    table_sweep += [f"| {knob} | {v} | {np.mean(d):.3f} | {np.ptp(d):.3f} |" for v, d in per.items()]
print("\n".join(table_sweep))

# %%
fig, axes = plt.subplots(1, len(sweeps), figsize=(4.5 * len(sweeps), 3.4))
for ax, (knob, s) in zip(axes, sweeps.items()):
    d = np.asarray(s["dice"])
    ax.plot(s["values"], d.mean(0), "o-", label="mean over orders")
    ax.fill_between(s["values"], d.min(0), d.max(0), alpha=0.3, label="min-max over orders")
    ax.set(xlabel=knob, ylabel="stream Dice", ylim=(0, 1),
           title=f"{first_structure}: one compile, {len(s['values'])} values")
    ax.legend(fontsize=8)
save(fig, "sweeps.png")
plt.show()

# %% [markdown]
# ## Which images each bank keeps
#
# One order of the first structure's stream: the stream position held in each slot after every
# step, for each policy (fifo: the most recent; self_sorting: the best by confidence and
# dissimilarity, in rank order; medsam2_released: its replacement rule).

# %%
images, truths, _ = orders[0]
held = {}
for name in POLICIES:
    _, outs = segment_one_prompt(images, template, prompt, params=params, config=config,
                                 tracker_config=get_tracker_config(memory_policy=name), return_outputs=True)
    held[name] = np.asarray(outs["bank_frames"])
    print(f"{name}: {int((held[name][-1] >= 0).sum())} of {held[name].shape[1]} slots hold an image after the "
          f"last step; {len(set(held[name][held[name] >= 0].tolist()))} distinct images entered the bank")
report["bank_after_stream"] = {name: held[name][-1].tolist() for name in held}
fig, axes = plt.subplots(1, len(held), figsize=(4 * len(held), 3.4))
for ax, (name, h) in zip(axes, held.items()):
    im = ax.imshow(np.ma.masked_less(h.astype(float), 0), cmap="viridis", vmin=0, vmax=len(images), aspect="auto",
                   interpolation="nearest")
    ax.set(title=name, xlabel="bank slot", ylabel="step (stream position)")
fig.colorbar(im, ax=axes, label="stream position held (0: template)")
save(fig, "bank_contents.png")
plt.show()

# %% [markdown]
# ## Conclusion
#
# Printed from the numbers above (the README quotes the full run's).

# %%
best_3d = {s: max(POLICIES, key=lambda p: results_3d[s, p]["summary"]["model"]["dice"]) for s in sets_3d}
best_range = {s: max(POLICIES, key=lambda p: results_3d[s, p]["summary"]["model_z_range"]["dice"]) for s in sets_3d}
best_2d = max(POLICIES, key=lambda p: report["one_prompt"][p]["dice"])
lines = [f"3D, {s}, one box: best {best_3d[s]} ("
         + ", ".join(f"{p} {results_3d[s, p]['summary']['model']['dice']:.3f}" for p in POLICIES) + ")"
         for s in sets_3d]
lines += [f"3D, {s}, box + true slice range: best {best_range[s]} ("
          + ", ".join(f"{p} {results_3d[s, p]['summary']['model_z_range']['dice']:.3f}" for p in POLICIES) + ")"
          for s in sets_3d]
lines.append("One-Prompt 2D: best " + best_2d + " ("
             + ", ".join(f"{p} {report['one_prompt'][p]['dice']:.3f} (own slices {report['one_prompt'][p]['own']:.3f}, "
                         f"mirror {report['one_prompt'][p]['mirror']:.3f}; spread over orders "
                         f"{report['one_prompt'][p]['spread']:.3f})" for p in POLICIES) + ")")
report["conclusion"] = lines
print("\n".join(lines))
if OUT:
    out = Path(OUT)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=float))
    (out / "tables.md").write_text("\n\n".join(["## 3D\n", "\n".join(table_3d), "## One-Prompt 2D\n",
                                                "\n".join(table_2d), f"## Sweeps ({first_structure})\n",
                                                "\n".join(table_sweep), "## Conclusion\n",
                                                "\n".join(f"- {x}" for x in lines)]) + "\n")

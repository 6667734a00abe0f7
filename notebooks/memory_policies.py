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
# # Three memory policies on one real volume
#
# Colin27 T1 with the AAL atlas (DATA.md): the left thalamus is tracked through axial slices
# from a box on its first slice, under `fifo` (SAM 2), `self_sorting` (MedSAM-2) and
# `medsam2_released` (the released 2D rule). We plot which slices each bank holds after every
# step and time one tracking step per policy.
#
# The weights are random unless `MEDSAM2_PARAMS` names a converted checkpoint, so the masks mean
# nothing here; the bank contents and timings do. `NOTEBOOK_IMAGE_SIZE` and `NOTEBOOK_SLICES`
# shrink the run (the test suite executes this notebook at 64 px).

# %%
import os
import time

import jax
import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt
import numpy as np

from medsam2_jax import datasets
from medsam2_jax.configs.model import get_config
from medsam2_jax.model import layers, sam2
from medsam2_jax.tracker import add_prompt, get_tracker_config, init_state, iter_propagate, make_prompt, stack_states
from medsam2_jax.volumes.io import load_label_volume, load_volume

IMAGE_SIZE = int(os.environ.get("NOTEBOOK_IMAGE_SIZE", 256))
SLICES = int(os.environ.get("NOTEBOOK_SLICES", 16))
LEFT_THALAMUS = 77

# %%
volume = load_volume(datasets.colin27())
labels = load_label_volume(datasets.aal(), volume)
zs = np.flatnonzero((labels == LEFT_THALAMUS).any(axis=(0, 1)))
zs = zs[np.linspace(0, len(zs) - 1, SLICES).round().astype(int)]
print(volume.array.shape, "thalamus on", len(zs), "axial slices:", zs.tolist())

config = get_config("test")
config.image_size = IMAGE_SIZE
params = sam2.init_params(jax.random.PRNGKey(0), config)


def to_frame(img):
    x = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
    x = layers.resize_bilinear(np.repeat(x[None, :, :, None], 3, -1).astype(np.float32), (IMAGE_SIZE,) * 2,
                               antialias=True)
    return np.asarray(sam2.preprocess(x[0], config))


frames = np.stack([to_frame(volume.array[:, :, z].T) for z in zs])
first = labels[:, :, zs[0]].T == LEFT_THALAMUS
ys, xs = np.nonzero(first)
scale = IMAGE_SIZE / np.array([first.shape[1], first.shape[0]])
box = np.array([xs.min(), ys.min(), xs.max(), ys.max()]) * np.tile(scale, 2)

# %% [markdown]
# ## Track with each policy; record the bank after every step

# %%
POLICIES = {
    "fifo": {},
    "self_sorting": {"K": 4, "conf_threshold": 0.0},  # random weights: no frame would pass a 0.5 gate
    "medsam2_released": {},
}
held, step_seconds = {}, {}
for name, knobs in POLICIES.items():
    tc = get_tracker_config(memory_policy=name, chunk_size=SLICES, feature_batch_size=SLICES, **knobs)
    prompt = jax.tree.map(lambda x: np.stack([x]), make_prompt(IMAGE_SIZE, tc.max_points, box=box))
    state0, _ = add_prompt(params, config, stack_states([init_state(config, tc)]), frames[0], prompt, 0,
                           tracker_config=tc)
    for _ in range(2):  # the first run compiles; the second is timed
        start = time.perf_counter()
        rows = [outs["bank_frames"][:, 0] for _, outs, _ in iter_propagate(params, config, state0, frames, 0,
                                                                          tracker_config=tc)]
        seconds = time.perf_counter() - start
    held[name] = np.concatenate(rows)
    step_seconds[name] = seconds / len(frames)
    print(f"{name:18s} {1e3 * step_seconds[name]:7.1f} ms per slice (image encoder included)")

# %%
fig, axes = plt.subplots(1, len(held), figsize=(4 * len(held), 3.5))
for ax, (name, h) in zip(axes, held.items()):
    shown = np.ma.masked_less(h.astype(float), 0)
    im = ax.imshow(shown, cmap="viridis", vmin=0, vmax=len(frames) - 1, aspect="auto", interpolation="nearest")
    ax.set(title=name, xlabel="bank slot", ylabel="tracking step (slice)")
fig.colorbar(im, ax=axes, label="slice held in the slot")
plt.show()

# %%
fig, ax = plt.subplots(figsize=(4, 3))
ax.bar(list(step_seconds), [1e3 * v for v in step_seconds.values()])
ax.set(ylabel="ms per slice", title=f"one tracking step, {IMAGE_SIZE} px, {jax.default_backend()}")
plt.xticks(rotation=20)
plt.show()

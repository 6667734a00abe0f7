"""An overlay montage PNG: the prompted slice(s) and evenly spaced propagated slices, with one
contour colour per object, a legend, and the prompts drawn where they were given.

Slices are shown with the first in-plane canonical axis horizontal and the second vertical,
increasing upwards (axial: patient's right on the right, anterior up; coronal and sagittal:
superior up), at the voxel spacing's aspect ratio. Uses matplotlib's Agg canvas directly, so no
display and no pyplot global state are involved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsam2_jax.volumes import intensity
from medsam2_jax.volumes.io import Volume
from medsam2_jax.volumes.output import atomic_path
from medsam2_jax.volumes.prompts import SlicePrompt, VolumePrompts, axis_name, canonical_axis

PANEL_INCHES = 3.0
PREDICTION_COLOUR, TRUTH_COLOUR = "#ff7f0e", "#2ca02c"  # orange, green


def montage_slices(labels: np.ndarray, axis: int, prompted: tuple[int, ...] = (), count: int = 8) -> list[int]:
    """The prompted slices plus `count` evenly spaced slices over the labelled extent (the whole
    axis when nothing is labelled)."""
    per_slice = np.moveaxis(np.asarray(labels) != 0, axis, 0).reshape(labels.shape[axis], -1).any(axis=1)
    labelled = np.nonzero(per_slice)[0]
    first, last = (labelled[0], labelled[-1]) if labelled.size else (0, labels.shape[axis] - 1)
    spaced = np.rint(np.linspace(first, last, count)).astype(int)
    return sorted(set(spaced.tolist()) | set(prompted))


def truth_montage_slices(truth: np.ndarray, axis: int, prompted: tuple[int, ...] = (), count: int = 8,
                         beyond: int = 2, step: int = 4) -> list[int]:
    """`count` slices evenly over the true extent, the prompted ones, and `beyond` slices past each
    end `step` slices apart (where a model that stops shows nothing)."""
    inside = montage_slices(truth, axis, prompted, count)
    per_slice = np.moveaxis(np.asarray(truth) != 0, axis, 0).reshape(truth.shape[axis], -1).any(axis=1)
    labelled = np.nonzero(per_slice)[0]
    if not labelled.size:
        return inside
    outside = ([labelled[0] - step * k for k in range(1, beyond + 1)]
               + [labelled[-1] + step * k for k in range(1, beyond + 1)])
    return sorted(set(inside) | {int(k) for k in outside if 0 <= k < truth.shape[axis]})


def write_montage(volume: Volume, labels: np.ndarray, path: str | Path, *, prompts: VolumePrompts | None = None,
                  axis: str | int = "axial", count: int = 8, display: np.ndarray | None = None,
                  object_names: dict[int, str] | None = None, title: str | None = None,
                  truth: np.ndarray | None = None, slices: list[int] | None = None) -> Path:
    """labels: integer (X, Y, Z) on the canonical grid; display: the volume in [0, 1] (defaults to
    a percentile clip of `volume.array`); the slice axis is the prompts' when prompts are given.
    truth: a reference mask (X, Y, Z) drawn in its own colour next to the prediction; slices: the
    slices to show (default: the prompted ones and `count` over the labelled extent)."""

    axis = prompts.axis if prompts is not None else canonical_axis(axis)
    display = intensity.percentile_clip(volume.array) if display is None else display
    prompted = tuple(sorted({p.slice_index for p in prompts.prompts})) if prompts else ()
    slices = sorted(slices) if slices is not None else montage_slices(labels, axis, prompted, count)
    object_ids = [int(v) for v in np.unique(labels) if v != 0]
    if prompts is not None:
        object_ids = sorted(set(object_ids) | set(prompts.object_ids))
    names = {**(dict(prompts.object_names) if prompts else {}), **(object_names or {})}
    colours = _object_colours(object_ids)
    if truth is not None:  # prediction against truth: one object, two fixed colours
        colours = {i: PREDICTION_COLOUR for i in object_ids}

    figure, axes = _panels(len(slices))
    for ax, slice_index in zip(axes, slices):
        _draw_slice(ax, volume, display, labels, axis, slice_index, colours)
        if truth is not None:
            true_slice = np.take(truth, slice_index, axis).T
            if true_slice.any():
                ax.contour(true_slice.astype(np.float32), levels=[0.5], colors=[TRUTH_COLOUR], linewidths=1.2,
                           origin="lower")
        slice_prompts = [p for p in (prompts.prompts if prompts else ()) if p.slice_index == slice_index]
        for prompt in slice_prompts:
            _draw_prompt(ax, prompt, colours.get(prompt.object_id, "white"))
        marker = " (prompt)" if slice_prompts else ""
        ax.set_title(f"{axis_name(axis)} {slice_index}{marker}", color="white", fontsize=9)
    _legend(figure, object_ids, names, colours, truth is not None)
    figure.suptitle(title or Path(volume.source_path).name, color="white", fontsize=10)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100, facecolor="black")
    return Path(path)


def _panels(count: int, columns: int = 4):
    """A black figure on matplotlib's Agg canvas with `count` panels, up to `columns` a row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = min(columns, count)
    rows = -(-count // columns)
    figure = Figure(figsize=(PANEL_INCHES * columns, PANEL_INCHES * rows + 0.6), facecolor="black")
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(rows, columns, k + 1) for k in range(count)]


def _draw_slice(ax, volume: Volume, display: np.ndarray, labels: np.ndarray, axis: int, slice_index: int,
                colours: dict[int, tuple]) -> None:
    row_axis, col_axis = (a for a in range(3) if a != axis)
    aspect = volume.spacing[col_axis] / volume.spacing[row_axis]
    # Transposed with origin="lower": rows run left to right, columns bottom to top.
    ax.imshow(np.take(display, slice_index, axis).T, cmap="gray", vmin=0, vmax=1, origin="lower",
              aspect=aspect, interpolation="nearest")
    label_slice = np.take(labels, slice_index, axis).T
    for object_id, colour in colours.items():
        mask = label_slice == object_id
        if mask.any():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.2, origin="lower")
    ax.set_axis_off()


def _draw_prompt(ax, prompt: SlicePrompt, colour) -> None:
    """Slice coordinates (x = column, y = row) are drawn at (row, column) on the transposed view."""
    from matplotlib.patches import Rectangle

    if prompt.points is not None:
        for (x, y), label in zip(prompt.points, prompt.point_labels):
            ax.plot(y, x, marker="*" if label == 1 else "X", markersize=11, color=colour if label == 1 else "red",
                    markeredgecolor="white", linestyle="none")
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        ax.add_patch(Rectangle((y0, x0), y1 - y0, x1 - x0, fill=False, edgecolor=colour, linestyle="--", linewidth=1.2))
    if prompt.mask is not None:
        ax.contour(prompt.mask.T.astype(np.float32), levels=[0.5], colors=[colour], linestyles="dashed",
                   linewidths=1.0, origin="lower")


def _legend(figure, object_ids: list[int], names: dict[int, str], colours: dict[int, tuple],
            truth: bool = False) -> None:
    from matplotlib.lines import Line2D

    if not object_ids:
        return
    handles = [Line2D([], [], color=colours[i], linewidth=2, label=names.get(i, f"object {i}")) for i in object_ids]
    if truth:
        handles = [Line2D([], [], color=PREDICTION_COLOUR, linewidth=2, label="prediction"),
                   Line2D([], [], color=TRUTH_COLOUR, linewidth=2, label="truth")]
    handles.append(Line2D([], [], color="white", linestyle="--", label="prompt box / mask"))
    figure.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), frameon=False,
                  labelcolor="white", fontsize=8)


def _object_colours(object_ids: list[int]) -> dict[int, tuple]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(object_ids) <= 10 else "tab20"]
    return {object_id: palette(index % palette.N) for index, object_id in enumerate(object_ids)}


def write_montage_2d(images: list[np.ndarray], masks: list[np.ndarray], path: str | Path, *, names: list[str],
                     prompt: dict, count: int = 12, title: str = "") -> Path:
    """One-Prompt 2D overview: the template (first) with its prompt and its mask, then up to
    `count - 1` of the other images evenly over the set, each with its mask's contour. Images are
    (H, W) or (H, W, C) in any range, shown in their own pixel frame (x right, y down)."""
    from matplotlib.patches import Rectangle

    shown = [0] + sorted({int(round(i)) for i in np.linspace(1, len(images) - 1, min(count, len(images)) - 1)}
                         if len(images) > 1 else [])
    figure, axes = _panels(len(shown))
    for ax, index in zip(axes, shown):
        image = np.asarray(images[index], np.float32)
        image = image[..., :3].mean(-1) if image.ndim == 3 else image
        lo, hi = np.percentile(image, (0.5, 99.5))
        ax.imshow(np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1), cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        if masks[index].any():
            ax.contour(masks[index].astype(np.float32), levels=[0.5], colors=[PREDICTION_COLOUR], linewidths=1.2)
        if index == 0:
            if prompt.get("box") is not None:
                x0, y0, x1, y1 = prompt["box"]
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linestyle="--",
                                       linewidth=1.2))
            for (x, y), label in zip(prompt.get("points") or [], prompt.get("labels") or []):
                ax.plot(x, y, marker="*" if label == 1 else "X", markersize=11, linestyle="none",
                        color=PREDICTION_COLOUR if label == 1 else "red", markeredgecolor="white")
            if prompt.get("mask") is not None:
                ax.contour(np.asarray(prompt["mask"], np.float32), levels=[0.5], colors=["white"],
                           linestyles="dashed", linewidths=1.0)
        ax.set_title(("template: " if index == 0 else "") + names[index], color="white", fontsize=9)
        ax.set_axis_off()
    _legend(figure, [1], {1: "mask"}, {1: PREDICTION_COLOUR})
    figure.suptitle(title, color="white", fontsize=10)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100, facecolor="black")
    return Path(path)

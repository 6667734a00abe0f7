"""Intensities to [0, 1], slices to the model's input, and model outputs back to slice size.

CT is windowed in Hounsfield units (a named window or an explicit level/width); MR has no
absolute scale, so it is clipped at percentiles. Slices along one axis become the model's
frames: resized in-plane to S x S, repeated to 3 channels and normalised with ImageNet's
statistics, which is what SAM 2's image encoder was trained on. Arrays are NHWC like the model.
"""

from __future__ import annotations

import numpy as np

from medsam2_jax.model import layers

# (level, width) in HU; the usual radiology presets.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "soft_tissue": (50.0, 350.0),
}
MR_PERCENTILES = (0.5, 99.5)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def ct_window(hounsfield: np.ndarray, window: str | None = None, *, level: float | None = None,
              width: float | None = None) -> np.ndarray:
    """HU -> [0, 1]: level - width/2 maps to 0, level + width/2 to 1, clipped outside."""
    level, width = window_level_width(window, level, width)
    low = level - width / 2.0
    return np.clip((np.asarray(hounsfield, np.float32) - low) / width, 0.0, 1.0).astype(np.float32)


def percentile_clip(image: np.ndarray, lower: float = MR_PERCENTILES[0],
                    upper: float = MR_PERCENTILES[1]) -> np.ndarray:
    """Any intensity -> [0, 1] between two percentiles of the image itself (for MR)."""
    image = np.asarray(image, np.float32)
    low, high = np.percentile(image, [lower, upper])
    if high <= low:  # a mostly-constant image: fall back to its full range
        low, high = float(image.min()), float(image.max())
    return np.clip((image - low) / max(high - low, np.finfo(np.float32).tiny), 0.0, 1.0)


def to_unit_range(image: np.ndarray, *, window: str | None = None, level: float | None = None,
                  width: float | None = None, percentiles: tuple[float, float] = MR_PERCENTILES) -> np.ndarray:
    """One rule for every input: a CT window when one is named or given, else percentile clipping."""
    if window is not None or level is not None or width is not None:
        return ct_window(image, window, level=level, width=width)
    return percentile_clip(image, *percentiles)


def slices_to_model_input(unit_volume: np.ndarray, axis: int, image_size: int) -> np.ndarray:
    """(X, Y, Z) in [0, 1] -> frames (N, S, S, 3) along `axis`, ImageNet-normalised.

    Frame n is `np.take(unit_volume, n, axis)`: its rows and columns are the two remaining axes
    in order, the convention prompts.py uses for (x=column, y=row) coordinates.
    """
    frames = np.moveaxis(np.asarray(unit_volume, np.float32), axis, 0)[..., None]
    resized = np.asarray(layers.resize_bilinear(frames, (image_size, image_size), antialias=True))
    rgb = np.repeat(np.clip(resized, 0.0, 1.0), 3, axis=-1)
    return (rgb - IMAGENET_MEAN) / IMAGENET_STD


def probabilities_to_slices(probabilities: np.ndarray, slice_shape: tuple[int, int]) -> np.ndarray:
    """(N, S, S) probabilities or logits at model resolution -> (N, H, W), bilinear."""
    frames = np.asarray(probabilities, np.float32)[..., None]
    # antialias only acts when shrinking; a model resolution above the slice size must not blur.
    return np.asarray(layers.resize_bilinear(frames, tuple(slice_shape), antialias=False))[..., 0]


def labels_to_slices(labels: np.ndarray, slice_shape: tuple[int, int]) -> np.ndarray:
    """(N, S, S) integer labels -> (N, H, W) by nearest neighbour (no new label values)."""
    labels = np.asarray(labels)
    rows = _nearest_indices(labels.shape[1], slice_shape[0])
    cols = _nearest_indices(labels.shape[2], slice_shape[1])
    return labels[:, rows[:, None], cols[None, :]]


def _nearest_indices(source_size: int, target_size: int) -> np.ndarray:
    """Half-pixel-centred nearest neighbour, as jax.image.resize(method='nearest') samples."""
    centres = (np.arange(target_size) + 0.5) * source_size / target_size
    return np.minimum(np.floor(centres).astype(np.int64), source_size - 1)


def window_level_width(window: str | None, level: float | None, width: float | None) -> tuple[float, float]:
    if window is not None:
        if level is not None or width is not None:
            raise ValueError(f"give a window name ({window!r}) or a level/width, not both")
        if window not in CT_WINDOWS:
            raise ValueError(f"unknown CT window {window!r}; choose one of {', '.join(CT_WINDOWS)} "
                             "or give level and width")
        return CT_WINDOWS[window]
    if level is None or width is None:
        raise ValueError("a CT window needs both a level and a width in HU (or a window name)")
    if width <= 0:
        raise ValueError(f"a CT window width must be positive, got {width}")
    largest = float(np.finfo(np.float32).max)  # intensities are float32: beyond it they are Inf or NaN
    if not (abs(level) < largest and width < largest):
        raise ValueError(f"a CT window needs a finite level and width in HU, got level {level:g}, width {width:g}")
    return float(level), float(width)

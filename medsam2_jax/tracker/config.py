"""Tracker knobs (memory-bank sizes, policy, chunking), separate from the model config.

The model config (`configs/model.py`) says what SAM 2 computes; this one says how the tracker
holds its memories and schedules the work. `get_tracker_config()` gives the defaults.
"""

from __future__ import annotations

import ml_collections

POLICIES = ("fifo",)


def get_tracker_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Memory policy: "fifo" is SAM 2 / SAM 2.1 exactly (memory-bank.md section 2).
    c.memory_policy = "fifo"
    # Pinned prompted (conditioning) frames per object: cond slots `Kc`. SAM 2 attends to all of
    # them (max_cond_frames_in_attn = -1), so a video may carry at most this many prompted frames
    # per object.
    c.max_cond_frames = 4
    # Points per prompt after padding (a box counts as two). More points round up to a multiple.
    c.max_points = 8
    # Frames per compiled scan; the state is carried from chunk to chunk so any video length runs
    # on one executable and device memory does not grow with the number of frames.
    c.chunk_size = 8
    # Frames per image-encoder batch inside a chunk (must divide chunk_size).
    c.feature_batch_size = 4
    c.update(overrides)
    return c


def check(tracker_config, model_config) -> None:
    if tracker_config.memory_policy not in POLICIES:
        raise ValueError(f"memory_policy must be one of {POLICIES}, got {tracker_config.memory_policy!r}")
    if tracker_config.chunk_size % tracker_config.feature_batch_size:
        raise ValueError("feature_batch_size must divide chunk_size")
    if model_config.max_cond_frames_in_attn != -1:
        raise NotImplementedError("max_cond_frames_in_attn != -1 (closest-cond-frame selection) is not implemented")
    if not model_config.directly_add_no_mem_embed:
        raise NotImplementedError("directly_add_no_mem_embed=False (dummy memory token) is not implemented")
    if model_config.num_maskmem < 2:
        raise NotImplementedError("the tracker needs num_maskmem >= 2")

"""Tracker knobs (memory-bank sizes, policy, chunking), separate from the model config.

The model config (`configs/model.py`) says what SAM 2 computes; this one says how the tracker
holds its memories and schedules the work. `get_tracker_config()` gives the defaults.
"""

from __future__ import annotations

import jax
import ml_collections

POLICIES = ("fifo", "self_sorting", "medsam2_released")  # built in; `policies.register_policy` adds more
READS = ("all", "topk", "sample")


def get_tracker_config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # Memory policy: "fifo" is SAM 2 / SAM 2.1 exactly (memory-bank.md section 2); "self_sorting"
    # is MedSAM-2's bank (section 3); "medsam2_released" the released 2D code's rule (section 4).
    c.memory_policy = "fifo"
    # Knobs of "self_sorting" (memory-bank.md section 3; [choice] marks where the paper is silent).
    c.K = 16  # non-conditioning slots [choice: the released code's bank size]
    c.conf_threshold = 0.5  # gate on iou * sigmoid(object logit) [choice]
    c.lambda_conf = 0.5  # s = lambda * conf + (1 - lambda) * dissimilarity [choice]
    c.read = "all"  # "all" | "topk" | "sample" [choice]
    c.R = 6  # slots read by "topk" / "sample" (and draws of "medsam2_released") [choice: num_maskmem - 1]
    c.temperature = 1.0  # of softmax(sim / temperature) for "sample"
    c.key_pool = None  # None: keys are whole flattened memories; g: mean over a g x g grid
    c.query_source = "image"  # "image": raw stride-16 features; "memory": projected by the memory encoder
    c.tpos = "rank"  # "rank": maskmem_tpos_enc row by rank in the sorted bank; "none": one shared row
    c.seed = 0  # PRNG seed of sampled reads
    # Pinned prompted (conditioning) frames per object: cond slots `Kc` of the functional API's
    # `init_state` and of training. SAM 2 attends to all of them (max_cond_frames_in_attn = -1).
    # `VideoPredictor` sizes its banks to the prompts instead (any number of prompted frames).
    c.max_cond_frames = 4
    # Points per prompt after padding (a box counts as two). More points round up to a multiple.
    c.max_points = 8
    # Frames per compiled scan; the state is carried from chunk to chunk so any video length runs
    # on one executable and device memory does not grow with the number of frames. The padded
    # frames of a last, partial chunk are skipped (a lax.cond), so they cost nothing.
    c.chunk_size = 8
    # Frames per image-encoder batch inside a chunk (must divide chunk_size).
    # On the CPU one frame at a time is faster (measured: 0.45 s against 0.54 s per 512-px frame
    # in batches of 4, benchmarks/RESULTS.md); accelerators want batches.
    c.feature_batch_size = 1 if jax.default_backend() == "cpu" else 4
    c.update(overrides)
    return c


def check(tracker_config, model_config) -> None:
    from medsam2_jax.tracker.policies import REGISTRY

    if tracker_config.memory_policy not in REGISTRY:
        raise ValueError(f"memory_policy must be one of {sorted(REGISTRY)}, got {tracker_config.memory_policy!r}")
    if tracker_config.read not in READS:
        raise ValueError(f"read must be one of {READS}, got {tracker_config.read!r}")
    if tracker_config.query_source not in ("image", "memory") or tracker_config.tpos not in ("rank", "none"):
        raise ValueError("query_source must be 'image' or 'memory', tpos 'rank' or 'none'")
    s = model_config.image_size // model_config.backbone_stride
    if tracker_config.key_pool and s % tracker_config.key_pool:
        raise ValueError(f"key_pool={tracker_config.key_pool} must divide the feature grid {s}")
    if tracker_config.read == "topk" and tracker_config.R > tracker_config.K:
        raise ValueError("read='topk' needs R <= K")
    if tracker_config.chunk_size % tracker_config.feature_batch_size:
        raise ValueError("feature_batch_size must divide chunk_size")
    limit = model_config.max_cond_frames_in_attn
    if limit != -1 and limit < 2:
        raise ValueError(f"max_cond_frames_in_attn must be -1 (all) or at least 2, as in SAM 2; got {limit}")
    if limit != -1 and tracker_config.memory_policy != "fifo":
        raise NotImplementedError("max_cond_frames_in_attn != -1 is implemented for the fifo policy (SAM 2's) only")
    if not model_config.directly_add_no_mem_embed:
        raise NotImplementedError("directly_add_no_mem_embed=False (dummy memory token) is not implemented")
    if model_config.num_maskmem < 2:
        raise NotImplementedError("the tracker needs num_maskmem >= 2")

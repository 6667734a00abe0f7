"""The one mapping between official SAM 2 state-dict keys and our parameter paths.

A PyTorch key maps to our dotted path by renaming its last component (`weight` -> `kernel` or
`scale`, an embedding's `weight` dropped) as decided by the first matching rule below; the rule
also names the per-tensor transform. Both directions use the same rules, so a round trip is
exact by construction and checked by tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rule:
    pattern: str  # regex on the PyTorch key, matched with re.fullmatch
    leaf: str | None  # our name for the last component; None drops it (embedding tables)
    transform: str  # key into TRANSFORMS


_NORM = (
    r".*\.(norm\d?|norm_final_attn|norm)\.weight"
    r"|.*\.mask_downscaling\.[14]\.weight"
    r"|.*\.output_upscaling\.1\.weight"
    r"|.*\.mask_downsampler\.encoder\.(1|4|7|10)\.weight"
)
_EMBEDDING = (
    r".*\.(point_embeddings\.\d+|not_a_point_embed|no_mask_embed|iou_token|mask_tokens|obj_score_token)\.weight"
)

RULES: tuple[Rule, ...] = (
    Rule(r"image_encoder\.trunk\.(pos_embed|pos_embed_window)", "", "nchw_to_nhwc"),
    Rule(r".*\.output_upscaling\.[03]\.weight", "kernel", "conv_transpose"),
    Rule(_NORM, "scale", "identity"),
    Rule(_EMBEDDING, None, "identity"),
    Rule(r".*\.weight", "kernel", "linear_or_conv"),
    Rule(r".*\.bias", "bias", "identity"),
    # Plain parameters and buffers: learned embeddings, layer scale, the random-Fourier matrix.
    Rule(
        r"(maskmem_tpos_enc|no_mem_embed|no_mem_pos_enc|no_obj_ptr|no_obj_embed_spatial"
        r"|.*\.gamma|.*\.positional_encoding_gaussian_matrix)",
        "",
        "identity",
    ),
)


def _linear_or_conv(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:  # Linear (out, in) -> (in, out)
        return x.T
    if x.ndim == 4:  # Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
        return x.transpose(2, 3, 1, 0)
    raise ValueError(f"expected a 2-D or 4-D weight, got shape {x.shape}")


def _linear_or_conv_inverse(x: np.ndarray) -> np.ndarray:
    if x.ndim == 2:
        return x.T
    if x.ndim == 4:
        return x.transpose(3, 2, 0, 1)
    raise ValueError(f"expected a 2-D or 4-D kernel, got shape {x.shape}")


# name -> (torch -> ours, ours -> torch)
TRANSFORMS = {
    "identity": (lambda x: x, lambda x: x),
    "nchw_to_nhwc": (lambda x: x.transpose(0, 2, 3, 1), lambda x: x.transpose(0, 3, 1, 2)),
    # ConvTranspose2d (in, out, kh, kw) -> (kh, kw, in, out), unflipped (see layers.conv_transpose_2x2).
    "conv_transpose": (lambda x: x.transpose(2, 3, 0, 1), lambda x: x.transpose(2, 3, 0, 1)),
    "linear_or_conv": (_linear_or_conv, _linear_or_conv_inverse),
}


def rule_for(torch_key: str) -> Rule:
    for rule in RULES:
        if re.fullmatch(rule.pattern, torch_key):
            return rule
    raise KeyError(f"no conversion rule matches {torch_key!r}")


def our_path(torch_key: str) -> tuple[str, str]:
    """(our dotted path, transform name) for an official key."""
    rule = rule_for(torch_key)
    head, _, last = torch_key.rpartition(".")
    if rule.leaf is None:
        path = head
    elif rule.leaf == "":
        path = torch_key
    else:
        path = f"{head}.{rule.leaf}" if head else rule.leaf
    return path, rule.transform


def torch_key_candidates(path: str) -> list[str]:
    """The official keys that could map to one of our paths (inverse of the leaf renaming)."""
    head, _, last = path.rpartition(".")
    out = [path, f"{path}.weight"]
    if last in ("kernel", "scale"):
        out.append(f"{head}.weight")
    return out


def torch_key(path: str) -> tuple[str, str]:
    """(official key, transform name) for one of our dotted paths."""
    for cand in torch_key_candidates(path):
        try:
            if our_path(cand)[0] == path:
                return cand, our_path(cand)[1]
        except KeyError:
            continue
    raise KeyError(f"no official key maps to our parameter {path!r}")

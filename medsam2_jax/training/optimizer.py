"""AdamW with SAM 2's parameter groups, decided by the dotted parameter path.

SAM 2 builds torch param groups (`training/optimizer.py::layer_decay_param_modifier`, the
fine-tune YAML); here every leaf gets three static properties instead:
  lr scale   (vision_lr / lr for `image_encoder.*`) x layer decay on `image_encoder.trunk.*`:
             0.9^(L - i) with L = #blocks + 1 and layer id i = 0 for patch_embed/pos_embed,
             k + 1 for block k, L for other trunk leaves; `*pos_embed*` overridden to 1.0.
  decay      weight decay unless a `no_weight_decay` regex matches (biases, norms, embeddings).
  frozen     a `freeze` / `always_frozen` regex matches: updates are exactly zero
             (optax.multi_transform with set_to_zero, so no Adam moments are kept for them).
The lr of a leaf at step s is schedule(s) * lr_scale, schedule = linear warmup to `lr` then
cosine to `lr * final_lr_ratio`. Gradients are clipped by their global norm over trainable
leaves first, as torch's clip_grad_norm_ sees only parameters that require grad.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import optax

from medsam2_jax.convert.checkpoint import flatten_params, unflatten_params

TRUNK = "image_encoder.trunk."
_BLOCK = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    """Per-leaf optimizer properties as pytrees shaped like the params (python scalars/bools)."""

    lr_scale: Any
    weight_decay: Any
    frozen: Any


def _matches(path: str, patterns) -> bool:
    return any(re.search(p, path) for p in patterns)


def _num_trunk_blocks(paths) -> int:
    ids = {int(m.group(1)) for p in paths if (m := _BLOCK.match(p))}
    return max(ids) + 1 if ids else 0


def trunk_layer_id(path: str, num_blocks: int) -> int:
    """Hiera's `get_layer_id` for a path under image_encoder.trunk."""
    if "pos_embed" in path or "patch_embed" in path:
        return 0
    if m := _BLOCK.match(path):
        return int(m.group(1)) + 1
    return num_blocks + 1


def layer_decay_scale(path: str, num_blocks: int, decay: float, overrides=()) -> float:
    if not path.startswith(TRUNK):
        return 1.0
    for pattern, value in overrides:
        if re.search(pattern, path):
            return float(value)
    num_layers = num_blocks + 1
    return float(decay ** (num_layers - trunk_layer_id(path, num_blocks)))


def param_groups(params, config) -> ParamGroups:
    """lr scale, weight-decay mask and frozen mask of every leaf (works on abstract params)."""
    flat = flatten_params(params)
    num_blocks = _num_trunk_blocks(flat)
    frozen_patterns = tuple(config.always_frozen) + tuple(config.freeze)
    for pattern in config.freeze:
        if not any(re.search(pattern, p) for p in flat):
            raise ValueError(f"freeze pattern {pattern!r} matches no parameter; check config.freeze")
    vision_ratio = config.vision_lr / config.lr
    lr_scale, decay, frozen = {}, {}, {}
    for path in flat:
        group = vision_ratio if path.startswith("image_encoder.") else 1.0
        lr_scale[path] = group * layer_decay_scale(path, num_blocks, config.layer_decay, config.layer_decay_overrides)
        decay[path] = not _matches(path, config.no_weight_decay)
        frozen[path] = _matches(path, frozen_patterns)
    return ParamGroups(*(unflatten_params(d, params) for d in (lr_scale, decay, frozen)))


def learning_rate_schedule(config) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.num_steps, config.warmup_steps + 1),
        end_value=config.lr * config.final_lr_ratio,
    )


def _scale_by_tree(scales) -> optax.GradientTransformation:
    """Multiplies each update by a static per-leaf scale (leaves masked out by multi_transform stay)."""

    def scale(updates, params=None):
        del params
        masked = lambda u: isinstance(u, optax.MaskedNode)  # noqa: E731
        return jax.tree.map(lambda u, s: u if masked(u) else u * s, updates, scales, is_leaf=masked)

    return optax.stateless(scale)


def make_optimizer(params, config) -> optax.GradientTransformation:
    """The full AdamW transformation for `params` (concrete or abstract) under `config`."""
    if config.lr <= 0:
        raise ValueError(f"config.lr must be positive, got {config.lr}")
    groups = param_groups(params, config)
    trainable = optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps),
        # Decoupled decay before the lr: torch AdamW shrinks p by lr * wd with the group's lr.
        optax.add_decayed_weights(config.weight_decay, mask=groups.weight_decay),
        _scale_by_tree(groups.lr_scale),
        optax.scale_by_learning_rate(learning_rate_schedule(config)),
    )
    labels = jax.tree.map(lambda f: "frozen" if f else "trainable", groups.frozen)
    return optax.multi_transform({"trainable": trainable, "frozen": optax.set_to_zero()}, labels)

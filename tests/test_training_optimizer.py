"""Optimizer groups (lr scale, weight-decay mask, frozen mask), AdamW numerics, schedule, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medsam2_jax.configs.train import get_config
from medsam2_jax.convert.checkpoint import flatten_params, unflatten_params
from medsam2_jax.model.sam2 import init_params
from medsam2_jax.training import optimizer


def random_params(model_config, seed=0, keep=None):
    """Random float32 params with the model's tree (numpy: init_params would compile for ~30 s).
    `keep`: a regex; only matching leaves are kept (a smaller tree for update tests)."""
    import re

    abstract = jax.eval_shape(lambda k: init_params(k, model_config), jax.random.key(0))
    rng = np.random.default_rng(seed)
    flat = {p: rng.normal(0, 0.02, x.shape).astype(np.float32) for p, x in flatten_params(abstract).items()}
    params = unflatten_params(flat, abstract)
    if keep is None:
        return params
    return _prune(params, lambda path: re.search(keep, path) is not None)


def _prune(tree, keep, prefix=""):
    """Drops leaves whose path fails `keep`, and containers left empty (keep list prefixes only,
    so list indices, which are part of the paths, do not shift)."""
    empty = lambda v: v is None or (isinstance(v, (dict, list)) and not v)  # noqa: E731
    if isinstance(tree, dict):
        out = {k: _prune(v, keep, f"{prefix}{k}.") for k, v in tree.items()}
        return {k: v for k, v in out.items() if not empty(v)}
    if isinstance(tree, list):
        out = [_prune(v, keep, f"{prefix}{i}.") for i, v in enumerate(tree)]
        kept = [v for v in out if not empty(v)]
        assert all(not empty(v) for v in out[: len(kept)]), "keep a prefix of each list"
        return kept
    return tree if keep(prefix[:-1]) else None


@pytest.fixture(scope="module")
def config():
    return get_config("test")


@pytest.fixture(scope="module")
def abstract(config):
    return jax.eval_shape(lambda k: init_params(k, config.model_config), jax.random.key(0))


def test_layer_decay_and_group_lr(config, abstract):
    scale = flatten_params(optimizer.param_groups(abstract, config).lr_scale)
    ratio = config.vision_lr / config.lr
    num_blocks = sum(config.model_config.trunk.stages)  # 5 in the test model: L = 6
    for k in range(num_blocks):
        expected = ratio * 0.9 ** (num_blocks - k)  # 0.9^(L - (k + 1)); the last block gets 0.9
        assert scale[f"image_encoder.trunk.blocks.{k}.mlp.layers.0.kernel"] == pytest.approx(expected)
    assert scale["image_encoder.trunk.patch_embed.proj.kernel"] == pytest.approx(ratio * 0.9 ** (num_blocks + 1))
    assert scale["image_encoder.trunk.pos_embed"] == pytest.approx(ratio)  # override to 1.0
    assert scale["image_encoder.trunk.pos_embed_window"] == pytest.approx(ratio)
    assert scale["image_encoder.neck.convs.0.conv.kernel"] == pytest.approx(ratio)  # no layer decay
    assert scale["sam_mask_decoder.iou_token"] == 1.0
    assert scale["memory_attention.layers.0.linear1.kernel"] == 1.0


def test_layer_ids_follow_hiera():
    assert optimizer.trunk_layer_id("image_encoder.trunk.patch_embed.proj.kernel", 12) == 0
    assert optimizer.trunk_layer_id("image_encoder.trunk.pos_embed", 12) == 0
    assert optimizer.trunk_layer_id("image_encoder.trunk.blocks.11.attn.qkv.kernel", 12) == 12


def test_weight_decay_mask(config, abstract):
    decay = flatten_params(optimizer.param_groups(abstract, config).weight_decay)
    for path, decayed in decay.items():
        # The prompt encoder's Fourier matrix is frozen (a buffer upstream): its decay flag is moot.
        is_weight = path.endswith(("kernel", ".gamma", "positional_encoding_gaussian_matrix"))
        assert decayed == is_weight, path
    assert not decay["no_mem_embed"] and not decay["sam_prompt_encoder.point_embeddings.0"]


def test_frozen_mask_and_bad_pattern(config, abstract):
    c = config.copy_and_resolve_references()
    c.freeze = (r"^image_encoder\.",)
    frozen = flatten_params(optimizer.param_groups(abstract, c).frozen)
    for path, is_frozen in frozen.items():
        expected = path.startswith("image_encoder.") or path.startswith("sam_prompt_encoder.pe_layer.")
        assert is_frozen == expected, path
    c.freeze = (r"^image_encodr\.",)
    with pytest.raises(ValueError, match="image_encodr"):
        optimizer.param_groups(abstract, c)


def test_schedule(config):
    schedule = optimizer.learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0
    assert float(schedule(config.warmup_steps)) == pytest.approx(config.lr)
    assert float(schedule(config.num_steps)) == pytest.approx(config.lr * config.final_lr_ratio)


def _one_step(config, params, grads):
    tx = optimizer.make_optimizer(params, config)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return flatten_params(updates)


def test_adamw_step_frozen_parts_and_clipping(config):
    c = config.copy_and_resolve_references()
    c.freeze = (r"^image_encoder\.neck\.",)
    c.warmup_steps = 0
    c.clip_norm = 1e9  # first: no clipping, to check AdamW itself
    params = random_params(c.model_config,
                           keep=r"^(image_encoder\.(trunk\.blocks\.[01]|neck)|sam_prompt_encoder|no_mem_embed)")
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
    groups = optimizer.param_groups(params, c)
    scale, decay, frozen = (flatten_params(t) for t in (groups.lr_scale, groups.weight_decay, groups.frozen))
    updates = _one_step(c, params, grads)
    flat_p, flat_g = flatten_params(params), flatten_params(grads)
    for path, u in updates.items():
        u = np.asarray(u)
        if frozen[path]:
            assert not u.any(), path
            continue
        # Step 1 of Adam: bias-corrected m / sqrt(v) = g / (|g| + eps) ~ sign(g).
        adam = flat_g[path] / (np.abs(flat_g[path]) + c.adam_eps)
        expected = -c.lr * scale[path] * (adam + c.weight_decay * decay[path] * flat_p[path])
        np.testing.assert_allclose(u, expected, rtol=1e-4, atol=1e-12, err_msg=path)

    # Clipping sees trainable leaves only: huge grads on frozen leaves change nothing.
    c.clip_norm = 0.1
    clipped = _one_step(c, params, grads)
    huge = {p: g * (1e6 if frozen[p] else 1.0) for p, g in flat_g.items()}
    clipped_huge = _one_step(c, params, unflatten_params(huge, params))
    for path in clipped:
        np.testing.assert_array_equal(np.asarray(clipped[path]), np.asarray(clipped_huge[path]))


def test_frozen_params_do_not_move_over_steps(config):
    c = config.copy_and_resolve_references()
    c.freeze = (r"^image_encoder\.",)
    params = random_params(c.model_config, keep=r"^(image_encoder\.trunk\.blocks\.0|obj_ptr_proj)")
    tx = optimizer.make_optimizer(params, c)

    @jax.jit
    def step(p, s):
        grads = jax.grad(lambda q: sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(q)))(p)
        updates, s = tx.update(grads, s, p)
        return jax.tree.map(jnp.add, p, updates), s

    new, state = params, tx.init(params)
    for _ in range(4):
        new, state = step(new, state)
    for path, before in flatten_params(params).items():
        after = np.asarray(flatten_params(new)[path])
        if path.startswith("image_encoder."):
            np.testing.assert_array_equal(after, before, err_msg=path)
        else:
            assert not np.array_equal(after, before), path

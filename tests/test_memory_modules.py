"""Memory encoder and memory attention against the official modules.

Memory attention gets several memory frames plus object-pointer tokens, so the RoPE table
tiling and the pointer exclusion are both exercised. Tolerance 1e-4 (LayerNorm-ed outputs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from medsam2_jax.model.memory_attention import memory_attention
from medsam2_jax.model.memory_encoder import memory_encoder
from tests.reference import max_abs, nchw, nhwc, reference_image_model


def test_memory_encoder():
    model, params, config = reference_image_model("test")
    r = np.random.default_rng(0)
    s, S = config.image_size // 16, config.image_size
    pix = r.standard_normal((2, s, s, 256)).astype(np.float32)
    masks = (r.standard_normal((2, S, S, 1)) * 10).astype(np.float32)
    with torch.no_grad():
        out = model.memory_encoder(nchw(pix), nchw(masks), skip_mask_sigmoid=True)
    feats, pos = jax.jit(lambda p, a, b: memory_encoder(p, a, b, config))(params["memory_encoder"], pix, masks)
    assert max_abs(feats, nhwc(out["vision_features"])) < 1e-4
    assert max_abs(pos, nhwc(out["vision_pos_enc"][0])[0]) < 1e-6


def test_memory_attention_with_frames_and_pointers():
    model, params, config = reference_image_model("test")
    r = np.random.default_rng(1)
    s = config.image_size // 16
    hw, frames, ptr_tokens = s * s, 3, 4 * 5
    curr = r.standard_normal((2, hw, 256)).astype(np.float32)
    curr_pos = r.standard_normal((2, hw, 256)).astype(np.float32)
    mem = r.standard_normal((2, frames * hw + ptr_tokens, 64)).astype(np.float32)
    mem_pos = r.standard_normal((2, frames * hw + ptr_tokens, 64)).astype(np.float32)
    t = lambda a: torch.from_numpy(a).transpose(0, 1)  # official tensors are sequence-first
    with torch.no_grad():
        ref = model.memory_attention([t(curr)], t(mem), [t(curr_pos)], t(mem_pos), num_obj_ptr_tokens=ptr_tokens)
    ref = ref.transpose(0, 1).numpy()
    ours = memory_attention(params["memory_attention"], jnp.asarray(curr), jnp.asarray(curr_pos), jnp.asarray(mem),
                            jnp.asarray(mem_pos), ptr_tokens, config)
    assert max_abs(ours, ref) < 1e-4


def test_memory_attention_masked_slots_equal_ragged():
    """Empty, masked bank slots give exactly what the official ragged memory gives."""
    _, params, config = reference_image_model("test")
    r = np.random.default_rng(2)
    s = config.image_size // 16
    hw = s * s
    curr, curr_pos = [jnp.asarray(r.standard_normal((1, hw, 256)).astype(np.float32)) for _ in range(2)]
    mem = r.standard_normal((1, 3 * hw + 8, 64)).astype(np.float32)
    pos = r.standard_normal((1, 3 * hw + 8, 64)).astype(np.float32)
    keep = np.ones(3 * hw + 8, bool)
    keep[hw:2 * hw] = False  # the middle frame slot is empty
    keep[-4:] = False  # and the second pointer
    ragged = memory_attention(params["memory_attention"], curr, curr_pos, jnp.asarray(mem[:, keep]),
                              jnp.asarray(pos[:, keep]), 4, config)
    padded = memory_attention(params["memory_attention"], curr, curr_pos, jnp.asarray(mem), jnp.asarray(pos), 8,
                              config, memory_mask=jnp.asarray(keep[None]))
    assert max_abs(padded, ragged) < 1e-5


def test_local_cross_attention_init_attends_to_the_same_position():
    """With the local init, a change in one memory position changes the output mostly at that
    position; with the random init it spreads over the whole frame."""
    from medsam2_jax.configs.model import get_config
    from medsam2_jax.model.memory_attention import local_cross_attention_init
    from medsam2_jax.model.sam2 import init_params

    config = get_config("demo")
    random_params = init_params(jax.random.key(0), config)
    local_params = local_cross_attention_init(random_params, config)
    r = np.random.default_rng(3)
    s = config.image_size // 16
    hw, where = s * s, 2 * s + 5
    curr, curr_pos = (jnp.asarray(r.standard_normal((1, hw, 256)).astype(np.float32)) for _ in range(2))
    mem = r.standard_normal((1, hw, 64)).astype(np.float32)
    mem_pos = jnp.asarray(r.standard_normal((1, hw, 64)).astype(np.float32))
    bumped = mem.copy()
    bumped[0, where] += 5.0 * r.standard_normal(64).astype(np.float32)

    def share_at_bump(params):
        run = lambda m: memory_attention(params["memory_attention"], curr, curr_pos, jnp.asarray(m), mem_pos, 0, config)  # noqa: E731
        change = np.linalg.norm(np.asarray(run(bumped) - run(mem))[0], axis=-1)
        return change[where] / change.sum()

    assert share_at_bump(local_params) > 0.3
    assert share_at_bump(random_params) < 0.1
    # Only the two biases of the cross-attention change.
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), random_params, local_params)
    paths = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(changed) if v]
    assert sorted(paths) == sorted(f"['memory_attention']['layers'][{i}]['cross_attn_image']['{n}']['bias']"
                                   for i in range(config.memory_attention.num_layers) for n in ("q_proj", "k_proj"))

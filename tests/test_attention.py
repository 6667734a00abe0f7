"""The swappable attention: every implementation computes the same thing, masks included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medsam2_jax.model.attention import dot_product_attention, resolve_impl


def _qkv(nq=300, nk=9000, heads=2, d=32, seed=0):
    r = np.random.default_rng(seed)
    return [r.standard_normal((2, n, heads, d)).astype(np.float32) for n in (nq, nk, nk)]


@pytest.mark.parametrize("impl", ["xla", "chunked", "fused"])
def test_matches_torch_sdpa(impl):
    q, k, v = _qkv()
    ref = F.scaled_dot_product_attention(*[torch.from_numpy(a).transpose(1, 2) for a in (q, k, v)]).transpose(1, 2)
    out = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl=impl)
    assert np.abs(np.asarray(out) - ref.numpy()).max() < 1e-5


@pytest.mark.parametrize("impl", ["xla", "chunked", "fused"])
def test_masked_keys_contribute_exactly_nothing(impl):
    """A padded, masked bank gives what attending to only the valid keys gives."""
    q, k, v = _qkv()
    mask = np.zeros((2, k.shape[1]), bool)
    mask[0, :5000] = True
    mask[1, 4000:4100] = True
    out = np.asarray(dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask),
                                           impl=impl))
    for b in range(2):
        sel = mask[b]
        ref = dot_product_attention(jnp.asarray(q[b:b + 1]), jnp.asarray(k[b:b + 1, sel]), jnp.asarray(v[b:b + 1, sel]),
                                    impl="xla")
        assert np.abs(out[b] - np.asarray(ref)[0]).max() < 1e-5


@pytest.mark.parametrize("impl", ["xla", "chunked", "fused"])
def test_mixed_dtypes_promote(impl):
    """bfloat16 values with float32 keys (a bf16 run adds float32 positional encodings to keys)."""
    q, k, v = (jnp.asarray(a) for a in _qkv(nq=64, nk=2100))
    out = dot_product_attention(q, k, v.astype(jnp.bfloat16), impl=impl)
    ref = dot_product_attention(q, k, v.astype(jnp.bfloat16).astype(jnp.float32), impl="xla")
    assert np.abs(np.asarray(out, np.float32) - np.asarray(ref)).max() < 1e-2  # one bf16 rounding of the output


def test_auto_resolves_by_backend_and_rejects_unknown():
    assert resolve_impl("auto") == ("chunked" if jax.default_backend() == "cpu" else "fused")
    with pytest.raises(ValueError, match="attention_impl"):
        resolve_impl("flash3")


def test_skipping_masked_chunks_changes_nothing():
    """`skip_masked` computes only key chunks holding a valid key (empty bank slots): the result is
    the full computation's (to rounding of a different compilation), for any layout of valid keys,
    also under vmap (objects)."""
    q, k, v = _qkv(nq=64, nk=5 * 1024 + 40, heads=1, d=16)
    mask = np.zeros((2, k.shape[1]), bool)
    mask[0, :1024] = True  # first slot only
    mask[0, -40:] = True  # and the pointer tail
    mask[1, 3 * 1024:3 * 1024 + 7] = True  # a few keys inside a later chunk
    args = [jnp.asarray(a) for a in (q, k, v, mask)]
    full = dot_product_attention(*args, impl="chunked")
    skip = jax.jit(lambda *a: dot_product_attention(*a, impl="chunked", skip_masked=True))(*args)
    np.testing.assert_allclose(np.asarray(skip), np.asarray(full), rtol=0, atol=1e-6)
    one = lambda q_, k_, v_, m_: dot_product_attention(q_[None], k_[None], v_[None], m_[None], "chunked", True)[0]
    np.testing.assert_allclose(np.asarray(jax.vmap(one)(*args)), np.asarray(full), rtol=0, atol=1e-6)

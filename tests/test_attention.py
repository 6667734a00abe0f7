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
    out = np.asarray(dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), impl=impl))
    for b in range(2):
        sel = mask[b]
        ref = dot_product_attention(jnp.asarray(q[b:b + 1]), jnp.asarray(k[b:b + 1, sel]), jnp.asarray(v[b:b + 1, sel]), impl="xla")
        assert np.abs(out[b] - np.asarray(ref)[0]).max() < 1e-5


def test_auto_resolves_by_backend_and_rejects_unknown():
    assert resolve_impl("auto") == ("chunked" if jax.default_backend() == "cpu" else "fused")
    with pytest.raises(ValueError, match="attention_impl"):
        resolve_impl("flash3")

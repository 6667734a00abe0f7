"""The training state: one pytree that a jitted `train_step(state, batch)` maps to the next one.

Everything that must survive a restart for a bit-identical resume lives here (params, optimizer
state, step, rng) except the data iterator, which checkpointing.py saves beside it. The optax
transformation is a static field: it is code, rebuilt from the config, never saved.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (jax.random.key_data), so checkpoints hold a plain array
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng) -> TrainState:
        """`rng` is a key from jax.random.key (or PRNGKey); it is stored as key data."""
        data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=data, tx=tx)

    def next_rng(self) -> tuple[TrainState, jax.Array]:
        """A fresh typed key for this step and the state carrying the advanced key."""
        key, sub = jax.random.split(jax.random.wrap_key_data(self.rng))
        return self.replace(rng=jax.random.key_data(key)), sub

    def apply_gradients(self, grads) -> TrainState:
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state)

"""Orbax checkpoints of the whole training state plus the grain data iterator.

A checkpoint step holds two items:
  state      the TrainState pytree (params, optimizer state, step, rng), ocp StandardSave
  data_iter  each host's grain iterator state, one JSON file per process (grain's handler)
so a pre-empted job that is started again with the same work dir resumes at the same step, with
the same rng and the same next batches. Saves are asynchronous (the arrays are copied to host
memory, then written in the background); `save_checkpoint` only saves every `save_every` steps
(or when forced), and the manager keeps the last `keep`.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import orbax.checkpoint as ocp

STATE = "state"
DATA_ITER = "data_iter"


class _IteratorSnapshot:
    """The iterator's state taken now: an async save must not read the live iterator later,
    when training has moved it on. Grain's handler writes `get_state()` bytes as the JSON file it
    reads back into a real DatasetIterator on restore."""

    def __init__(self, iterator):
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state


def make_checkpoint_manager(workdir, *, save_every: int, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """A manager over `workdir/checkpoints`; pointing a new job at the same workdir resumes it."""
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        # Exactly the multiples of save_every (orbax's default also saves the first step it
        # sees), plus a save when JAX reports a pre-emption notice (TPU/GCE maintenance).
        save_decision_policy=policies.AnySavePolicy(
            [policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]
        ),
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        create=True,
    )
    directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
    return ocp.CheckpointManager(directory, options=options, item_names=(STATE, DATA_ITER))


def manager_from_config(workdir, config) -> ocp.CheckpointManager:
    return make_checkpoint_manager(workdir, save_every=config.checkpoint_every, keep=config.checkpoint_keep,
                                   async_save=config.async_checkpoints)


def save_checkpoint(manager: ocp.CheckpointManager, state, data_iterator=None, *, force: bool = False) -> bool:
    """Saves at step `state.step` when the interval says so (or `force`); returns whether it did.

    Returns at once for async saves; call `manager.wait_until_finished()` before exiting."""
    step = int(jax.device_get(state.step))
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items[DATA_ITER] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def abstract_like(state, shardings=None):
    """ShapeDtypeStructs of `state` (with `shardings`, a matching pytree, when given): the
    restore target, which also decides where the restored arrays live."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state, data_iterator=None, step: int | None = None):
    """Restores `step` (default the latest) into the structure of `abstract_state` and moves
    `data_iterator` (a grain DatasetIterator, in place) to where it was. None if the work dir
    holds no checkpoint yet."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
        items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored[STATE]


def latest_params(workdir):
    """(step, params) of the latest checkpoint in `workdir`, as host arrays; (None, None) if it
    holds none. For exporting or inspecting a run without rebuilding its optimizer."""
    directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
    if not os.path.isdir(directory):
        return None, None
    manager = ocp.CheckpointManager(directory, item_names=(STATE, DATA_ITER))
    try:
        step = manager.latest_step()
        if step is None:
            return None, None
        restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore()}))
        return step, restored[STATE]["params"]
    finally:
        manager.close()

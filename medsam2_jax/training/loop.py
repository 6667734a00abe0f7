"""The training loop: mesh, state (fresh, fine-tuned from converted SAM 2 weights, or resumed),
grain batches as global arrays, the jitted step, checkpoints, logs and validation Dice.

`train(config, workdir)` runs to `config.num_steps`; started again on the same work dir it
resumes from the latest checkpoint (params, optimizer, step, rng and the data iterator), so an
interrupted run ends bit-identical to an uninterrupted one on the same devices.
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np

from medsam2_jax.model.memory_attention import local_cross_attention_init
from medsam2_jax.model.sam2 import init_params
from medsam2_jax.training import checkpointing, data, sharding
from medsam2_jax.training.optimizer import make_optimizer
from medsam2_jax.training.state import TrainState
from medsam2_jax.training.train_step import make_steps
from medsam2_jax.training.writers import MetricWriter

log = logging.getLogger(__name__)


def _global(tree, shardings):
    """Host arrays (identical on every process) -> global arrays laid out by `shardings`."""
    def put(x, s):
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])
    return jax.tree.map(put, tree, shardings)


def initial_state(config, tx, shardings, init_checkpoint: str = ""):
    """A fresh TrainState laid out by `shardings`: converted SAM 2 weights or random init, with
    the memory cross-attention made local first if `config.local_memory_attention_init`."""
    key = jax.random.key(config.seed)

    def prepare(params):
        if config.local_memory_attention_init:
            params = local_cross_attention_init(params, config.model_config)
        return params

    if init_checkpoint:
        from medsam2_jax.convert.checkpoint import load_params

        params = _global(load_params(init_checkpoint, config.model_config), shardings.params)
        create = jax.jit(lambda p: TrainState.create(prepare(p), tx, key), out_shardings=shardings)
        return create(params)
    init_key, rng = jax.random.split(key)
    create = jax.jit(lambda: TrainState.create(prepare(init_params(init_key, config.model_config)), tx, rng),
                     out_shardings=shardings)
    return create()


def validation_config(config):
    """config.data for validation: the val manifest, no augmentation."""
    val = config.data.copy_and_resolve_references()
    val.manifest = config.data.val_manifest
    val.augment.update(data.NO_AUGMENTATION)
    return val


def validate(config, steps, state, mesh) -> dict:
    """Mean metrics (tracked-frame Dice and losses) over `val_batches` fixed validation batches."""
    it = iter(data.dataset_from_config(config, data_config=validation_config(config)))
    totals: dict = {}
    for i in range(config.data.val_batches):
        metrics = steps.eval_step(state.params, sharding.shard_batch(next(it), mesh), jax.random.key(i))
        for k, v in jax.device_get(metrics).items():
            totals[k] = totals.get(k, 0.0) + float(v) / config.data.val_batches
    return {("val_dice" if k == "train_dice" else f"val_{k}"): v for k, v in totals.items()}


def train(config, workdir, *, init_checkpoint: str = "", tracker_config=None):
    """Trains (or resumes) to config.num_steps; returns the final TrainState."""
    sharding.maybe_initialize_distributed()
    mesh = sharding.make_mesh(config.mesh_shape)
    abstract_params = jax.eval_shape(lambda k: init_params(k, config.model_config), jax.random.key(0))
    tx = make_optimizer(abstract_params, config)
    abstract_state = jax.eval_shape(lambda p: TrainState.create(p, tx, jax.random.key(0)), abstract_params)
    shardings = sharding.state_shardings(abstract_state, tx, mesh, config.sharding_rules,
                                         min_size_mb=config.fsdp_min_size_mb)
    steps = make_steps(config, tracker_config, state_shardings=shardings,
                       batch_sharding=sharding.batch_sharding(mesh))
    iterator = iter(data.dataset_from_config(config))
    manager = checkpointing.manager_from_config(workdir, config)
    state = checkpointing.restore_checkpoint(manager, checkpointing.abstract_like(abstract_state, shardings), iterator)
    if state is None:
        state = initial_state(config, tx, shardings, init_checkpoint or config.init_checkpoint)
    else:
        log.info("resumed from %s at step %d", manager.directory, int(state.step))
    step = int(jax.device_get(state.step))
    writer = MetricWriter(workdir, tensorboard=config.tensorboard, total_steps=config.num_steps, start_step=step)
    last_time, last_step = time.time(), step
    try:
        while step < config.num_steps:
            try:
                batch = next(iterator)
            except data.DataError as error:
                hint = " (set data.on_bad_record='skip' to skip such records)" \
                    if config.data.on_bad_record == "raise" else ""
                log.error("stopping at step %d: bad training data: %s%s", step, error, hint)
                raise
            state, metrics = steps.train_step(state, sharding.shard_batch(batch, mesh))
            step += 1
            checkpointing.save_checkpoint(manager, state, iterator)
            if step % config.log_every == 0 or step == config.num_steps:
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.time()
                scalars["steps_per_s"] = (step - last_step) / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                # Which clips this host trained on (data order checks; JSONL only).
                clips = [[int(e), int(a), int(b)] for e, a, b in zip(batch["entry"], batch["axis"], batch["start"])]
                writer.write(step, scalars, extra={"clips": clips})
                writer.progress(step, scalars)
            if config.data.val_manifest and (step % config.eval_every == 0 or step == config.num_steps):
                writer.write(step, validate(config, steps, state, mesh))
        if manager.latest_step() != step:
            checkpointing.save_checkpoint(manager, state, iterator, force=True)
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
    return state

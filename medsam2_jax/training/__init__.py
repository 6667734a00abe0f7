"""Training: SAM 2's loss, optimizer groups, device mesh and sharding, grain input, Orbax checkpoints.

losses.py         sam2_loss: focal + dice + IoU L1 + object-score BCE, best-of-M masks
optimizer.py      make_optimizer / param_groups: AdamW, layer-wise lr decay, frozen parts
sharding.py       make_mesh, rule-table param shardings, shard_batch, maybe_initialize_distributed
state.py          TrainState: params, opt_state, step, rng (the train step's carry)
checkpointing.py  Orbax CheckpointManager saving the state and the data iterator together
data.py           manifest -> clips of T slices with N objects, augmented, per-host, resumable
"""

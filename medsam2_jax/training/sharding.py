"""Device mesh, parameter sharding by a short rule table, global batches, multi-host start-up.

One code path for one CPU, 8 simulated devices and a pod:
  mesh       `jax.make_mesh((data, fsdp), ("data", "fsdp"))`, -1 filling in the rest.
  params     a (regex on the dotted path -> rule) table, first match wins (big_vision style):
             "replicate"; "fsdp" = shard the largest axis divisible by the fsdp size for
             leaves of at least `min_size_mb`, replicate smaller ones; or an explicit
             PartitionSpec / tuple of axis names. Optimizer moments follow their params.
  batches    the leading (clip) axis is split over data x fsdp; each host passes its own
             slice and `jax.make_array_from_process_local_data` builds the global array.
"""

from __future__ import annotations

import logging
import os
import re

import jax
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from medsam2_jax.convert.checkpoint import flatten_params, unflatten_params

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES = ((r".*", "fsdp"),)

log = logging.getLogger(__name__)


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize` when the environment asks for several processes.

    Set JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID for a manual
    launch, or MEDSAM2_DISTRIBUTED=1 to let JAX detect the cluster (TPU pods, SLURM, ...).
    Must run before anything touches a device. Returns whether it initialised.
    """
    env = os.environ
    explicit = env.get("JAX_COORDINATOR_ADDRESS")
    auto = env.get("MEDSAM2_DISTRIBUTED", "").lower() in ("1", "true", "yes", "auto")
    if not explicit and not auto:
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {}
    if explicit:
        kwargs["coordinator_address"] = explicit
        if "JAX_NUM_PROCESSES" in env:
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if "JAX_PROCESS_ID" in env:
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def make_mesh(mesh_shape=(-1, 1), devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp) mesh over `devices` (default all); one -1 entry takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(mesh_shape)
    if len(shape) != 2 or shape.count(-1) > 1:
        raise ValueError(f"mesh_shape must be (data, fsdp) with at most one -1, got {tuple(mesh_shape)}")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {tuple(mesh_shape)}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {tuple(shape)} needs {int(np.prod(shape))} devices, have {len(devices)}")
    # Auto axes: jit's in/out shardings decide the layout and XLA propagates the rest.
    return jax.make_mesh(tuple(shape), AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def _fsdp_spec(shape, fsdp_size: int, min_size_mb: float, itemsize: int) -> PartitionSpec:
    if fsdp_size <= 1 or np.prod(shape, dtype=np.int64) * itemsize < min_size_mb * 2**20:
        return PartitionSpec()
    # The largest axis that divides evenly; ties go to the last axis (output features).
    candidates = [(n, i) for i, n in enumerate(shape) if n % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return PartitionSpec(*spec)


def partition_spec(path: str, leaf, rules=DEFAULT_RULES, *, fsdp_size: int = 1,
                   min_size_mb: float = 4.0) -> PartitionSpec:
    """The PartitionSpec of one leaf (anything with .shape and .dtype) under the rule table."""
    for pattern, rule in rules:
        if not re.search(pattern, path):
            continue
        if rule == "replicate":
            return PartitionSpec()
        if rule == "fsdp":
            return _fsdp_spec(tuple(leaf.shape), fsdp_size, min_size_mb, np.dtype(leaf.dtype).itemsize)
        spec = rule if isinstance(rule, PartitionSpec) else PartitionSpec(*rule)
        if len(spec) > len(leaf.shape):
            raise ValueError(f"sharding rule {pattern!r} -> {spec} has more axes than {path} {tuple(leaf.shape)}")
        return spec
    raise ValueError(f"no sharding rule matches {path}; end the table with ('.*', 'replicate')")


def param_partition_specs(params, rules=DEFAULT_RULES, *, fsdp_size: int = 1, min_size_mb: float = 4.0):
    """PartitionSpecs shaped like `params` (concrete or from jax.eval_shape)."""
    flat = flatten_params(params)
    specs = {p: partition_spec(p, x, rules, fsdp_size=fsdp_size, min_size_mb=min_size_mb) for p, x in flat.items()}
    return unflatten_params(specs, params)


def param_shardings(params, mesh, rules=DEFAULT_RULES, *, min_size_mb: float = 4.0):
    specs = param_partition_specs(params, rules, fsdp_size=mesh.shape["fsdp"], min_size_mb=min_size_mb)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def state_shardings(abstract_state, tx: optax.GradientTransformation, mesh, rules=DEFAULT_RULES, *,
                    min_size_mb: float = 4.0):
    """NamedShardings for a TrainState: params by the rules, optimizer moments like their
    params (optax.tree_map_params), every other leaf (step, counts, rng) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = param_shardings(abstract_state.params, mesh, rules, min_size_mb=min_size_mb)
    # Frozen leaves have an empty optax.MaskedNode in place of their moments.
    opt_state = optax.tree_utils.tree_map_params(
        tx, lambda leaf, s: leaf if isinstance(leaf, optax.MaskedNode) else s, abstract_state.opt_state, params,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)),
    )
    return abstract_state.replace(
        step=replicated, params=params, opt_state=opt_state, rng=replicated
    )


def batch_sharding(mesh) -> NamedSharding:
    """Leading (clip) axis over every device of the mesh, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def shard_batch(local_batch, mesh):
    """This host's batch (a pytree of numpy arrays, leading axis = local clips) -> global arrays
    whose leading axis is the concatenation over hosts in process order."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def local_batch_size(global_batch_size: int, mesh=None) -> int:
    """Clips this host reads per step; the global batch must split evenly over hosts and devices."""
    devices = mesh.size if mesh is not None else jax.device_count()
    if global_batch_size % devices:
        raise ValueError(f"batch_size {global_batch_size} does not split over {devices} devices; make it a multiple")
    return global_batch_size // jax.process_count()

"""benchmarks/aot_memory.py on 8 simulated devices (test_tiny): the train step is laid out as the
rule table says (fsdp=8: a sharded leaf keeps 1/8 of its bytes per device, a replicated leaf all
of them), Adam's two moments follow their parameters, and the FLOP counts see every scan step.
By default the step is traced and lowered (~50 s); the XLA compile with memory_analysis takes
minutes on two cores, so that check is marked slow (`pytest -m slow tests/test_aot_memory.py`).

The test config sets fsdp_min_size_mb = 0, so only the leaves the table replicates by name
(pos_embed, maskmem_tpos_enc, no_* embeddings) or that have no axis divisible by 8 stay whole;
the expected bytes are summed leaf by leaf from `sharding.param_partition_specs`, so they are
exact, and that sum is itself close to 1/8 of the whole.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from medsam2_jax.configs.train import get_config
from medsam2_jax.convert.checkpoint import flatten_params
from medsam2_jax.model.sam2 import init_params
from medsam2_jax.training import sharding
from medsam2_jax.training.optimizer import param_groups

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "aot_memory.py"
VARIANT = "test_tiny"
# XLA's CPU backend at its lowest optimisation: minutes less to compile, same buffer assignment
# (measured: test_tiny's temporaries are 51,076,424 bytes either way).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _run(tmp_path, *extra, xla_flags=""):
    out = tmp_path / "rows.json"
    env = dict(os.environ, XLA_FLAGS=xla_flags)  # the script adds the 8 simulated devices
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--variants", VARIANT, "--meshes", "1x8", "--remat", "on", "--json", str(out),
         *extra], env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    return row


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """Traced and lowered on 8 simulated devices (about 30 s); no XLA compile."""
    return _run(tmp_path_factory.mktemp("aot"), "--no-compile")


def _leaf_bytes(leaf):
    return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def _expected(config):
    """Per-device bytes of the params under the rule table at fsdp=8, and of Adam's moments."""
    abstract = jax.eval_shape(lambda k: init_params(k, config.model_config), jax.random.key(0))
    specs = flatten_params(sharding.param_partition_specs(abstract, config.sharding_rules, fsdp_size=8,
                                                          min_size_mb=config.fsdp_min_size_mb))
    frozen = flatten_params(param_groups(abstract, config).frozen)
    per_device = {p: _leaf_bytes(x) // (8 if "fsdp" in specs[p] else 1) for p, x in flatten_params(abstract).items()}
    replicated = sum(_leaf_bytes(x) for p, x in flatten_params(abstract).items() if specs[p] == PartitionSpec())
    trainable = sum(b for p, b in per_device.items() if not frozen[p])
    return sum(per_device.values()), replicated, trainable


def test_fsdp8_puts_an_eighth_of_the_sharded_params_on_each_device(lowered):
    params, replicated, _ = _expected(get_config(VARIANT))
    assert lowered["params_bytes"] == params
    # Only a few small leaves stay whole: each device holds about 1/8 of the parameter bytes.
    assert replicated < 0.02 * lowered["params_bytes_total"], replicated
    assert abs(lowered["params_bytes"] / lowered["params_bytes_total"] - 1 / 8) < 0.02


def test_adam_moments_follow_their_params(lowered):
    _, _, trainable = _expected(get_config(VARIANT))
    # mu and nu per trainable leaf (frozen leaves keep none), plus a few int32 step counts.
    assert 0 <= lowered["opt_state_bytes"] - 2 * trainable <= 64, (lowered["opt_state_bytes"], trainable)


def test_flops_count_every_scan_iteration(lowered):
    # The clip scans (frames, conditioning slots, corrections) run more than once: counting their
    # bodies by trip count gives more than counting each body once, as XLA's cost analysis does.
    assert lowered["flops_per_device"] > lowered["flops_per_device_loops_once"] > 0


@pytest.mark.slow
def test_compiled_step_holds_what_the_rule_table_says(tmp_path, lowered):
    """The XLA compile (3-8 minutes on two busy cores): the executable's input shardings give the
    same per-device bytes, and memory_analysis holds at least the state."""
    row = _run(tmp_path, xla_flags=FAST_COMPILE)
    assert row["params_bytes"] == lowered["params_bytes"]
    assert row["opt_state_bytes"] == lowered["opt_state_bytes"]
    assert row["argument_bytes"] >= row["params_bytes"] + row["opt_state_bytes"]
    assert row["temp_bytes"] > 0 and row["peak_bytes"] > row["argument_bytes"]
    assert row["cost_analysis_flops"] > 0

"""The train step and loop end to end on the cut-down test model (configs/train.py:test_tiny).

Subprocesses share a persistent compilation cache, so after the first compile each restart loads
the executable. Tolerances are stated beside each comparison.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsam2_jax.configs.train import get_config
from medsam2_jax.training import checkpointing, prompts

STEPS = 5


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loop_volumes")
    lines = []
    for i in range(4):
        rng = np.random.default_rng(i)
        labels = np.zeros((24, 24, 24), np.int16)
        labels[4:18, 5:14, 6:16] = 1
        labels[8:20, 12:20, 3:12] = 2 + i % 2
        image = rng.normal(0, 0.2, labels.shape) + labels
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), folder / f"i{i}.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), folder / f"l{i}.nii.gz")
        lines.append(json.dumps({"image": f"i{i}.nii.gz", "label": f"l{i}.nii.gz"}))
    (folder / "m.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "m.jsonl"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _train_cmd(workdir, manifest, *extra):
    return [sys.executable, "-m", "medsam2_jax.training.cli", "--config", "test_tiny", "--workdir", str(workdir),
            f"--config.data.manifest={manifest}", f"--config.num_steps={STEPS}", "--config.checkpoint_every=1",
            "--config.batch_size=1", *extra]


def _final_params(workdir, step=STEPS):
    latest, params = checkpointing.latest_params(workdir)
    assert latest == step, latest
    return params


def _clips_by_step(workdir):
    clips = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "clips" in record:
            clips[record["step"]] = record["clips"]  # a replayed step after a resume overwrites
    return clips


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k2: v2 for k, v in tree.items() for k2, v2 in _flat(v, f"{prefix}{k}.").items()}
    if isinstance(tree, (list, tuple)):
        return {k2: v2 for i, v in enumerate(tree) for k2, v2 in _flat(v, f"{prefix}{i}.").items()}
    return {prefix: np.asarray(tree)}


def test_prompt_simulation_is_deterministic_and_inside_objects():
    cfg = prompts.PromptConfig()
    masks = np.zeros((4, 2, 32, 32), np.uint8)
    masks[:, 0, 5:15, 8:20] = 1
    kinds = set()
    for seed in range(40):
        a = prompts.simulate_prompts(masks, np.random.default_rng(seed), cfg)
        b = prompts.simulate_prompts(masks, np.random.default_rng(seed), cfg)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        assert a["cond_frames"][0] == 0 and a["cond_valid"][0]
        kinds.add(int(a["prompt_kind"]))
        for slot in np.flatnonzero(a["cond_valid"]):
            assert (a["prompt_labels"][slot, 1] == -1).all()  # object 1 is absent: no points
            if a["prompt_kind"] == prompts.CLICK:
                x, y = a["prompt_points"][slot, 0, 0].astype(int)
                assert masks[a["cond_frames"][slot], 0, y, x] == 1
            if a["prompt_kind"] == prompts.BOX:
                (x0, y0), (x1, y1) = a["prompt_points"][slot, 0]
                assert x0 <= x1 and y0 <= y1 and abs(x0 - 8) <= 2 and abs(y1 - 14) <= 2
    assert kinds == {prompts.MASK, prompts.BOX, prompts.CLICK}


def test_correction_click_comes_from_the_error_region():
    import jax

    gt = np.zeros((16, 16), bool)
    gt[2:8, 2:8] = True
    pred = np.zeros((16, 16), bool)
    pred[2:8, 2:5] = True  # misses columns 5..7
    pred[12, 12] = True  # one false positive
    for seed in range(20):
        xy, label, valid = prompts.correction_click(jax.random.key(seed), gt, pred, 0.0)
        x, y = np.asarray(xy).astype(int)
        assert bool(valid) and (gt ^ pred)[y, x] and int(label) == int(gt[y, x])


def test_sigkill_and_resume_is_bit_identical(manifest, env, tmp_path):
    """An uninterrupted run against one killed with SIGKILL twice at random steps and resumed:
    params bit-identical, the same clips at every step. Also checks the logs."""
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(reference, manifest), env=env, check=True, capture_output=True, timeout=400)
    assert (reference / "tensorboard").is_dir() and any((reference / "tensorboard").iterdir())
    first = json.loads((reference / "metrics.jsonl").read_text().splitlines()[0])
    assert {"core_loss", "loss_mask", "lr", "grad_norm", "steps_per_s", "train_dice"} <= set(first)

    interrupted = tmp_path / "interrupted"
    rng = np.random.default_rng(0)
    for kill_after in sorted(rng.choice(np.arange(1, STEPS), size=2, replace=False)):
        proc = subprocess.Popen(_train_cmd(interrupted, manifest), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            clips = _clips_by_step(interrupted) if (interrupted / "metrics.jsonl").exists() else {}
            if clips and max(clips) >= kill_after:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    subprocess.run(_train_cmd(interrupted, manifest), env=env, check=True, capture_output=True, timeout=400)

    ref, got = _flat(_final_params(reference)), _flat(_final_params(interrupted))
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    assert _clips_by_step(interrupted) == _clips_by_step(reference)


def test_bad_record_stops_with_the_file_name_or_is_skipped(manifest, env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = [json.dumps({k: str(manifest.parent / v) for k, v in json.loads(line).items()})
            for line in manifest.read_text().splitlines()]
    missing = str(manifest.parent / "missing.nii.gz")
    bad.write_text("\n".join([json.dumps({"image": missing, "label": missing})] * 4) + "\n")
    result = subprocess.run(_train_cmd(tmp_path / "w1", bad, "--config.data.on_bad_record=raise"), env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "missing.nii.gz" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    # Skip mode with nothing usable stops with a clear DataError, the same exit as above: that is
    # test_training_data's test_skip_mode_gives_up_when_nothing_reads (a subprocess here spent
    # minutes compiling the initial state before reading a record, and timed out on a busy CPU).
    # Skip mode: the bad entry is logged once and training goes on with the good ones.
    bad.write_text("\n".join(good + [json.dumps({"image": missing, "label": missing}), "not json"]) + "\n")
    result = subprocess.run(_train_cmd(tmp_path / "w2", bad, "--config.num_steps=2"), env=env,
                            capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "missing.nii.gz" in result.stderr and "not valid JSON" in result.stderr
    assert result.stderr.count("skipping bad record: " + missing) == 1


EIGHT_DEVICES = textwrap.dedent(
    """
    import jax, numpy as np
    assert jax.device_count() == 8
    from medsam2_jax.configs.train import get_config
    from medsam2_jax.model.sam2 import init_params
    from medsam2_jax.training import prompts, sharding
    from medsam2_jax.training.optimizer import make_optimizer
    from medsam2_jax.training.state import TrainState
    from medsam2_jax.training.train_step import make_steps

    config = get_config("test_tiny")
    size, b, t, n = 64, 8, 3, 2
    rng = np.random.default_rng(0)
    masks = np.zeros((b, t, n, size, size), np.uint8)
    masks[:, :, 0, 10:30, 12:34] = 1
    masks[:, 1:, 1, 36:50, 20:44] = 1
    batch = {"image": rng.random((b, t, size, size)).astype(np.float32), "masks": masks,
             "object_valid": np.ones((b, n), bool)}
    pcfg = prompts.PromptConfig.from_config(config.prompts)
    sims = [prompts.simulate_prompts(masks[i], np.random.default_rng(i), pcfg) for i in range(b)]
    batch.update({k: np.stack([s[k] for s in sims]) for k in sims[0]})
    params = jax.jit(lambda: init_params(jax.random.key(0), config.model_config))()
    params = jax.device_get(params)

    def run(mesh):
        tx = make_optimizer(params, config)
        state = TrainState.create(params, tx, jax.random.key(1))
        shardings = sharding.state_shardings(jax.eval_shape(lambda: state), tx, mesh, config.sharding_rules,
                                             min_size_mb=0.0)
        state = jax.device_put(state, shardings)
        steps = make_steps(config, state_shardings=shardings, batch_sharding=sharding.batch_sharding(mesh))
        losses = []
        for _ in range(2):
            state, metrics = steps.train_step(state, sharding.shard_batch(batch, mesh))
            losses.append(float(metrics["core_loss"]))
        return jax.device_get(state.params), losses

    p8, l8 = run(sharding.make_mesh((2, 4)))
    p1, l1 = run(sharding.make_mesh((1, 1), devices=jax.devices()[:1]))
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
    print("losses", l8, l1, "max param diff", diff, "moved", moved)
    np.testing.assert_allclose(l8, l1, rtol=1e-4)
    assert moved > 1e-4 and diff <= 2e-5, (diff, moved)
    """
)


# Slow: XLA compiles the sharded train step for 4 min on a quiet 2-core CPU and for 9 min on a busy
# one (the one-device compile adds a few more), so the subprocess gets 25 min; test_training_sharding's
# 8-device step check (17 s) covers sharding in the default suite.
@pytest.mark.slow
def test_sharded_train_step_matches_one_device(env):
    """8 simulated devices, data 2 x fsdp 4, two steps of the real train step against one device.

    The sharded run sums over devices in another order (float32), so losses agree to rtol 1e-4
    and params to 2e-5 absolute after two Adam steps with lr 1e-3 (each step moves a weight by
    at most ~lr, and an Adam step on a near-zero gradient amplifies a 1e-7 difference in it)."""
    result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], capture_output=True, text=True, timeout=1500,
                            env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout)


TWO_PROCESSES = textwrap.dedent(
    """
    import hashlib, sys
    import jax, numpy as np
    from medsam2_jax.configs.train import get_config
    from medsam2_jax.training.loop import train

    config = get_config("test_tiny")
    config.data.manifest, config.num_steps, config.batch_size = sys.argv[1], 2, 2
    config.checkpoint_every, config.tensorboard = 1, False
    state = train(config, sys.argv[2])
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state.params):
        digest.update(np.asarray(leaf.addressable_data(0)).tobytes())
    print("PARAMS", jax.process_index(), jax.process_count(), digest.hexdigest())
    """
)


def test_two_processes_train_together(manifest, env, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESSES, str(manifest), str(tmp_path / "w")],
                              env=dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=500) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    lines = [next(ln for ln in out.splitlines() if ln.startswith("PARAMS")).split() for out, _ in outs]
    assert {ln[1] for ln in lines} == {"0", "1"} and all(ln[2] == "2" for ln in lines)
    assert lines[0][3] == lines[1][3]


def test_bad_init_checkpoint_is_one_clear_line(manifest, tmp_path, capsys):
    from medsam2_jax.training.cli import main

    missing = tmp_path / "no_weights_here"
    missing.mkdir()
    code = main(["--config", "test_tiny", "--workdir", str(tmp_path / "run"), "--init_checkpoint", str(missing),
                 f"--config.data.manifest={manifest}", "--config.num_steps=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert str(missing) in err and "not a medsam2_jax checkpoint" in err and "Traceback" not in err


def test_initial_state_applies_the_local_memory_attention_init():
    """A fresh state gets the local cross-attention biases when the config asks, and only then."""
    import jax

    from medsam2_jax.model.memory_attention import local_cross_attention_init
    from medsam2_jax.model.sam2 import init_params
    from medsam2_jax.training import loop, sharding
    from medsam2_jax.training.optimizer import make_optimizer
    from medsam2_jax.training.state import TrainState

    config = get_config("test_tiny")
    mesh = sharding.make_mesh(config.mesh_shape)
    abstract = jax.eval_shape(lambda k: init_params(k, config.model_config), jax.random.key(0))
    tx = make_optimizer(abstract, config)
    shardings = sharding.state_shardings(jax.eval_shape(lambda p: TrainState.create(p, tx, jax.random.key(0)),
                                                        abstract),
                                         tx, mesh, config.sharding_rules, min_size_mb=config.fsdp_min_size_mb)
    plain = loop.initial_state(config, tx, shardings).params
    config.local_memory_attention_init = True
    local = loop.initial_state(config, tx, shardings).params
    expected = local_cross_attention_init(plain, config.model_config)
    for got, want in zip(jax.tree.leaves(local), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    bias = lambda p: np.asarray(p["memory_attention"]["layers"][0]["cross_attn_image"]["q_proj"]["bias"])  # noqa: E731
    assert not np.array_equal(bias(plain), bias(local))

"""Orbax round trip of the TrainState and the grain iterator: every N steps, keep k, resume."""

import json

import grain
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from medsam2_jax.configs.train import get_config
from medsam2_jax.training import checkpointing, data, sharding
from medsam2_jax.training.optimizer import make_optimizer
from medsam2_jax.training.state import TrainState


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt_volumes")
    lines = []
    for i in range(4):
        rng = np.random.default_rng(i)
        labels = np.zeros((16, 16, 16), np.int16)
        labels[3:12, 4:10, 5:11] = 1 + i
        nib.save(nib.Nifti1Image(rng.normal(size=labels.shape).astype(np.float32), np.eye(4)), folder / f"i{i}.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), folder / f"l{i}.nii.gz")
        lines.append(json.dumps({"image": f"i{i}.nii.gz", "label": f"l{i}.nii.gz"}))
    (folder / "m.jsonl").write_text("\n".join(lines))
    return folder / "m.jsonl"


@pytest.fixture(scope="module")
def config(manifest):
    c = get_config("test")
    c.data.manifest = str(manifest)
    c.data.image_size = 16
    return c


def _iterator(config):
    return iter(data.dataset_from_config(config, batch_size=2, shard=grain.sharding.ShardOptions(0, 1)))


def _state(config, seed):
    rng = np.random.default_rng(seed)
    params = {
        "image_encoder": {"trunk": {"blocks": [{"mlp": {"layers": [
            {"kernel": rng.normal(size=(8, 16)).astype(np.float32), "bias": np.zeros(16, np.float32)}]}}]}},
        "sam_mask_decoder": {"iou_token": rng.normal(size=(1, 16)).astype(np.float32)},
        "sam_prompt_encoder": {"pe_layer": {"positional_encoding_gaussian_matrix": np.ones((2, 4), np.float32)}},
    }
    tx = make_optimizer(params, config)
    return TrainState.create(params, tx, jax.random.key(seed))


@jax.jit
def _step(state):
    grads = jax.tree.map(jnp.cos, state.params)
    state, _ = state.next_rng()
    return state.apply_gradients(grads)


def _assert_trees_equal(a, b):
    """Same leaves at the same paths (the static tx of two states is two equal-config objects)."""
    (a_leaves, b_leaves) = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
    assert [p for p, _ in a_leaves] == [p for p, _ in b_leaves]
    for (path, x), (_, y) in zip(a_leaves, b_leaves):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_round_trip_with_data_iterator(config, tmp_path):
    state = _state(config, 0)
    it = _iterator(config)
    manager = checkpointing.make_checkpoint_manager(tmp_path, save_every=2, keep=2)
    saved = {}
    for _ in range(6):
        next(it)
        state = _step(state)
        step = int(state.step)
        did = checkpointing.save_checkpoint(manager, state, it)
        assert did == (step % 2 == 0)
        if did:
            saved[step] = state
            # The save is async: the live iterator moves on before it finishes, yet the
            # checkpoint holds the iterator as it was at the save.
            expected_next = [next(it) for _ in range(2)]
    manager.wait_until_finished()
    assert manager.all_steps() == [4, 6]  # keep the last 2
    manager.close()

    # A new job pointed at the same workdir resumes from the latest step.
    resumed = checkpointing.make_checkpoint_manager(tmp_path, save_every=2, keep=2)
    fresh = _state(config, 1)
    fresh_it = _iterator(config)
    restored = checkpointing.restore_checkpoint(resumed, checkpointing.abstract_like(fresh), fresh_it)
    _assert_trees_equal(restored, saved[6])
    assert int(restored.step) == 6 and restored.tx is fresh.tx
    for batch in expected_next:
        got = next(fresh_it)
        for key in batch:
            np.testing.assert_array_equal(got[key], batch[key], err_msg=key)
    # Training continues identically from the restored state.
    _assert_trees_equal(_step(restored), _step(saved[6]))
    resumed.close()


def test_forced_save_restore_into_shardings_and_empty_workdir(config, tmp_path):
    manager = checkpointing.make_checkpoint_manager(tmp_path, save_every=100, keep=1, async_save=False)
    assert checkpointing.restore_checkpoint(manager, checkpointing.abstract_like(_state(config, 0))) is None
    state = _step(_state(config, 0))
    assert not checkpointing.save_checkpoint(manager, state)
    assert checkpointing.save_checkpoint(manager, state, force=True)
    mesh = sharding.make_mesh((-1, 1))
    shardings = sharding.state_shardings(jax.eval_shape(lambda: state), state.tx, mesh, min_size_mb=0)
    restored = checkpointing.restore_checkpoint(manager, checkpointing.abstract_like(state, shardings))
    _assert_trees_equal(restored, state)
    kernel = restored.params["image_encoder"]["trunk"]["blocks"][0]["mlp"]["layers"][0]["kernel"]
    assert kernel.sharding == shardings.params["image_encoder"]["trunk"]["blocks"][0]["mlp"]["layers"][0]["kernel"]
    manager.close()


def test_manager_from_config(config, tmp_path):
    manager = checkpointing.manager_from_config(tmp_path, config)
    assert manager.directory.name == "checkpoints"
    manager.close()


def test_fine_tuning_starts_from_a_converted_checkpoint(tmp_path):
    """`--init_checkpoint` (a `medsam2-jax convert` / `save_params` folder): the first state holds
    those weights exactly, at step 0, laid out by the state shardings; a checkpoint for another
    model is refused with a one-line CheckpointError."""
    from medsam2_jax.convert.checkpoint import CheckpointError, save_params
    from medsam2_jax.model.sam2 import init_params
    from medsam2_jax.training.loop import initial_state

    config = get_config("test_tiny")
    params = jax.device_get(jax.jit(lambda: init_params(jax.random.key(7), config.model_config))())
    save_params(params, tmp_path / "ckpt", config.model_config)
    mesh = sharding.make_mesh((1, 1))
    abstract = jax.eval_shape(lambda: params)
    tx = make_optimizer(abstract, config)
    abstract_state = jax.eval_shape(lambda p: TrainState.create(p, tx, jax.random.key(0)), abstract)
    shardings = sharding.state_shardings(abstract_state, tx, mesh, config.sharding_rules, min_size_mb=0.0)
    state = initial_state(config, tx, shardings, str(tmp_path / "ckpt"))
    assert int(state.step) == 0
    _assert_trees_equal(state.params, params)
    other = get_config("test_tiny")
    other.model_config.memory_attention.num_layers = 2
    with pytest.raises(CheckpointError, match="does not fit"):
        initial_state(other, make_optimizer(jax.eval_shape(lambda: init_params(jax.random.key(0), other.model_config)),
                                            other), None, str(tmp_path / "ckpt"))

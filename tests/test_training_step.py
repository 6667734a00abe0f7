"""The train step's forward runs the tracker's own step in training mode, through the memory policy.

Small: the cut-down test model (configs/train.py:test_tiny, 64 px), one clip of 6 frames with two
objects, a GT-mask prompt on frame 0, no correction clicks.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medsam2_jax.configs.train import get_config
from medsam2_jax.model.sam2 import init_params
from medsam2_jax.tracker.config import get_tracker_config
from medsam2_jax.tracker.policies import Fifo, register_policy
from medsam2_jax.training import prompts
from medsam2_jax.training.train_step import batch_forward

T, N, SIZE = 6, 2, 64


class CountingFifo(Fifo):
    """SAM 2's ring, plus a count of the writes it was offered and accepted (the bank: both)."""

    name = "counting_fifo"

    def init(self):
        return super().init(), jnp.zeros((), jnp.int32)

    def write(self, state, entry, active):
        ring, count = state.bank
        ring = super().write(state.replace(bank=ring), entry, active).bank
        return state.replace(bank=(ring, count + jnp.asarray(active, jnp.int32)))

    def read(self, state, query):
        return super().read(state.replace(bank=state.bank[0]), query)

    def held_frames(self, state):
        return super().held_frames(state.replace(bank=state.bank[0]))


register_policy("counting_fifo", CountingFifo)


@pytest.fixture(scope="module")
def setup():
    config = get_config("test_tiny")
    model_config = config.model_config
    params = jax.jit(lambda: init_params(jax.random.key(0), model_config))()
    masks = np.zeros((1, T, N, SIZE, SIZE), np.uint8)
    for t in range(T):
        masks[0, t, 0, 10 + t : 30, 12:34] = 1
        masks[0, t, 1, 36:50, 20 + t : 44] = 1
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((1, T, SIZE, SIZE)).astype(np.float32) + masks[:, :, 0] * 0.5,
             "masks": masks, "object_valid": np.ones((1, N), bool)}
    pcfg = prompts.PromptConfig(num_init_cond_frames=1, rand_init_cond_frames=False, prob_point_input=0.0,
                                num_correction_points=0)
    sim = prompts.simulate_prompts(masks[0], np.random.default_rng(0), pcfg)
    assert int(sim["prompt_kind"]) == prompts.MASK
    batch.update({k: v[None] for k, v in sim.items()})
    return model_config, params, pcfg, batch


def _forward(setup, **tracker_kwargs):
    model_config, params, pcfg, batch = setup
    tracker_config = get_tracker_config(max_cond_frames=1, **tracker_kwargs)
    fn = functools.partial(batch_forward, config=model_config, tracker_config=tracker_config, pcfg=pcfg,
                           num_corrections=0, remat=False)
    return jax.device_get(jax.jit(lambda p, b: fn(p, batch=b, key=jax.random.key(0)))(params, batch))


def test_tracked_frames_write_through_the_policy(setup):
    """Every tracked frame (not the conditioning frame 0) is offered to the configured policy."""
    out = _forward(setup, memory_policy="counting_fifo")
    fifo = _forward(setup, memory_policy="fifo")
    # The count lives in the final state's bank; bank_frames are the ring's frames, as fifo's.
    np.testing.assert_array_equal(out["bank_frames"], fifo["bank_frames"])
    held = sorted(int(f) for f in out["bank_frames"][0, 0] if f >= 0)
    assert held == list(range(1, T)), held  # frames 1..5, all in the 6-slot ring
    np.testing.assert_array_equal(out["tracked_masks"], fifo["tracked_masks"])


def test_policy_changes_what_the_clip_reads(setup):
    """A self-sorting bank that accepts nothing (threshold above any confidence) holds no frame, and
    the tracked masks then differ from fifo's from frame 2 on (frame 1 reads only the prompt)."""
    fifo = _forward(setup, memory_policy="fifo")
    none = _forward(setup, memory_policy="self_sorting", conf_threshold=2.0)
    assert (none["bank_frames"] == -1).all()
    # Equal up to rounding: the two banks have different numbers of (masked) keys, so the
    # attention sums in a different order.
    np.testing.assert_allclose(none["tracked_masks"][:, 1], fifo["tracked_masks"][:, 1], rtol=0, atol=1e-6)
    diff = np.abs(none["tracked_masks"][:, 2:] - fifo["tracked_masks"][:, 2:]).max()
    assert diff > 1e-4, diff
    sorting = _forward(setup, memory_policy="self_sorting", conf_threshold=0.0, lambda_conf=0.5)
    held = sorting["bank_frames"][0]
    assert set(held[held >= 0].ravel()) <= set(range(1, T))


def test_traced_multimask_candidates_match_static(setup):
    """forward_sam_heads with a traced multimask flag gives the static flag's candidates in one
    decoder run: the M masks and IoUs with multimask, the single mask repeated M times without."""
    from medsam2_jax.model import sam2

    model_config, params, _, batch = setup
    rgb = jnp.broadcast_to(jnp.asarray(batch["image"][0, :1, :, :, None]), (1, SIZE, SIZE, 3))
    feats = sam2.forward_image(params, sam2.preprocess(rgb, model_config), model_config)
    pix = sam2.add_no_mem_embed(params, feats.vision_features)
    pts, lab = jnp.asarray([[[12.0, 10.0], [33.0, 29.0]]]), jnp.asarray([[2, 3]])

    def heads(flag):
        out = sam2.forward_sam_heads(params, pix, model_config, pts, lab,
                                     high_res_features=feats.high_res_features, multimask_output=flag)
        return dict(zip(("low_res_multimasks", "ious"), sam2.multimask_candidates(out, flag)))

    for flag in (True, False):
        static, traced = heads(flag), jax.jit(heads)(jnp.asarray(flag))
        m = model_config.mask_decoder.num_multimask_outputs
        assert traced["low_res_multimasks"].shape[-1] == m and traced["ious"].shape[-1] == m
        expect = jnp.broadcast_to(static["low_res_multimasks"], traced["low_res_multimasks"].shape)
        np.testing.assert_allclose(traced["low_res_multimasks"], expect, atol=1e-5)
        np.testing.assert_allclose(traced["ious"], jnp.broadcast_to(static["ious"], traced["ious"].shape), atol=1e-6)


def test_box_mask_input_marks_the_box():
    """The demo model's dense box prompt: +10 on mask-input pixels whose centres fall in the box
    (corners labelled 2 and 3, in model pixels), -10 elsewhere, all -10 without a box; padded
    points do not count."""
    from medsam2_jax.configs.model import get_config
    from medsam2_jax.model.sam2 import box_mask_input

    config = get_config("demo")  # 128 px, mask input 32 x 32: 4 model pixels per mask pixel
    coords = jnp.asarray([[[8.0, 16.0], [23.0, 39.0]], [[8.0, 16.0], [23.0, 39.0]], [[50.0, 50.0], [0.0, 0.0]]])
    labels = jnp.asarray([[2, 3], [2, 3], [1, -1]])
    mask = jnp.asarray([[True, True], [True, False], [True, False]])
    out = np.asarray(box_mask_input(coords, labels, mask, config, 32))[..., 0]
    expect = np.full((32, 32), -10.0)
    expect[4:10, 2:6] = 10.0  # rows: y 16..40 -> centres 18..38; cols: x 8..24 -> centres 10..22
    np.testing.assert_array_equal(out[0], expect)
    assert (out[1] == -10).all() and (out[2] == -10).all()


def test_demo_stages_share_one_model():
    """Each stage of the demo recipe starts from the previous one's weights: one model; single
    slices, then slice pairs with the local memory start, then clips that run past the object,
    then (STOP_STAGES, not shipped) the stopping stages (an empty-mask target past the end); the
    prompt-window experiment (CROP_STAGES) does the same on windows. Only the first stage that tracks
    starts local: a later one would reset what it learned."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from train_demo_model import CROP_STAGES, STAGES, STOP_STAGES

    configs = [get_config(v) for v in STAGES + STOP_STAGES]  # the shipped stages, then the stopping experiment
    assert STAGES[-1] == "demo" and STOP_STAGES[-1] == "demo_stop_refine" and all(
        c.model_config == configs[0].model_config and c.model == "demo" for c in configs)
    assert configs[0].data.clip_length == 1 and all(c.data.clip_length > 1 for c in configs[1:])
    assert [c.local_memory_attention_init for c in configs] == [False, True] + [False] * (len(configs) - 2)
    assert configs[-1].data.exit_prob > 0 and configs[-1].loss.mask_on_absent
    assert not any(c.loss.mask_on_absent for c in configs[:3])
    assert not any(c.data.crop_prob or c.inference_crop for c in configs)  # the shipped recipe: whole slices
    # The prompt-window experiment: single slices with the encoder trained, tracking, then stopping,
    # all on windows, exporting the window they expect.
    crop = [get_config(v) for v in CROP_STAGES]
    assert all(c.data.crop_prob > 0 and c.inference_crop >= 1 and c.model_config == configs[0].model_config
               for c in crop)
    assert crop[0].data.clip_length == 1 and crop[0].freeze == ()
    assert not crop[1].loss.mask_on_absent and crop[2].loss.mask_on_absent


@pytest.mark.parametrize("kind", ["box", "click"])
def test_conditioning_frame_sees_the_prompt(setup, kind):
    """The train step's output on a box- or click-prompted frame is the decoder's answer to that
    prompt, as inference computes it (forward_sam_heads on the no-memory features), and moving
    the prompt changes it. (A sign slip once turned every label negative, so training never
    showed the model a prompt; the mask-prompt tests above could not see that.)"""
    from medsam2_jax.model import sam2

    model_config, params, pcfg, batch = setup
    if kind == "box":
        points, labels, code = [[12.0, 10.0], [33.0, 29.0]], [2, 3], prompts.BOX
    else:
        points, labels, code = [[22.0, 20.0], [0.0, 0.0]], [1, -1], prompts.CLICK
    one = {k: np.asarray(batch[k]) for k in ("image", "masks", "object_valid", "cond_frames", "cond_valid")}
    one["image"], one["masks"] = one["image"][:, :1], one["masks"][:, :1, :1]
    one["object_valid"] = one["object_valid"][:, :1]
    one["prompt_kind"] = np.asarray([code], np.int32)

    def train_output(shift):
        b = dict(one, prompt_points=np.asarray(points, np.float32)[None, None, None] + shift,
                 prompt_labels=np.asarray(labels, np.int32)[None, None, None])
        fn = functools.partial(batch_forward, config=model_config, tracker_config=get_tracker_config(max_cond_frames=1),
                               pcfg=pcfg, num_corrections=0, remat=False)
        out = jax.jit(lambda p, x: fn(p, batch=x, key=jax.random.key(0)))(params, b)
        return np.asarray(out["masks"][0, 0, 0]), np.asarray(out["ious"][0, 0, 0])  # frame 0, object 0: (M, S, S)

    masks, ious = train_output(0.0)
    rgb = jnp.broadcast_to(jnp.asarray(one["image"][0, :1, :, :, None]), (1, SIZE, SIZE, 3))
    feats = sam2.forward_image(params, sam2.preprocess(rgb, model_config), model_config)
    lab = jnp.asarray([labels], jnp.int32)
    ref = sam2.forward_sam_heads(params, sam2.add_no_mem_embed(params, feats.vision_features), model_config,
                                 jnp.asarray([points], jnp.float32), lab, high_res_features=feats.high_res_features,
                                 multimask_output=kind == "click", point_mask=lab >= 0)
    ref = dict(zip(("low_res_multimasks", "ious"), sam2.multimask_candidates(ref, kind == "click")))
    m = model_config.mask_decoder.num_multimask_outputs
    ref_masks = jax.image.resize(ref["low_res_multimasks"][0], (SIZE, SIZE, ref["low_res_multimasks"].shape[-1]),
                                 "bilinear", antialias=False)
    np.testing.assert_allclose(masks, np.broadcast_to(np.moveaxis(np.asarray(ref_masks), -1, 0), (m, SIZE, SIZE)),
                               atol=1e-4)
    np.testing.assert_allclose(ious, np.broadcast_to(np.asarray(ref["ious"][0]), (m,)), atol=1e-5)
    moved, _ = train_output(15.0)
    assert np.abs(moved - masks).max() > 1e-3


def test_box_mask_prompt_leaves_frames_without_a_box_alone():
    """With `box_mask_prompt`, a click or a tracked frame (no box) gets SAM 2's `no_mask_embed`,
    exactly as without the option; only a box adds the dense rectangle."""
    from medsam2_jax.configs.model import get_config
    from medsam2_jax.model import sam2

    with_box = get_config("demo")
    plain = with_box.copy_and_resolve_references()
    plain.box_mask_prompt = False
    params = jax.jit(lambda: init_params(jax.random.key(1), plain))()
    keys = jax.random.split(jax.random.key(2), 3)
    s = with_box.image_size // with_box.backbone_stride
    pix = jax.random.normal(keys[0], (1, s, s, with_box.hidden_dim))
    hr = [jax.random.normal(keys[1], (1, 4 * s, 4 * s, with_box.hidden_dim // 8)),
          jax.random.normal(keys[2], (1, 2 * s, 2 * s, with_box.hidden_dim // 4))]

    def run(config, points, labels):
        lab = jnp.asarray([labels], jnp.int32)
        coords = jnp.asarray([points], jnp.float32)
        out = sam2.forward_sam_heads(params, pix, config, coords, lab, high_res_features=hr, point_mask=lab >= 0,
                                     **sam2.box_mask_prompt(config, coords, lab, lab >= 0))
        return np.concatenate([np.ravel(out[k]) for k in ("low_res_masks", "iou", "object_score_logits")])

    click = ([[40.0, 50.0], [0.0, 0.0]], [1, -1])
    box = ([[30.0, 40.0], [70.0, 90.0]], [2, 3])
    np.testing.assert_array_equal(run(with_box, *click), run(plain, *click))
    assert sam2.box_mask_prompt(with_box) == {"mask_inputs": None}  # a tracked frame: no points, no mask input
    assert np.abs(run(with_box, *box) - run(plain, *box)).max() > 1e-3

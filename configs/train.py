"""Training configs: one file, many variants (`configs/train.py:VARIANT`, or `get_config("test")`).

The recipe follows SAM 2's released fine-tuning config (`sam2.1_hiera_b+_MOSE_finetune.yaml`,
sam2-architecture.md section 6): AdamW, cosine lr from `lr` to `lr * final_lr_ratio` (5e-6 -> 5e-7
for the heads, 3e-6 -> 3e-7 for the image encoder), weight decay 0.1 except biases and norms,
layer-wise lr decay 0.9 on the Hiera trunk with pos-embeds exempt, gradient clipping at norm 0.1,
8 frames and up to 3 objects per clip, loss weights 20/1/1/1. We add a linear warmup (the
official fine-tune has none) and leave embeddings out of weight decay by default.

Variants:
  sam2.1_tiny, sam2.1_small, sam2.1_base_plus, sam2.1_large, medsam2   fine-tuning recipes
  test                                                                 10M test model, tiny clips, for tests
  test_tiny                                                            test model cut down (64 px, one
                                                                       decoder / memory layer): fast compiles
  demo_images, demo_tracking, demo,                                    the shipped demo model from scratch on
  demo_stop, demo_stop_refine                                          Colin27/AAL + MNI152 tissue, 2 CPU cores,
                                                                       in stages: single prompted slices, slice
                                                                       pairs, clips that run past the object,
                                                                       then stopping (scripts/train_demo_model.py)
"""

from __future__ import annotations

import ml_collections

from medsam2_jax.configs import model as model_configs

# Regexes (re.search on the dotted parameter path). Norm weights are all leaves named `scale`;
# learned embeddings and tokens are listed by name.
NO_WEIGHT_DECAY = (
    r"\.bias$",
    r"(^|\.)scale$",
    r"pos_embed",
    r"(^|\.)maskmem_tpos_enc$",
    r"(^|\.)no_[a-z_]+$",
    r"(^|\.)not_a_point_embed$",
    r"(^|\.)point_embeddings\.\d+$",
    r"_tokens?$",
)

# Always frozen: the prompt encoder's random Fourier matrix is a registered *buffer* in SAM 2,
# never trained; ours is a leaf only because our params hold every array.
ALWAYS_FROZEN = (r"^sam_prompt_encoder\.pe_layer\.",)

# Parameter sharding rules, first match wins: (regex on the dotted path, rule). A rule is
# "replicate", "fsdp" (shard the largest axis divisible by the fsdp axis size, only for leaves
# of at least `fsdp_min_size_mb`) or a tuple of mesh axis names / None per array axis.
SHARDING_RULES = (
    (r"pos_embed|maskmem_tpos_enc|(^|\.)no_[a-z_]+$", "replicate"),
    (r".*", "fsdp"),
)


# The demo model's training variants (scripts/train_demo_model.py): all train the `demo` model.
DEMO_VARIANTS = ("demo_images", "demo_tracking", "demo", "demo_stop", "demo_stop_refine", "demo_crop_images",
                 "demo_crop_tracking", "demo_crop")


def get_config(variant: str = "sam2.1_tiny") -> ml_collections.ConfigDict:
    known = ("test_tiny", *DEMO_VARIANTS, *model_configs.VARIANTS)
    if variant not in known:
        raise ValueError(f"unknown training variant {variant!r}; choose one of: {', '.join(known)} (a model "
                         f"variant trains that model with its defaults)")
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.model = "test" if variant == "test_tiny" else "demo" if variant in DEMO_VARIANTS else variant
    c.model_config = model_configs.get_config(c.model)
    c.init_checkpoint = ""  # a converted SAM 2 checkpoint dir (convert CLI); empty = from scratch
    c.seed = 123

    # Data (data.py).
    c.data = ml_collections.ConfigDict()
    c.data.manifest = ""  # JSONL or CSV of image/label NIfTI pairs
    c.data.clip_length = 8  # T consecutive slices
    c.data.objects_per_clip = 3  # N; clips with fewer objects are padded and masked
    c.data.slice_axis = "random"  # 0, 1, 2 (canonical RAS voxel axes) or "random"
    c.data.exit_prob = 0.0  # share of clips started near the anchor's last slice, so they run past its end
    c.data.max_slice_stride = 1  # frames every k-th slice, k uniform in 1..max per clip (thicker slices)
    # Prompt-centred windows, as `segment --crop` shows them to the model: the share of clips cut to
    # a square around the anchor's first-frame box, crop_factor times its longer side (>= min side px).
    c.data.crop_prob = 0.0
    c.data.crop_factor = (2.5, 4.0)
    c.data.crop_min_side = 32.0
    # The prompt window the exported weights expect (their manifest's inference.crop, the default of
    # `segment`/`demo`/`evaluate --crop`); 0 = whole slices.
    c.inference_crop = 0.0
    c.data.image_size = c.model_config.image_size
    c.data.on_bad_record = "skip"  # "skip" (log a warning naming the file) or "raise"
    c.data.num_epochs = -1  # -1 repeats forever
    c.data.worker_count = 0  # grain multiprocessing workers; 0 reads in the training process
    c.data.read_threads = 2  # threads reading records in each process
    c.data.prefetch_buffer = 4  # records read ahead (each holds a whole volume while it is read)
    c.data.augment = ml_collections.ConfigDict(
        dict(
            hflip_prob=0.5,
            vflip_prob=0.0,
            rotate_degrees=10.0,
            scale_range=(0.9, 1.1),
            translate_fraction=0.05,
            brightness=0.1,  # additive, in [0, 1] intensity units
            contrast=0.2,  # multiplicative about the clip mean: 1 +- contrast
            gamma=0.2,  # exponent exp(U(-gamma, gamma))
            slice_flip_prob=0.0,  # reverse the slice order (the tracking direction)
        )
    )

    c.data.val_manifest = ""  # clips for validation Dice (no augmentation); empty = none
    c.data.val_batches = 2  # batches per validation

    # Prompt simulation (prompts.py), SAM 2's training defaults.
    c.prompts = ml_collections.ConfigDict(
        dict(
            num_init_cond_frames=2,  # 1..2 conditioning frames: frame 0 and maybe one more
            rand_init_cond_frames=True,
            prob_point_input=0.5,  # else a GT mask on the conditioning frames
            prob_box_input=0.5,  # of point inputs: box, else one click
            box_noise=0.1,
            box_noise_bound=20.0,
            num_correction_points=7,  # iterative error clicks on conditioning frames (point input)
            prob_from_gt=0.1,
        )
    )

    # Train step (train_step.py).
    c.compute_dtype = "float32"  # or "bfloat16": params stay float32, the forward runs in bf16
    c.remat = True  # jax.checkpoint around each frame's tracker step

    # Optimisation (optimizer.py, losses.py).
    c.batch_size = 8  # global, clips per step over all hosts
    c.num_steps = 20_000
    c.lr = 5e-6  # everything outside the image encoder
    c.vision_lr = 3e-6  # image_encoder.*
    c.final_lr_ratio = 0.1
    c.warmup_steps = 500
    c.weight_decay = 0.1
    c.no_weight_decay = NO_WEIGHT_DECAY
    c.layer_decay = 0.9
    c.layer_decay_overrides = ((r"pos_embed", 1.0),)
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.clip_norm = 0.1
    c.freeze = ()  # extra regexes, e.g. (r"^image_encoder\.",) to freeze the image encoder
    # A fresh run (not a resumed one) starts with local memory cross-attention
    # (model.memory_attention.local_cross_attention_init): for training the memory path from scratch.
    c.local_memory_attention_init = False
    c.always_frozen = ALWAYS_FROZEN
    c.loss = ml_collections.ConfigDict(
        dict(mask=20.0, dice=1.0, iou=1.0, object_score=1.0, focal_alpha=0.25, focal_gamma=2.0,
             # SAM 2's focal_alpha_obj_score / focal_gamma_obj_score: -1 / 0 is plain BCE.
             object_score_alpha=-1.0, object_score_gamma=0.0,
             # SAM 2 zeroes the mask terms where the object is absent; True trains an empty mask there.
             mask_on_absent=False)
    )

    # Mesh and sharding (sharding.py). -1 takes all remaining devices.
    c.mesh_shape = (-1, 1)  # (data, fsdp)
    c.sharding_rules = SHARDING_RULES
    c.fsdp_min_size_mb = 4.0

    # Checkpoints (checkpointing.py).
    c.checkpoint_every = 1000
    c.checkpoint_keep = 3
    c.async_checkpoints = True

    # Logging (writers.py, loop.py).
    c.log_every = 10  # steps between scalar logs (each fetches the metrics from the device)
    c.eval_every = 1000  # steps between validation Dice (needs data.val_manifest)
    c.tensorboard = True

    if variant == "medsam2":
        c.data.clip_length = 8
    elif variant in ("test", "test_tiny"):
        c.data.clip_length = 3
        c.data.objects_per_clip = 2
        c.batch_size = 2
        c.num_steps = 10
        c.lr = 1e-3
        c.vision_lr = 5e-4
        c.warmup_steps = 2
        c.clip_norm = 1.0
        c.checkpoint_every = 2
        c.checkpoint_keep = 2
        c.fsdp_min_size_mb = 0.0
        c.prompts.num_correction_points = 1
        c.log_every = 1
        c.eval_every = 5
        if variant == "test_tiny":
            m = c.model_config
            m.name = "test_tiny"
            m.image_size = c.data.image_size = 64
            m.mask_decoder.transformer_depth = 1
            m.mask_decoder.transformer_mlp_dim = 256
            m.memory_attention.num_layers = 1
            m.memory_attention.dim_feedforward = 256
            c.prompts.num_correction_points = 1
    elif variant in DEMO_VARIANTS:
        # From scratch on two CPU cores, in three stages, each from the previous one's weights:
        #   demo_images    encoder and decoder on single prompted slices (cheap steps, all prompted);
        #   demo_tracking  the memory path on slice pairs, conditioned on the GT mask (a clean
        #                  memory), with the memory cross-attention started local;
        #   demo           3-slice clips, half of them box- or click-prompted, a fifth running past
        #                  the object's end.
        # Measured here (the closing notes of issue 6 hold the numbers): one stage of 5-slice clips
        # with random memory attention never tracked in 800 steps (its cross-attention collapsed
        # onto the object pointers); with the local start, 3-slice clips with a third running past
        # the object still learned to predict nothing on tracked frames in 350 steps, while slice
        # pairs on GT masks tracked held-out structures after 200 steps. The result tracks well
        # inside a structure but does not stop at its end (a fourth stage of 4-slice clips, half
        # running past the end, did not change that), which is what limits its volume Dice.
        c.data.objects_per_clip = 1
        c.data.augment.slice_flip_prob = 0.5
        c.data.augment.rotate_degrees = 15.0
        c.data.augment.scale_range = (0.85, 1.15)
        c.final_lr_ratio = 0.05
        c.weight_decay = 0.05
        c.layer_decay = 1.0
        c.clip_norm = 1.0
        c.checkpoint_every = 50
        c.log_every = 10
        c.async_checkpoints = False
        c.prompts.num_init_cond_frames = 1
        c.prompts.rand_init_cond_frames = False
        c.prompts.num_correction_points = 0
        if variant == "demo_images":
            c.data.clip_length = 1
            c.batch_size = 16
            c.num_steps = 600
            c.lr = c.vision_lr = 1e-3
            c.warmup_steps = 50
            c.prompts.prob_point_input = 0.9
            c.prompts.prob_box_input = 0.8
        else:
            # Stage 1's image encoder stays as it is: the memory path has everything to learn, and a
            # step without the encoder's backward pass is cheaper.
            c.freeze = (r"^image_encoder\.",)
        if variant == "demo_tracking":
            c.data.clip_length = 2
            c.batch_size = 8
            c.num_steps = 200
            c.lr = 1e-3
            c.warmup_steps = 50
            c.local_memory_attention_init = True
            c.prompts.prob_point_input = 0.0  # every clip conditioned on its GT mask
        elif variant == "demo":
            c.data.clip_length = 3
            c.data.exit_prob = 0.2
            c.batch_size = 6
            c.num_steps = 500
            c.lr = 5e-4
            c.warmup_steps = 20
            c.prompts.prob_point_input = 0.5
            c.prompts.prob_box_input = 0.7
        elif variant in ("demo_stop", "demo_stop_refine"):
            # Stopping: 3-slice clips every 1-3 slices, half of them running past the object's end,
            # with an empty mask as the target there (loss.mask_on_absent) as well as the object
            # score; then the same at half the lr. Measured on the held-out structures (the closing
            # note of the "model that stops" issue): training only the object-score head, longer
            # clips with more exits, or a 5x object-score weight either changed nothing or stopped
            # a few slices after the prompt; the empty-mask target is what made the masks end.
            c.data.clip_length = 3
            c.data.exit_prob = 0.5
            c.data.max_slice_stride = 3
            c.batch_size = 6
            c.warmup_steps = 20
            c.checkpoint_every = 100
            c.loss.mask_on_absent = True
            c.prompts.prob_point_input = 0.6
            c.prompts.prob_box_input = 0.8
            c.num_steps, c.lr = (400, 2e-4) if variant == "demo_stop" else (500, 1e-4)
        elif variant in ("demo_crop_images", "demo_crop_tracking", "demo_crop"):
            # Prompt-centred windows (`segment --crop`): at 128 px a whole brain slice leaves a
            # thalamus 3-4 pixels of the 32 x 32 mask and one cell of the 8 x 8 memory grid; a
            # window 3x the box gives it ~10 mask pixels and 3 cells. First single slices with the
            # image encoder trained (the new scale), then tracking on the new features (few exits,
            # no empty-mask target), then the stopping clips. Not the shipped recipe. Measured on
            # the held-out structures with --crop 3 (the closing note of the "model that stops"
            # issue): after demo_crop_tracking the per-slice Dice at 2/6/10 slices from the prompt
            # is 0.69/0.59/0.47 (the shipped model: 0.42/0.28/0.20) but nothing stops (volume Dice
            # 0.175); demo_crop then stops 2-4 slices after the prompt by step 200 (0.153), as it
            # did straight after the single slices at lr 2e-4. With the true slice range given
            # (--z-range), demo_crop_tracking reaches 0.532 (the shipped model 0.307): what is
            # missing is stopping. Weights interpolated between demo_crop_tracking and demo_crop
            # ((1 - a) * tracking + a * stop, a and the step chosen on the 4 seen AAL structures:
            # a 0.75 at step 300) gave held-out 0.273, range within 25% on 2/8, prompted-slice 0.77,
            # stardist nuclei 0.392: a tie with the shipped model, so not shipped. The object score
            # of demo_crop_tracking is flat (1-1.6 on every slice but the prompted one, 9.5), and
            # under the self_sorting policy even demo_crop never stops (its bank keeps confident,
            # present frames only). Shifting that blend's object-score bias by delta (stop steps
            # 300/400, a 0.7-0.8, delta -4 to +2; the 4 seen structures) never beat delta 0 (0.288):
            # on tracked slices the score sits between -0.4 and +2 and falls with the distance from
            # the prompt, not at the structure's end, so a shift stops small structures on the
            # prompted slice (delta -0.2: amygdala) before it stops large ones (precentral, cerebellum).
            c.data.crop_prob = 0.8
            c.data.crop_factor = (2.5, 4.0)
            c.inference_crop = 3.0
            c.warmup_steps = 20
            if variant == "demo_crop_images":
                c.freeze = ()
                c.data.clip_length = 1
                c.batch_size = 16
                c.num_steps = 300
                c.lr = c.vision_lr = 3e-4
                c.prompts.prob_point_input = 0.9
                c.prompts.prob_box_input = 0.8
            elif variant == "demo_crop_tracking":
                c.data.clip_length = 3
                c.data.exit_prob = 0.2
                c.data.max_slice_stride = 2
                c.batch_size = 6
                c.num_steps = 250
                c.lr = 5e-4
                c.prompts.prob_point_input = 0.5
                c.prompts.prob_box_input = 0.7
            else:
                c.data.clip_length = 3
                c.data.exit_prob = 0.5
                c.data.max_slice_stride = 3
                c.batch_size = 6
                c.num_steps = 400
                c.lr = 1e-4
                c.checkpoint_every = 100
                c.loss.mask_on_absent = True
                c.prompts.prob_point_input = 0.6
                c.prompts.prob_box_input = 0.8
    return c

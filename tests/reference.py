"""The official SAM 2 (PyPI `sam2==1.1.0`) built with random weights, as the parity oracle.

Recipes from ../shared/spec/testing-against-sam2.md: models are built with hydra overrides that
match our configs key for key, then made decisive (random weights give timid logits around
+-0.3) by scaling the hypernetwork output layers and raising the object-score bias, the same
weights going to both sides.
"""

from __future__ import annotations

import functools

import numpy as np

from medsam2_jax.configs.model import get_config


def hydra_overrides(config) -> tuple[str, list[str]]:
    """The official (yaml name, hydra overrides) that build the same model as `config`."""
    t = config.trunk
    letters = {(96, (5, 7, 9)): "t", (96, (7, 10, 13)): "s", (112, (12, 16, 20)): "b+", (144, (23, 33, 43)): "l"}
    letter = letters.get((t.embed_dim, tuple(t.global_att_blocks)), "t")
    if config.version == "sam2.1":
        yaml = f"configs/sam2.1/sam2.1_hiera_{letter}.yaml"
    else:
        yaml = f"configs/sam2/sam2_hiera_{letter}.yaml"
    overrides = []
    if config.image_size != 1024:
        overrides.append(f"++model.image_size={config.image_size}")
    if config.name.startswith("test"):
        join = lambda xs: ",".join(map(str, xs))
        overrides += [
            f"++model.image_encoder.trunk.embed_dim={t.embed_dim}",
            f"++model.image_encoder.trunk.num_heads={t.num_heads}",
            f"++model.image_encoder.trunk.stages=[{join(t.stages)}]",
            f"++model.image_encoder.trunk.global_att_blocks=[{join(t.global_att_blocks)}]",
            f"++model.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[{join(t.window_pos_embed_bkg_spatial_size)}]",
            f"++model.image_encoder.neck.backbone_channel_list=[{join(config.neck.backbone_channel_list)}]",
            f"++model.memory_attention.num_layers={config.memory_attention.num_layers}",
        ]
    return yaml, overrides


def make_decisive(model, seed: int = 0) -> None:
    """Scale weights in place so masks have clear edges and the object is usually present."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[2].weight.mul_(25.0)
        model.sam_mask_decoder.pred_obj_score_head.layers[2].bias.add_(1.0)


@functools.cache
def reference_image_model(name: str, seed: int = 0):
    """(official SAM2Base in eval mode, our params, our config), built once per session."""
    import torch
    from sam2.build_sam import build_sam2

    from medsam2_jax.convert.checkpoint import torch_to_params

    config = get_config(name)
    yaml, overrides = hydra_overrides(config)
    torch.manual_seed(seed)
    model = build_sam2(yaml, None, device="cpu", hydra_overrides_extra=overrides)
    make_decisive(model, seed)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params, _ = torch_to_params(state, config)
    return model, params, config


@functools.cache
def reference_video_predictor(name: str, seed: int = 0):
    """(official SAM2VideoPredictor sharing the image model's weights, our params, our config)."""
    from sam2.build_sam import build_sam2_video_predictor

    model, params, config = reference_image_model(name, seed)
    yaml, overrides = hydra_overrides(config)
    predictor = build_sam2_video_predictor(yaml, None, device="cpu", hydra_overrides_extra=overrides)
    predictor.load_state_dict(model.state_dict(), strict=True)
    predictor.eval()
    return predictor, params, config


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def mask_agreement(ours: np.ndarray, ref: np.ndarray, margin: float = 1e-2) -> float:
    """Share of pixels whose reference logit is farther than `margin` from 0 with equal sign."""
    far = np.abs(ref) > margin
    if not far.any():
        return 1.0
    return float(((ours > 0) == (ref > 0))[far].mean())


def nhwc(t) -> np.ndarray:
    """A (B, C, H, W) torch tensor as a (B, H, W, C) numpy array."""
    return t.detach().numpy().transpose(0, 2, 3, 1)


def nchw(a):
    """A (B, H, W, C) array as a (B, C, H, W) torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

"""Official SAM 2 checkpoints <-> our parameter pytree, Orbax checkpoints and manifests.

Every failure is a `CheckpointError` with a one-line message naming the keys or the problem;
the CLI prints it without a traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import jax
import numpy as np

from medsam2_jax.convert.table import TRANSFORMS, our_path, torch_key

MANIFEST = "manifest.json"
PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model config."""


def _short(names, n=6) -> str:
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(repr(str(name))[1:-1] for name in names[:n]) + more  # escaped: the message stays one line


# ----------------------------------------------------------------------------------------------
# Pytree paths


def _path_str(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return ".".join(parts)


def flatten_params(params) -> dict:
    """{dotted path: leaf} of a parameter pytree."""
    return {_path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def unflatten_params(flat: dict, template):
    """Fill the structure of `template` (e.g. an abstract tree) with arrays from `flat`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [flat[_path_str(p)] for p, _ in paths])


def abstract_params(config):
    from medsam2_jax.model.sam2 import init_params

    return jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), config))


# ----------------------------------------------------------------------------------------------
# Reading and writing official files


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """An official `.pt` (`torch.load(weights_only=True)["model"]`) or a `.safetensors` file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a .pt or .safetensors file")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    kind = _checkpoint_format(head)
    if kind is None:
        raise CheckpointError(
            f"cannot read {path}: it holds {_describe(head)}, not a PyTorch checkpoint (a zip or pickle, as "
            "torch.save writes) nor safetensors; expected an official SAM 2 / MedSAM2 .pt or .safetensors file"
        )
    if kind == "safetensors":
        try:
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
        except Exception as e:  # safetensors raises several types for damaged files
            raise CheckpointError(f"cannot read {path}: not a valid safetensors file ({_one_line(e)})") from None
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            "reading a PyTorch .pt checkpoint needs torch: pip install 'medsam2_jax[convert]'"
        ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"cannot read {path}: truncated or not a PyTorch checkpoint ({_one_line(e)})"
        ) from None
    except Exception as e:  # weights_only refuses pickled code objects
        raise CheckpointError(f"cannot safely load {path}: {_one_line(e)}") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) and hasattr(v, "shape") for k, v in state.items()):
        raise CheckpointError(f"{path} holds no state dict (expected a dict with a 'model' entry of tensors)")
    # Checkpoints saved from a DistributedDataParallel wrapper carry a "module." prefix.
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def _checkpoint_format(head: bytes) -> str | None:
    """'torch' or 'safetensors' by a file's first bytes (not its name), or None for neither."""
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):  # torch.save: a zip, or a pickle before 1.6
        return "torch"
    if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        return "safetensors"
    return None


def _describe(head: bytes) -> str:
    """What a file that is no checkpoint holds, in a few words: its first bytes as text or hex."""
    if not head:
        return "nothing (0 bytes)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or not all(c.isprintable() or c.isspace() for c in text):
        return f"binary data starting {head[:8].hex(' ')}"
    words = " ".join(text.split())
    return f"text ({words[:40] + ('...' if len(words) > 40 else '')!r})"


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def write_torch_state_dict(state: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write `{"model": state_dict}` as the official files are laid out, atomically."""
    import torch

    path = Path(path)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        _atomic(path, lambda tmp: save_file(tensors, tmp))
    else:
        _atomic(path, lambda tmp: torch.save({"model": tensors}, tmp))


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------------------------
# Conversion


def torch_to_params(state: dict[str, np.ndarray], config, source: str = "checkpoint"):
    """Official state dict -> (our params, manifest entries). Strict: any mismatch raises."""
    abstract = abstract_params(config)
    template = flatten_params(abstract)
    converted, manifest, unused, bad_shape = {}, [], [], []
    for key, value in state.items():
        try:
            path, transform = our_path(key)
        except KeyError:
            unused.append(key)
            continue
        if path not in template:
            unused.append(key)
            continue
        value = np.asarray(value)
        want = template[path].shape
        try:
            ours = TRANSFORMS[transform][0](value)
        except ValueError:
            ours = None
        if ours is None or ours.shape != want:
            bad_shape.append(f"{key} {tuple(value.shape)}")
            continue
        converted[path] = ours.astype(np.float32)
        manifest.append({"key": key, "path": path, "torch_shape": list(value.shape),
                         "shape": list(want), "transform": transform})
    name = config.name
    if bad_shape:
        raise CheckpointError(
            f"{source}: {len(bad_shape)} tensors have the wrong shape for config {name} "
            f"(another model size or image size?): {_short(bad_shape, 4)}"
        )
    missing = [torch_key(p)[0] for p in template if p not in converted]
    if missing or unused:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_short(missing)}")
        if unused:
            parts.append(f"{len(unused)} unused keys: {_short(unused)}")
        hint = ""
        v21_only = {"no_obj_embed_spatial", "obj_ptr_tpos_proj.weight", "obj_ptr_tpos_proj.bias"}
        if missing and set(missing) <= v21_only and config.version == "sam2.1":
            hint = " (a SAM 2 checkpoint with a SAM 2.1 config? use the sam2_* config)"
        elif unused and set(unused) <= v21_only and config.version == "sam2":
            hint = " (a SAM 2.1 checkpoint with a SAM 2 config? use the sam2.1_* config)"
        raise CheckpointError(f"{source} does not fit config {name}: {'; '.join(parts)}{hint}")
    params = unflatten_params(converted, abstract)
    return params, manifest


def params_to_torch(params) -> dict[str, np.ndarray]:
    """Our params -> an official state dict (numpy), loadable by `build_sam2` strictly."""
    out = {}
    for path, value in flatten_params(params).items():
        key, transform = torch_key(path)
        out[key] = np.ascontiguousarray(TRANSFORMS[transform][1](np.asarray(value)))
    return out


# ----------------------------------------------------------------------------------------------
# Our checkpoints: Orbax params + a JSON manifest


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_params(params, out_dir: str | os.PathLike, config, manifest: list | None = None,
                source: str | None = None, inference: dict | None = None) -> Path:
    """Save params with Orbax under OUT_DIR/params and a manifest beside them. `inference`: how
    the weights expect to be run (e.g. {"crop": 3.0}, the prompt window they were trained on);
    `segment`, `demo` and `evaluate` take it as their default."""
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / PARAMS_DIR
    if target.exists():
        raise CheckpointError(f"{target} already exists; choose an empty output folder")
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(target, params)
    ckptr.wait_until_finished()
    info = {
        "config": config.name,
        "version": config.version,
        "image_size": config.image_size,
        "source": source,
        "source_sha256": sha256(source) if source and Path(source).is_file() else None,
        "num_params": int(sum(np.prod(v.shape) for v in flatten_params(params).values())),
        "entries": manifest or [],
    }
    if inference:
        info["inference"] = dict(inference)
    text = json.dumps(info, indent=1)
    _atomic(out_dir / MANIFEST, lambda tmp: Path(tmp).write_text(text))
    return out_dir


def read_manifest(ckpt_dir: str | os.PathLike) -> dict:
    """A checkpoint folder's manifest.json ({} when it has none)."""
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as error:  # ValueError: not UTF-8, not JSON
        raise CheckpointError(f"{path}: not a readable manifest ({_one_line(error)}); "
                              "re-export the checkpoint") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: a manifest is a JSON object; re-export the checkpoint")
    if not isinstance(info.get("config") or "", str) or not isinstance(info.get("inference") or {}, dict):
        raise CheckpointError(f"{path}: its config {info.get('config')!r} is not a name or its inference "
                              f"{info.get('inference')!r} not an object; re-export the checkpoint")
    return info


def load_params(ckpt_dir: str | os.PathLike, config):
    """Restore params saved by `save_params`, checking they fit `config`."""
    import orbax.checkpoint as ocp

    ckpt_dir = Path(ckpt_dir).absolute()
    if not (ckpt_dir / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{ckpt_dir} is not a medsam2_jax checkpoint (no {PARAMS_DIR}/ folder)")
    info = read_manifest(ckpt_dir)
    if info.get("config") not in (None, config.name) and (
        info.get("image_size") != config.image_size or info.get("version") != config.version
    ):
        raise CheckpointError(f"{ckpt_dir} was converted for config {info['config']}, which does not fit {config.name}")
    abstract = abstract_params(config)
    try:
        return ocp.StandardCheckpointer().restore(ckpt_dir / PARAMS_DIR, abstract)
    except Exception as e:
        raise CheckpointError(f"{ckpt_dir} does not fit config {config.name}: {_one_line(e)}") from None

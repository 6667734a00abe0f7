"""`medsam2-jax` command line.

    medsam2-jax convert IN.pt OUT_DIR --config sam2.1_tiny        official checkpoint -> ours
    medsam2-jax convert OUT_DIR OUT.pt --config sam2.1_tiny --to-torch

User errors print one line on stderr and exit with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


def _config(name: str):
    from medsam2_jax.configs.model import get_config

    try:
        return get_config(name)
    except ValueError as e:
        raise UserError(str(e)) from None


def cmd_convert(args) -> int:
    from medsam2_jax.convert.checkpoint import (
        load_params,
        params_to_torch,
        read_state_dict,
        save_params,
        torch_to_params,
        write_torch_state_dict,
    )

    config = _config(args.config)
    src, dst = Path(args.input), Path(args.output)
    if args.to_torch:
        if dst.exists() and not args.overwrite:
            raise UserError(f"{dst} exists; pass --overwrite to replace it")
        params = load_params(src, config)
        write_torch_state_dict(params_to_torch(params), dst)
        print(f"wrote {dst} ({config.name}, loadable by the official build_sam2)")
        return 0
    if (dst / "params").exists():
        raise UserError(f"{dst} already holds a converted checkpoint; choose an empty folder")
    state = read_state_dict(src)
    params, manifest = torch_to_params(state, config, source=str(src))
    save_params(params, dst, config, manifest, source=str(src))
    print(f"converted {len(manifest)} tensors from {src} to {dst} ({config.name}); manifest: {dst / 'manifest.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsam2-jax", description="MedSAM-2 / SAM 2 in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "convert",
        help="convert an official SAM 2 / SAM 2.1 / MedSAM2 checkpoint to ours, or back",
        description="Convert an official PyTorch checkpoint (.pt or .safetensors) into an Orbax "
        "checkpoint folder with a manifest, or (--to-torch) such a folder back into a .pt file that "
        "the official build_sam2 loads strictly.",
    )
    p.add_argument("input", help="official .pt/.safetensors file, or our checkpoint folder with --to-torch")
    p.add_argument("output", help="output folder, or the .pt/.safetensors file to write with --to-torch")
    p.add_argument("--config", default="sam2.1_tiny",
                   help="model variant: sam2[.1]_{tiny,small,base_plus,large}, medsam2 (default: sam2.1_tiny)")
    p.add_argument("--to-torch", action="store_true", help="convert our checkpoint back to PyTorch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file (--to-torch)")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    from medsam2_jax.convert.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, CheckpointError) as e:
        print(f"medsam2-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())

"""`medsam2-jax train --config configs/train.py:VARIANT --workdir DIR [--config.FIELD=VALUE ...]`.

`main(argv)` parses and runs; `add_train_parser(subparsers)` registers the same arguments on a
parent CLI (its handler calls `run(args, overrides)`). Overrides use ml_collections paths
(`--config.num_steps=100`, `--config.data.manifest=m.jsonl`, `--config.freeze='("^image_encoder\\.",)'`);
values are Python literals, anything else is taken as a string. Pointing at an existing work
dir resumes it.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
import sys
from pathlib import Path

HELP = "train or fine-tune on a manifest of volumes (resumes when WORKDIR holds checkpoints)"


def load_config(spec: str):
    """'configs/train.py:test', 'train.py', or a bare variant name ('test') -> ConfigDict."""
    path, _, variant = spec.partition(":")
    if not path.endswith(".py"):
        from medsam2_jax.configs.train import get_config

        return get_config(spec)
    if not Path(path).is_file():
        raise SystemExit(f"--config: no such file {path}")
    module_spec = importlib.util.spec_from_file_location("_train_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config, overrides) -> None:
    """`--config.a.b=value` (or `--config.a.b value`) strings applied in order."""
    items = list(overrides)
    while items:
        item = items.pop(0)
        if not item.startswith("--config."):
            raise SystemExit(f"unknown argument {item!r}; overrides look like --config.num_steps=100")
        name, eq, value = item[len("--config."):].partition("=")
        if not eq:
            if not items:
                raise SystemExit(f"{item} needs a value")
            value = items.pop(0)
        *parents, leaf = name.split(".")
        node = config
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise SystemExit(f"--config.{name}: no such field")
        current, new = node[leaf], _literal(value)
        if isinstance(current, str) and not isinstance(new, str):
            new = value
        if isinstance(current, tuple) and isinstance(new, list):
            new = tuple(new)
        node[leaf] = new


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="test", help="configs/train.py:VARIANT (or a variant name)")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and tensorboard/ go here")
    parser.add_argument("--init_checkpoint", default="",
                        help="converted SAM 2 weights (`medsam2-jax convert` output) to fine-tune from")


def add_train_parser(subparsers):
    parser = subparsers.add_parser("train", help=HELP, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return parser


def run(args, overrides) -> int:
    from medsam2_jax.training.loop import train

    config = load_config(args.config)
    apply_overrides(config, overrides)
    if config.model_config.image_size != config.data.image_size:
        raise SystemExit(f"data.image_size {config.data.image_size} differs from the model's "
                         f"{config.model_config.image_size}")
    from medsam2_jax.convert.checkpoint import CheckpointError
    from medsam2_jax.training.data import DataError

    try:
        state = train(config, args.workdir, init_checkpoint=args.init_checkpoint)
    except (DataError, CheckpointError) as error:  # a user's data or weights problem: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    logging.getLogger(__name__).info("done at step %d; checkpoints in %s/checkpoints", int(state.step), args.workdir)
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="medsam2-jax train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args, overrides = parser.parse_known_args(argv)
    return run(args, overrides)


if __name__ == "__main__":
    raise SystemExit(main())

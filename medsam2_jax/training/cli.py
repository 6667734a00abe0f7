"""`medsam2-jax train --config VARIANT --workdir DIR --config.data.manifest=FILE.jsonl [--config.FIELD=VALUE ...]`.

--config names a variant of the packaged training configs (`configs/train.py`, installed as
`medsam2_jax.configs.train`): `demo`, `medsam2_jax.configs.train:demo` (any module with a
`get_config`), or a file, `configs/train.py:demo`. `main(argv)` parses and runs;
`add_train_parser(subparsers)` registers the same arguments on a parent CLI (its handler calls
`run(args, overrides)`). Overrides use ml_collections paths (`--config.num_steps=100`,
`--config.data.manifest=m.jsonl`, `--config.freeze='("^image_encoder\\.",)'`); values are Python
literals, anything else is taken as a string. Pointing at an existing work dir resumes it. A
config or data problem is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
import sys
from pathlib import Path

HELP = "train or fine-tune on a manifest of volumes (resumes when WORKDIR holds checkpoints)"
PACKAGED = "medsam2_jax.configs.train"  # configs/train.py, installed with the package


class ConfigError(ValueError):
    """A --config spec, override or config value that cannot train: one line, exit status 2."""


def load_config(spec: str):
    """'demo' (a packaged variant), 'medsam2_jax.configs.train:demo' (a module's get_config) or
    'configs/train.py:demo' (a file's; 'train.py' alone for its default) -> ConfigDict."""
    source, colon, variant = spec.partition(":")
    if source.endswith(".py"):
        if not Path(source).is_file():
            raise ConfigError(f"--config: no such file {source}; the packaged configs need no path: "
                              f"--config {variant or 'VARIANT'} (or {PACKAGED}:{variant or 'VARIANT'})")
        module_spec = importlib.util.spec_from_file_location("_train_config", source)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    elif colon:
        try:
            module = importlib.import_module(source)
        except ModuleNotFoundError:
            raise ConfigError(f"--config: no module {source}; the packaged configs are {PACKAGED}:VARIANT") from None
    else:
        module, variant = importlib.import_module(PACKAGED), spec
    try:
        return module.get_config(variant) if variant else module.get_config()
    except ValueError as error:  # an unknown variant: the config file lists the known ones
        raise ConfigError(f"--config {spec}: {error}") from None


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
            raise ConfigError(f"unknown argument {item!r}; overrides look like --config.num_steps=100")
        name, eq, value = item[len("--config."):].partition("=")
        if not eq:
            if not items:
                raise ConfigError(f"{item} needs a value")
            value = items.pop(0)
        *parents, leaf = name.split(".")
        node = config
        for part in parents:
            if part not in node:
                raise ConfigError(f"--config.{name}: no such field")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"--config.{name}: no such field")
        current, new = node[leaf], _literal(value)
        if isinstance(current, str) and not isinstance(new, str):
            new = value
        if isinstance(current, tuple) and isinstance(new, list):
            new = tuple(new)
        node[leaf] = new


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="test",
                        help="a variant of the packaged training configs (demo, sam2.1_tiny, ...), "
                        "MODULE:VARIANT or FILE.py:VARIANT")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and tensorboard/ go here")
    parser.add_argument("--init_checkpoint", default="",
                        help="converted SAM 2 weights (`medsam2-jax convert` output) to fine-tune from")


def add_train_parser(subparsers):
    parser = subparsers.add_parser("train", help=HELP, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return parser


def check_config(config) -> None:
    """What would otherwise fail only after the model is built (or deep inside the data pipeline)."""
    if config.model_config.image_size != config.data.image_size:
        raise ConfigError(f"data.image_size {config.data.image_size} differs from the model's "
                          f"{config.model_config.image_size}")
    if not config.data.manifest:
        raise ConfigError("no training data: give --config.data.manifest=FILE.jsonl "
                          "(or set data.manifest in the config)")
    for field in ("manifest", "val_manifest"):
        path = config.data[field]
        if path and not Path(path).is_file():
            raise ConfigError(f"--config.data.{field}: no such file {path}")


def run(args, overrides) -> int:
    try:
        config = load_config(args.config)
        apply_overrides(config, overrides)
        check_config(config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from medsam2_jax.convert.checkpoint import CheckpointError
    from medsam2_jax.training.data import DataError
    from medsam2_jax.training.loop import train

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

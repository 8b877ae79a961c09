"""`dit-jax` command line: train and sample. Thin: parses, then calls the library.

User errors (bad config, missing files, damaged checkpoints, bad data) end with one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import logging
import os
import sys


def load_config_file(spec: str):
    """`path/to/config.py[:arg]` -> the ConfigDict returned by its get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found; pass --config=configs/<name>.py[:arg]")
    module_spec = importlib.util.spec_from_file_location(f"dit_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise FileNotFoundError(f"config file {path!r} has no get_config(arg) function")
    return module.get_config(arg) if arg else module.get_config()


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as --config.data.source=digits


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    from dit_jax.config import ConfigError

    out = dict(base)
    for key, value in update.items():
        if key not in base:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; known keys here: {', '.join(sorted(base))}"
            )
        out[key] = _merge(base[key], value, f"{prefix}{key}.") if isinstance(base[key], dict) else value
    return out


def apply_overrides(config_dict, overrides: list[str]) -> dict:
    """The config file's values over the dataclass defaults, then `--config.a.b=value` overrides.

    Returns a plain nested dict with every key, ready for `config.from_dict`."""
    from dit_jax import config as config_lib

    values = config_dict.to_dict() if hasattr(config_dict, "to_dict") else dict(config_dict)
    merged = _merge(config_lib.to_dict(config_lib.Config()), values)
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise config_lib.ConfigError(
                f"unrecognised argument {item!r}; overrides look like --config.model.depth=4"
            )
        key, _, text = item[len("--config.") :].partition("=")
        *parents, leaf = key.split(".")
        update = {leaf: parse_value(text)}
        for part in reversed(parents):
            update = {part: update}
        merged = _merge(merged, update)
    return merged


def cmd_train(args, overrides: list[str]) -> None:
    from dit_jax import config as config_lib
    from dit_jax.train import loop

    cfg = config_lib.from_dict(apply_overrides(load_config_file(args.config), overrides))
    loop.train(cfg, args.workdir)


def cmd_sample(args, overrides: list[str]) -> None:
    from dit_jax import grids, sampling
    from dit_jax.config import ConfigError
    from dit_jax.parallel import mesh as mesh_lib
    from dit_jax.train import loop

    if overrides:
        raise ConfigError(f"unrecognised arguments: {' '.join(overrides)}; see `dit-jax sample --help`")
    cfg = loop.load_config(args.workdir)
    sampler = sampling.with_overrides(
        cfg.sampler, kind=args.sampler, num_steps=args.num_steps, cfg_scale=args.cfg_scale
    )
    mesh = mesh_lib.make_mesh(cfg.mesh)
    trainer = loop.Trainer(cfg, args.workdir, mesh)
    step, state, _ = trainer.checkpointer.restore(trainer.abstract_state())
    labels = sampling.balanced_labels(args.num_samples, cfg.model.num_classes)
    images = sampling.generate(
        cfg,
        trainer.spec,
        state.ema,
        labels,
        mesh=mesh,
        seed=args.seed,
        batch_size=args.batch_size,
        sampler=sampler,
    )
    trainer.checkpointer.close()
    sampling.save_npz(args.output, images, labels)
    if args.grid:
        grids.save_grid_png(args.grid, images, labels, cfg.model.num_classes, cfg.grid_samples_per_class)
    print(
        f"wrote {len(images)} samples from step {step} to {args.output}"
        + (f" and a grid to {args.grid}" if args.grid else "")
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    multi = argparse.ArgumentParser(add_help=False)
    multi.add_argument("--coordinator", help="host:port of process 0 for multi-process runs, or 'auto'")
    multi.add_argument("--num_processes", type=int)
    multi.add_argument("--process_id", type=int)
    train = sub.add_parser("train", parents=[multi], help="train or resume a model")
    train.add_argument("--config", required=True, help="configs/<name>.py[:arg]")
    train.add_argument("--workdir", required=True)
    sample = sub.add_parser(
        "sample", parents=[multi], help="sample from the EMA weights of the latest checkpoint"
    )
    sample.add_argument("--workdir", required=True)
    sample.add_argument("--num_samples", type=int, required=True)
    sample.add_argument("--output", required=True, help="FILE.npz (ADM convention)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--cfg_scale", type=float)
    sample.add_argument("--num_steps", type=int)
    sample.add_argument("--sampler", choices=["euler", "heun", "ddpm", "ddim"])
    sample.add_argument("--batch_size", type=int, default=256)
    sample.add_argument("--grid", help="also write a labelled PNG grid here")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dit_jax").setLevel(logging.INFO)
    args, overrides = build_parser().parse_known_args(argv)
    if args.coordinator not in (None, "auto") and (args.num_processes is None or args.process_id is None):
        print(
            f"dit-jax {args.command}: error: --coordinator needs --num_processes and --process_id",
            file=sys.stderr,
        )
        return 2
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    from dit_jax.config import ConfigError
    from dit_jax.data import DataError
    from dit_jax.train.checkpoint import CheckpointError
    from dit_jax.train.loop import NonFiniteLoss

    user_errors = (ConfigError, DataError, CheckpointError, NonFiniteLoss, FileNotFoundError)
    from dit_jax.parallel import distributed

    try:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        {"train": cmd_train, "sample": cmd_sample}[args.command](args, overrides)
    except user_errors as e:
        print(f"dit-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dit-jax {args.command}: interrupted; the last completed checkpoint is kept", file=sys.stderr)
        return 130
    return 0

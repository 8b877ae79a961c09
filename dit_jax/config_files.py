"""Config files and command-line overrides -> a validated `config.Config`.

`--config=configs/quickstart.py[:arg]` names a file; `--config=quickstart[:arg]` a config shipped
inside the package (dit_jax/configs/), so a pip-installed dit_jax finds its configs from any
directory. Overrides look like `--config.model.depth=4` and are laid over the file's values, which
are laid over the dataclass defaults; `config.from_dict` validates the result once.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Sequence

from dit_jax import config as config_lib

PACKAGED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def packaged() -> list[str]:
    """Names of the configs shipped inside the package."""
    return sorted(n[:-3] for n in os.listdir(PACKAGED_DIR) if n.endswith(".py") and not n.startswith("_"))


def resolve(name: str) -> str:
    """The file a --config value names: a path to a .py file, or the name of a packaged config."""
    if name.endswith(".py") or os.sep in name or "/" in name:
        if os.path.isfile(name):
            return name
        base = os.path.splitext(os.path.basename(name))[0]
        hint = f"; the packaged config is --config={base}" if base in packaged() else ""
        raise FileNotFoundError(
            f"config file {name!r} not found{hint}; pass --config=<path>.py[:arg] or one of the packaged "
            f"configs: {', '.join(packaged())}"
        )
    path = os.path.join(PACKAGED_DIR, f"{name}.py")
    if name.startswith("_") or not os.path.isfile(path):
        raise FileNotFoundError(
            f"no packaged config named {name!r}; choose one of {', '.join(packaged())} or pass a file "
            "path ending in .py"
        )
    return path


def load_config_file(spec: str):
    """`path/to/config.py[:arg]` or `name[:arg]` -> the ConfigDict returned by its get_config(arg)."""
    name, _, arg = spec.partition(":")
    path = resolve(name)
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
    out = dict(base)
    for key, value in update.items():
        if key not in base:
            raise config_lib.ConfigError(
                f"unknown config key '{prefix}{key}'; known keys here: {', '.join(sorted(base))}"
            )
        out[key] = _merge(base[key], value, f"{prefix}{key}.") if isinstance(base[key], dict) else value
    return out


def apply_overrides(config_dict, overrides: Sequence[str]) -> dict:
    """The config file's values over the dataclass defaults, then `--config.a.b=value` overrides.

    Returns a plain nested dict with every key, ready for `config.from_dict`."""
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


def load(spec: str, overrides: Sequence[str] = ()) -> config_lib.Config:
    """The validated config of `--config=spec` with `--config.*` overrides."""
    return config_lib.from_dict(apply_overrides(load_config_file(spec), overrides))

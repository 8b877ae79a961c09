"""Test set-up: 8 fake CPU devices, so sharding is exercised on any machine."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """One prepared-datasets directory for the whole session (digits prepare in < 1 s)."""
    return str(tmp_path_factory.mktemp("datasets"))


@pytest.fixture
def tiny_config(data_dir):
    """A seconds-long digits config (configs/quickstart.py:smoke) with dataclass overrides:
    tiny_config(total_steps=8, model=dict(depth=1))."""
    from dit_jax import config as config_lib
    from dit_jax.cli import load_config_file

    def make(**overrides):
        cfg = config_lib.from_dict(load_config_file("configs/quickstart.py:smoke"))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
        for key, value in overrides.items():
            if isinstance(value, dict):
                value = dataclasses.replace(getattr(cfg, key), **value)
            cfg = dataclasses.replace(cfg, **{key: value})
        return cfg

    return make

"""Config conversion and validation: every error names its key."""

import re

import ml_collections
import pytest

from dit_jax import config as config_lib
from dit_jax.config_files import apply_overrides, load_config_file


def test_quickstart_and_dit_configs_build():
    cfg = config_lib.from_dict(load_config_file("configs/quickstart.py"))
    assert cfg.data.source == "digits" and cfg.model.image_size == 8
    for variant in ("S/2", "B/4", "L/8", "XL/2"):
        cfg = config_lib.from_dict(load_config_file(f"configs/dit.py:variant={variant}"))
        assert cfg.model.patch_size == int(variant.split("/")[1])
    assert config_lib.from_dict(load_config_file("configs/dit.py:variant=XL/2")).model.depth == 28


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["--config.model.patch_size=3"], "model.patch_size"),
        (["--config.model.num_heads=5"], "model.num_heads"),
        (["--config.model.dtype='float8'"], "model.dtype"),
        (["--config.objective.kind='score'"], "objective.kind"),
        (["--config.sampler.kind='ddpm'"], "sampler.kind"),
        (["--config.data.channels=3"], "data.channels"),
        (["--config.mesh.data=0"], "mesh.data"),
        (["--config.attention.impl='magic'"], "attention.impl"),
        (["--config.batch_size='big'"], "batch_size"),
        (["--config.model.nope=1"], "model.nope"),
    ],
)
def test_errors_name_the_key(overrides, key):
    with pytest.raises(config_lib.ConfigError, match=f"'{key}'"):
        config_lib.from_dict(apply_overrides(load_config_file("configs/quickstart.py"), overrides))


def test_unknown_variant_and_missing_file():
    with pytest.raises(config_lib.ConfigError, match="unknown variant 'XXL/2'"):
        load_config_file("configs/dit.py:variant=XXL/2")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config_file("configs/nope.py")


def test_unknown_key_in_dict_and_type_coercion():
    c = ml_collections.ConfigDict({"optim": {"lr": 1}, "total_steps": 5})
    cfg = config_lib.from_dict(c)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'optim.lrr'"):
        config_lib.from_dict({"optim": {"lrr": 1.0}})


def test_round_trip_through_dict():
    cfg = config_lib.from_dict(load_config_file("configs/dit.py:variant=B/2"))
    assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg


def test_packaged_configs_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    from dit_jax import config_files

    assert {"quickstart", "dit", "sit", "repa", "lightningdit"} <= set(config_files.packaged())
    by_path = config_files.load("configs/quickstart.py:smoke", ["--config.total_steps=3"])
    monkeypatch.chdir(tmp_path)  # no configs/ here: only the package's copy can answer
    assert config_files.load("quickstart:smoke", ["--config.total_steps=3"]) == by_path
    assert config_files.load("dit:variant=XL/2").model.depth == 28
    with pytest.raises(FileNotFoundError, match="the packaged config is --config=quickstart"):
        config_files.load_config_file("configs/quickstart.py")
    with pytest.raises(FileNotFoundError, match="no packaged config named 'nope'; choose one of"):
        config_files.load_config_file("nope")


def test_retired_key_in_an_old_config_json_loads_and_resumes(tmp_path):
    import json

    from dit_jax.train.loop import check_resume
    from dit_jax.workdir import load_config

    cfg = config_lib.from_dict(load_config_file("configs/dit.py:variant=B/2"))
    assert "stop_on_nonfinite" not in config_lib.to_dict(cfg)
    old = {**config_lib.to_dict(cfg), "stop_on_nonfinite": False}  # config.json of an older version
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert config_lib.from_dict(old) == cfg
    assert load_config(str(tmp_path)) == cfg
    check_resume(cfg, str(tmp_path), 1000)  # not a change that stops a resume
    # Only a stored config drops it: a config file or an override naming it is told the key is unknown.
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'stop_on_nonfinite'"):
        apply_overrides({}, ["--config.stop_on_nonfinite=False"])
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'model.stop_on_nonfinite'"):
        config_lib.from_dict({"model": {"stop_on_nonfinite": True}})


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        (["--config.mesh.context=3"], "mesh.context", "16 patch tokens do not split into 3 equal parts"),
        (
            ["--config.mesh.context=8", "--config.attention.context_impl=all_to_all"],
            "attention.context_impl",
            "all_to_all needs model.num_heads (4) divisible by mesh.context (8)",
        ),
        (["--config.attention.context_impl=ulysses"], "attention.context_impl", "ulysses"),
    ],
)
def test_context_parallel_config_errors_name_the_key(overrides, key, message):
    with pytest.raises(config_lib.ConfigError, match=f"'{key}'.*{re.escape(message)}"):
        config_lib.from_dict(apply_overrides(load_config_file("configs/quickstart.py"), overrides))

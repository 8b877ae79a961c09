"""Mesh axes, DCN groups, sharding presets against golden files, and the "sufficiently sharded" check.

Golden files: tests/golden/sharding_<model>.json hold the PartitionSpec of every parameter of DiT-XL/2
and of the quickstart model under every preset on GOLDEN_MESH (axis sizes only: specs need no
devices). After an intended change to the presets or the models' parameters, regenerate them with

    DIT_JAX_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_mesh.py -k golden

and review the diff (`git diff tests/golden/`) like code.
"""

import dataclasses
import json
import logging
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dit_jax import config as config_lib
from dit_jax.config_files import load
from dit_jax.models.build import apply_model, build_model, model_spec
from dit_jax.parallel import mesh as mesh_lib
from dit_jax.parallel import rules

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
GOLDEN_MESH = {"data": 2, "fsdp": 2, "expert": 2, "context": 2, "tensor": 2}
GOLDEN_MODELS = {"dit_xl_2": "configs/dit.py:variant=XL/2", "quickstart": "configs/quickstart.py"}
SHARDING_PRESETS = [name for name in rules.PRESETS if name != "ddp"]
Mesh = config_lib.Mesh


@pytest.fixture(scope="module")
def xl_spec():
    return model_spec(load(GOLDEN_MODELS["dit_xl_2"]))


def _flat(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, list))[0]
    return {rules._path(keys): leaf for keys, leaf in leaves}


def _golden_table(spec) -> dict:
    shapes = _flat(jax.tree.map(lambda x: list(x.shape), spec.abstract_params))
    table = {path: {"shape": shape} for path, shape in shapes.items()}
    for name in rules.PRESETS:
        specs = mesh_lib.param_specs(spec.logical_axes, spec.abstract_params, GOLDEN_MESH, name)
        for path, described in _flat(rules.describe(specs)).items():
            table[path][name] = described
    return table


def _dump(model: str, table: dict) -> str:
    lines = [f"  {json.dumps(path)}: {json.dumps(entry)}" for path, entry in sorted(table.items())]
    head = json.dumps({"config": GOLDEN_MODELS[model], "mesh": GOLDEN_MESH})[:-1]
    return head + ', "params": {\n' + ",\n".join(lines) + "\n}}\n"


@pytest.mark.parametrize("model", sorted(GOLDEN_MODELS))
def test_param_shardings_match_golden_files(model, xl_spec):
    """Every parameter's PartitionSpec under every preset equals the reviewed golden file."""
    spec = xl_spec if model == "dit_xl_2" else model_spec(load(GOLDEN_MODELS[model]))
    table = _golden_table(spec)
    path = GOLDEN_DIR / f"sharding_{model}.json"
    if os.environ.get("DIT_JAX_REGEN_GOLDEN"):
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_text(_dump(model, table))
    golden = json.loads(path.read_text())
    assert golden["mesh"] == GOLDEN_MESH and golden["config"] == GOLDEN_MODELS[model]
    assert sorted(golden["params"]) == sorted(table), (
        "parameters added or removed: regenerate (see docstring)"
    )
    wrong = [
        f"{p}: {golden['params'][p]} != {table[p]}" for p in sorted(table) if golden["params"][p] != table[p]
    ]
    assert not wrong, f"{len(wrong)} shardings differ from {path.name}:\n" + "\n".join(wrong[:20])
    assert set(golden["params"][next(iter(table))]) == {"shape", *rules.PRESETS}


def test_golden_xl_shards_what_each_preset_promises():
    """Spot checks of the golden file itself, so a wrong regeneration does not go unnoticed."""
    params = json.loads((GOLDEN_DIR / "sharding_dit_xl_2.json").read_text())["params"]
    qkv = params["block_stack/0/attn/w_qkv"]  # [layers, embed, 3, heads, head_dim]: scanned blocks
    assert qkv["shape"] == [28, 1152, 3, 16, 72]
    assert qkv["ddp"] == [None] * 5
    assert qkv["fsdp"] == [None, "fsdp", None, None, None]
    assert qkv["fsdp_tp"] == [None, "fsdp", None, "tensor", None]
    assert qkv["fsdp_tp_cp"] == [None, ["fsdp", "context"], None, "tensor", None]
    assert qkv["fsdp_tp_cp_ep"] == [None, ["fsdp", "context", "expert"], None, "tensor", None]
    fc2 = params["block_stack/0/mlp/fc2/kernel"]  # [layers, mlp, embed]
    assert fc2["fsdp_tp_ep"] == [None, "tensor", ["fsdp", "expert"]]
    assert all(name == "shape" or all(d is None for d in v) for name, v in params["final/proj/bias"].items())


def test_real_mesh_shardings_equal_the_device_free_specs(xl_spec):
    """param_shardings on 8 devices gives the specs param_specs computes from the axis sizes alone."""
    mesh = mesh_lib.make_mesh(Mesh(data=1, fsdp=2, context=2, tensor=2, rules="fsdp_tp_cp"))
    shardings = mesh_lib.param_shardings(xl_spec.logical_axes, xl_spec.abstract_params, mesh, "fsdp_tp_cp")
    specs = mesh_lib.param_specs(
        xl_spec.logical_axes, xl_spec.abstract_params, dict(mesh.shape), "fsdp_tp_cp"
    )
    assert jax.tree.leaves(jax.tree.map(lambda s: s.spec, shardings)) == jax.tree.leaves(
        specs, is_leaf=lambda s: isinstance(s, P)
    )
    kernel = shardings["block_stack"][0]["mlp"]["fc1"]["kernel"]
    assert kernel.spec == P(None, ("fsdp", "context"), "tensor")
    assert kernel.shard_shape((28, 1152, 4608)) == (28, 288, 2304)


@pytest.mark.parametrize("preset", SHARDING_PRESETS)
def test_every_sharding_preset_is_sufficient_for_xl(preset, xl_spec):
    for shape in (GOLDEN_MESH, {"data": 1, "fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}):
        specs = mesh_lib.param_specs(xl_spec.logical_axes, xl_spec.abstract_params, shape, preset)
        rules.check_sufficiently_sharded(specs, xl_spec.abstract_params, preset, shape)


def test_sufficiency_check_names_every_large_replicated_parameter(xl_spec, monkeypatch):
    # A preset with a misspelt logical axis shards nothing.
    monkeypatch.setitem(rules.PRESETS, "broken", {"embedding": ("fsdp",), "mlp": ("tensor",)})
    specs = mesh_lib.param_specs(xl_spec.logical_axes, xl_spec.abstract_params, GOLDEN_MESH, "broken")
    large = [
        p
        for p, x in _flat(xl_spec.abstract_params).items()
        if x.size * x.dtype.itemsize >= rules.MIN_SHARDED_BYTES
    ]
    with pytest.raises(rules.ShardingError) as e:
        rules.check_sufficiently_sharded(specs, xl_spec.abstract_params, "broken", GOLDEN_MESH)
    message = str(e.value)
    assert message.startswith("config key 'mesh.rules': preset 'broken'") and "\n" not in message
    # mlp kernels are split over tensor, so only the others are named: every one of them.
    replicated = [p for p in large if "/mlp/" not in p]
    assert len(replicated) >= 7 and f"leaves {len(replicated)} parameter(s)" in message
    for p in large:
        assert (f"{p} [" in message) == (p in replicated), p
    assert "block_stack/0/adaln/kernel [28, 1152, 6912] (850.5 MiB)" in message
    # The same preset on a mesh where its axes have one device each cannot shard: nothing to report.
    rules.check_sufficiently_sharded(specs, xl_spec.abstract_params, "broken", {"data": 8})


def test_sufficiency_check_catches_a_mesh_that_divides_nothing(xl_spec, caplog, monkeypatch):
    shape = {"data": 1, "fsdp": 5}  # 1152 % 5 != 0: every weight stays whole
    specs = mesh_lib.param_specs(xl_spec.logical_axes, xl_spec.abstract_params, shape, "fsdp")
    with pytest.raises(rules.ShardingError, match=r"preset 'fsdp' on mesh data=1 x fsdp=5 .*w_qkv"):
        rules.check_sufficiently_sharded(specs, xl_spec.abstract_params, "fsdp", shape)
    rules.check_sufficiently_sharded(specs, xl_spec.abstract_params, "ddp", shape)  # replication by design
    # param_shardings reports the same as a warning (it does not stop a run).
    mesh = mesh_lib.make_mesh(Mesh(data=1, fsdp=8))
    monkeypatch.setitem(rules.PRESETS, "typo", {"embd": ("fsdp",)})
    with caplog.at_level(logging.WARNING):
        mesh_lib.param_shardings(xl_spec.logical_axes, xl_spec.abstract_params, mesh, "typo")
    assert "preset 'typo'" in caplog.text and "block_stack/0/attn/w_out" in caplog.text


def test_sufficiency_threshold_is_one_mebibyte():
    shapes = {
        "big": jax.ShapeDtypeStruct((512, 512), jnp.float32),
        "small": jax.ShapeDtypeStruct((511, 512), jnp.float32),
    }
    specs = {"big": P(None, None), "small": P()}
    assert [p for p, _, _ in rules.replicated_params(specs, shapes)] == ["big"]
    specs["big"] = P("fsdp", None)
    assert rules.replicated_params(specs, shapes) == []


def test_mesh_axes_and_defaults():
    mesh = mesh_lib.make_mesh(Mesh())
    assert mesh.axis_names == rules.MESH_AXES == ("data", "fsdp", "expert", "context", "tensor")
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1}
    assert config_lib.MESH_RULES == tuple(rules.PRESETS)
    mesh = mesh_lib.make_mesh(Mesh(data=-1, expert=2, context=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 2, "context": 2, "tensor": 1}
    # The batch splits over data × fsdp × expert, not context.
    assert mesh_lib.data_parallel_size(mesh) == 4
    assert mesh_lib.batch_sharding(mesh).spec == P(("data", "fsdp", "expert"))
    mesh_lib.check_batch(4, mesh)
    with pytest.raises(config_lib.ConfigError, match=r"'batch_size': 6 .* data-parallel size 4"):
        mesh_lib.check_batch(6, mesh)


def test_activation_rules_split_sequence_over_context():
    mesh = mesh_lib.make_mesh(Mesh(data=1, fsdp=2, context=2, tensor=2))
    f = jax.jit(lambda x: rules.constrain(x, ("act_batch", "act_seq", "act_heads")))
    with jax.set_mesh(mesh):
        y = f(jnp.zeros((4, 16, 8)))
    assert y.sharding.spec == P("fsdp", "context", "tensor")
    assert rules.ACTIVATION_RULES["act_batch"] == rules.DATA_AXES


def test_dcn_data_is_the_outer_factor_of_data_on_one_process():
    devices = jax.devices()
    mesh = mesh_lib.make_mesh(Mesh(data=1, fsdp=2, tensor=2, dcn_data=2), devices)
    assert dict(mesh.shape)["data"] == 2 and mesh_lib.data_parallel_size(mesh) == 4
    first, second = mesh.devices[0].ravel().tolist(), mesh.devices[1].ravel().tolist()
    assert set(first) == set(devices[:4]) and set(second) == set(devices[4:])
    mesh = mesh_lib.make_mesh(Mesh(data=-1, dcn_data=2, fsdp=2), devices)
    assert dict(mesh.shape)["data"] == 4


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    slice_index: int | None = None
    platform: str = "cpu"
    device_kind: str = "cpu"


def _fake(num_processes: int, per_process: int, slices: bool = False) -> list:
    devices = [
        FakeDevice(p * per_process + i, p, p if slices else None)
        for p in range(num_processes)
        for i in range(per_process)
    ]
    return devices[::-1]  # any input order: groups follow process / slice index


def test_dcn_groups_are_processes():
    devices = _fake(4, 2)
    grid = mesh_lib.device_grid(Mesh(data=-1, fsdp=2, dcn_data=2), devices)
    assert grid.shape == (4, 2, 1, 1, 1)
    # Outer half of data: processes 0 and 1; inner index and fsdp stay within a group.
    assert {d.process_index for d in grid[:2].ravel()} == {0, 1}
    assert {d.process_index for d in grid[2:].ravel()} == {2, 3}
    assert mesh_lib.device_grid(Mesh(data=-1, fsdp=2), devices).shape == (4, 2, 1, 1, 1)  # dcn_data=1
    with pytest.raises(
        config_lib.ConfigError, match=r"^config key 'mesh.dcn_data': 3 does not divide the 4 processes"
    ):
        mesh_lib.device_grid(Mesh(data=-1, dcn_data=3), _fake(4, 3))


def test_dcn_groups_are_tpu_slices():
    devices = _fake(2, 4, slices=True)
    grid = mesh_lib.device_grid(Mesh(data=1, fsdp=-1, dcn_data=2), devices)
    assert grid.shape == (2, 4, 1, 1, 1)
    assert [{d.slice_index for d in grid[i].ravel()} for i in range(2)] == [{0}, {1}]
    with pytest.raises(
        config_lib.ConfigError, match=r"'mesh.dcn_data': the devices form 2 TPU slices; set mesh.dcn_data=2"
    ):
        mesh_lib.device_grid(Mesh(data=-1), devices)


@pytest.mark.parametrize(
    "mesh, key, match",
    [
        (
            dict(context=3),
            "mesh.data",
            "the fixed mesh axes (3 devices, dcn_data included) do not divide the 8",
        ),
        (
            dict(data=2, expert=2),
            "mesh",
            "expert=2 × context=1 × tensor=1 needs 4 devices but 8 are available",
        ),
        (dict(data=2, fsdp=2, dcn_data=4), "mesh", "dcn_data=4 × data=2 × fsdp=2"),
        (dict(data=-1, dcn_data=16), "mesh.data", "(16 devices, dcn_data included)"),
    ],
)
def test_mesh_that_does_not_fit_the_devices(mesh, key, match):
    with pytest.raises(config_lib.ConfigError, match=f"^config key '{key}': .*{re.escape(match)}") as e:
        mesh_lib.make_mesh(Mesh(**mesh))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["--config.mesh.context=0"], "mesh.context"),
        (["--config.mesh.expert=-2"], "mesh.expert"),
        (["--config.mesh.fsdp=-1"], "mesh.fsdp"),  # data is -1 by default: two -1 axes
        (["--config.mesh.data=2", "--config.mesh.expert=-1", "--config.mesh.context=-1"], "mesh.context"),
        (["--config.mesh.dcn_data=0"], "mesh.dcn_data"),
        (["--config.mesh.dcn_data=-1"], "mesh.dcn_data"),
        (["--config.mesh.rules='tp'"], "mesh.rules"),
    ],
)
def test_bad_mesh_config_names_the_key(overrides, key):
    with pytest.raises(config_lib.ConfigError, match=f"^config key '{key}'"):
        load("configs/quickstart.py", overrides)


def test_config_json_without_the_new_axes_still_loads_and_resumes():
    old = config_lib.to_dict(load("configs/quickstart.py", ["--config.mesh.data=2", "--config.mesh.fsdp=4"]))
    for key in ("context", "expert", "dcn_data"):
        del old["mesh"][key]
    cfg = config_lib.from_dict(old)
    assert (cfg.mesh.context, cfg.mesh.expert, cfg.mesh.dcn_data, cfg.mesh.fsdp) == (1, 1, 1, 4)
    new = config_lib.to_dict(dataclasses.replace(cfg, mesh=Mesh(data=1, fsdp=2, context=4)))
    changed = config_lib.diff(old, new)
    assert {k for k, _, _ in changed} == {
        "mesh.data",
        "mesh.fsdp",
        "mesh.context",
        "mesh.expert",
        "mesh.dcn_data",
    }
    assert all(config_lib.is_resumable(k) for k, _, _ in changed)


@pytest.mark.parametrize(
    "mesh",
    [
        Mesh(data=1, fsdp=2, context=2, dcn_data=2, rules="fsdp_tp_cp"),
        Mesh(data=1, expert=2, context=2, tensor=2, rules="fsdp_tp_cp_ep"),
    ],
    ids=["dcn_fsdp_cp", "ep_cp_tp"],
)
def test_model_on_new_axes_equals_one_device(tiny_config, mesh):
    """The quickstart-smoke DiT gives the same output sharded over the new axes as on one device."""
    cfg = tiny_config(mesh=mesh)
    spec = model_spec(cfg)
    params = nnx.split(build_model(cfg))[1].to_pure_dict()
    rng = np.random.default_rng(0)
    m = cfg.model
    x = jnp.asarray(rng.standard_normal((8, m.image_size, m.image_size, m.in_channels)), jnp.float32)
    t = jnp.asarray(rng.uniform(0, 999, (8,)), jnp.float32)
    y = jnp.asarray(rng.integers(0, m.num_classes, (8,)), jnp.int32)
    f = jax.jit(lambda p, x, t, y: apply_model(spec.graphdef, p, x, t, y))
    expected = f(params, x, t, y)
    device_mesh = mesh_lib.make_mesh(cfg.mesh)
    shardings = mesh_lib.param_shardings(spec.logical_axes, spec.abstract_params, device_mesh, cfg.mesh.rules)
    batch = mesh_lib.batch_sharding(device_mesh)
    with jax.set_mesh(device_mesh):
        sharded = f(jax.device_put(params, shardings), *jax.device_put((x, t, y), batch))
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(expected), rtol=1e-5, atol=1e-5)

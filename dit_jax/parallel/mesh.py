"""Device mesh from config, and shardings for parameters and batches.

The mesh axes are MESH_AXES = (data, fsdp, expert, context, tensor). `mesh.dcn_data` > 1 makes the
`data` axis span the slow network (DCN) as MaxText's hybrid meshes do: the devices are split into
`dcn_data` groups, each group gets its own (data, fsdp, expert, context, tensor) mesh over its fast
links (ICI, NVLink), and the groups are stacked as the outer factor of `data` (its size is then
mesh.dcn_data × mesh.data). The groups are, in order of preference:

- TPU slices (devices with several `slice_index` values): one group per slice, so dcn_data must equal
  the number of slices (`jax.experimental.mesh_utils.create_hybrid_device_mesh`);
- processes (several `process_index` values, e.g. one per GPU node): dcn_data must divide the number
  of processes, and each group holds process_count / dcn_data consecutive processes;
- otherwise (one process, e.g. fake CPU devices): consecutive runs of devices, so dcn_data is just an
  outer factor of the data axis.

Only gradients (one all-reduce per step) cross the DCN; everything else stays within a group.
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax import config as config_lib
from dit_jax.parallel.rules import (
    DATA_AXES,
    MESH_AXES,
    PRESETS,
    ShardingError,
    check_sufficiently_sharded,
    spec_for,
)

log = logging.getLogger(__name__)


def _ici_sizes(cfg: config_lib.Mesh) -> list[int]:
    return [getattr(cfg, a) for a in MESH_AXES]


def mesh_shape(cfg: config_lib.Mesh, num_devices: int) -> tuple[int, ...]:
    """Sizes of MESH_AXES (`data` including the dcn_data factor): resolves -1 and checks that
    dcn_data × data × fsdp × expert × context × tensor equals the number of devices."""
    sizes = _ici_sizes(cfg)
    known = cfg.dcn_data * math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise config_lib.ConfigError(
                f"config key 'mesh.{MESH_AXES[sizes.index(-1)]}': the fixed mesh axes ({known} devices, "
                f"dcn_data included) do not divide the {num_devices} available devices"
            )
        sizes[sizes.index(-1)] = num_devices // known
    total = cfg.dcn_data * math.prod(sizes)
    if total != num_devices:
        product = " × ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
        raise config_lib.ConfigError(
            f"config key 'mesh': mesh dcn_data={cfg.dcn_data} × {product} needs {total} devices but "
            f"{num_devices} are available; set one axis to -1 or make the product equal the device count"
        )
    sizes[0] *= cfg.dcn_data
    return tuple(sizes)


def _granules(devices) -> tuple[str, list[list]]:
    """Devices grouped by TPU slice if there are several, else by process: (kind, groups)."""
    for attr, kind in (("slice_index", "slices"), ("process_index", "processes")):
        keys = {getattr(d, attr, None) for d in devices}
        if len(keys) > 1 and None not in keys:
            groups: dict = {}
            for d in devices:
                groups.setdefault(getattr(d, attr), []).append(d)
            return kind, [groups[k] for k in sorted(groups)]
    return "devices", [list(devices)]


def _ici_grid(shape: tuple[int, ...], devices, *, strict: bool) -> np.ndarray:
    """`devices` arranged as `shape` over their fast links, topology-aware on TPU as `jax.make_mesh`.
    A mesh axis that is not a product of whole physical axes (8 on a 4x4x4 slice) splits one (logged:
    its neighbours are then not all adjacent); where even that fails, a plain reshape unless `strict`
    (a DCN group that is not a whole slice), else a ConfigError."""
    kinds = (getattr(mesh_utils, "_TPU_V5_LITE", None), getattr(mesh_utils, "_TPU_V5E", None))
    split = devices[0].device_kind in kinds
    for allow_split in (True,) if split else (False, True):
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=allow_split)
        except (ValueError, NotImplementedError, AssertionError) as e:
            error = e
            continue
        if allow_split and not split:
            log.warning("mesh %s splits a physical axis of the %s topology", shape, devices[0].device_kind)
        return grid
    if not strict:
        return np.asarray(devices, dtype=object).reshape(shape)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise config_lib.ConfigError(
        f"config key 'mesh': the mesh {dict(zip(MESH_AXES, shape, strict=True))} cannot be laid over these "
        f"{len(devices)} {devices[0].device_kind} devices ({first[:200]}); choose axis sizes that are "
        "products of the slice's physical axes"
    )


def device_grid(cfg: config_lib.Mesh, devices) -> np.ndarray:
    """The devices as an array of shape `mesh_shape(cfg, len(devices))` (see the module docstring)."""
    shape = mesh_shape(cfg, len(devices))
    kind, granules = _granules(devices)
    dcn = cfg.dcn_data
    if kind == "slices" and len(granules) != dcn:
        raise config_lib.ConfigError(
            f"config key 'mesh.dcn_data': the devices form {len(granules)} TPU slices; set mesh.dcn_data="
            f"{len(granules)} (data parallelism across slices), got {dcn}"
        )
    if kind == "processes" and len(granules) % dcn:
        raise config_lib.ConfigError(
            f"config key 'mesh.dcn_data': {dcn} does not divide the {len(granules)} processes; use a "
            "divisor of the process count"
        )
    if dcn == 1 and kind != "slices":  # one mesh over all devices, as jax.make_mesh builds it
        return _ici_grid(shape, list(devices), strict=True)
    ici = (shape[0] // dcn, *shape[1:])
    if kind == "devices":
        flat = granules[0]
        size = len(flat) // dcn
        groups = [flat[i * size : (i + 1) * size] for i in range(dcn)]
    else:
        per = len(granules) // dcn
        groups = [sum(granules[i * per : (i + 1) * per], []) for i in range(dcn)]
    return np.concatenate([_ici_grid(ici, g, strict=False) for g in groups], axis=0)


def make_mesh(cfg: config_lib.Mesh, devices=None) -> jax.sharding.Mesh:
    """A MESH_AXES mesh with Auto axis types: shardings come from jit's in/out shardings and
    `constrain`, and XLA propagates the rest."""
    devices = jax.devices() if devices is None else list(devices)
    grid = device_grid(cfg, devices)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    return math.prod(mesh.shape.get(a, 1) for a in DATA_AXES)


def check_batch(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    n = data_parallel_size(mesh)
    if batch_size % n or batch_size % jax.process_count():
        raise config_lib.ConfigError(
            f"config key 'batch_size': {batch_size} is not divisible by the data-parallel size {n} "
            f"(mesh.dcn_data × mesh.data × mesh.fsdp × mesh.expert) and process count "
            f"{jax.process_count()}; use a multiple of {int(np.lcm(n, jax.process_count()))}"
        )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis over every data-parallel mesh axis; works for any rank."""
    return NamedSharding(mesh, P(tuple(a for a in DATA_AXES if a in mesh.shape)))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_specs(logical_tree, shapes_tree, mesh_shape: dict[str, int], rules_name: str):
    """PartitionSpecs for a tree of parameters given their logical axes and shapes; needs only the
    mesh's axis sizes, not its devices."""
    rules = PRESETS[rules_name]
    return jax.tree.map(
        lambda axes, x: spec_for(axes, x.shape, rules, mesh_shape),
        logical_tree,
        shapes_tree,
        is_leaf=lambda a: a is None or isinstance(a, tuple),
    )


def param_shardings(logical_tree, shapes_tree, mesh: jax.sharding.Mesh, rules_name: str):
    """NamedShardings for a tree of parameters given their logical axes and shapes.

    Logs a warning naming the large parameters the preset leaves replicated on this mesh
    (rules.check_sufficiently_sharded; a test asserts it for the shipped models)."""
    specs = param_specs(logical_tree, shapes_tree, dict(mesh.shape), rules_name)
    try:
        check_sufficiently_sharded(specs, shapes_tree, rules_name, dict(mesh.shape))
    except ShardingError as e:
        log.warning("%s", e)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))

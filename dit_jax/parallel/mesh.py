"""Device mesh from config, and shardings for parameters and batches."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax import config as config_lib
from dit_jax.parallel.rules import DATA_AXES, MESH_AXES, PRESETS, spec_for


def mesh_shape(cfg: config_lib.Mesh, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 and checks that data × fsdp × tensor equals the number of devices."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise config_lib.ConfigError(
                f"config key 'mesh': the fixed mesh axes ({known} devices) do not divide the "
                f"{num_devices} available devices"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise config_lib.ConfigError(
            f"config key 'mesh': mesh data={sizes[0]} × fsdp={sizes[1]} × tensor={sizes[2]} needs "
            f"{int(np.prod(sizes))} devices but {num_devices} are available; set one axis to -1 or "
            "make the product equal the device count"
        )
    return tuple(sizes)


def make_mesh(cfg: config_lib.Mesh, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types: shardings come from jit's in/out
    shardings and `constrain`, and XLA propagates the rest."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in DATA_AXES]))


def check_batch(batch_size: int, mesh: jax.sharding.Mesh) -> None:
    n = data_parallel_size(mesh)
    if batch_size % n or batch_size % jax.process_count():
        raise config_lib.ConfigError(
            f"config key 'batch_size': {batch_size} is not divisible by the data-parallel size {n} "
            f"(mesh.data × mesh.fsdp) and process count {jax.process_count()}; use a multiple of "
            f"{int(np.lcm(n, jax.process_count()))}"
        )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis over every data-parallel mesh axis; works for any rank."""
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(logical_tree, shapes_tree, mesh: jax.sharding.Mesh, rules_name: str):
    """NamedShardings for a tree of parameters given their logical axes and shapes."""
    rules = PRESETS[rules_name]
    shape = dict(mesh.shape)
    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, spec_for(axes, x.shape, rules, shape)),
        logical_tree,
        shapes_tree,
        is_leaf=lambda a: a is None or isinstance(a, tuple),
    )

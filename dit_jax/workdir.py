"""The one way into a trained run: its config, model and EMA (or raw) parameters on any mesh.

    run = dit_jax.workdir.load("runs/quickstart")            # all local devices, data-parallel
    images = sampling.generate(run.config, run.spec, run.params, labels, mesh=run.mesh)

Nothing of training is built: no optimizer state is read, no REPA encoder, no data pipeline, and
the training mesh does not matter (a run trained on 2×4 devices loads on a laptop's one device).
`sample`, `eval`, `convert`, the notebooks and the tests use this.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
from flax import nnx

from dit_jax import config as config_lib
from dit_jax.models import DiT
from dit_jax.models.build import ModelSpec, model_spec
from dit_jax.parallel import mesh as mesh_lib
from dit_jax.train.checkpoint import Checkpointer, CheckpointError, abstract_with_shardings


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained model ready for inference."""

    workdir: str
    config: config_lib.Config
    spec: ModelSpec
    params: Any  # pure dict of arrays, sharded over `mesh` (replicated by default)
    step: int
    mesh: jax.sharding.Mesh

    def model(self) -> DiT:
        """The NNX model with these parameters (for eager use in notebooks)."""
        return nnx.merge(self.spec.graphdef, self.params)


def load_config(workdir: str) -> config_lib.Config:
    """The config a run was trained with (workdir/config.json)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; is {workdir} a dit-jax training workdir?")
    with open(path) as f:
        return config_lib.from_dict(json.load(f))


def write_config(workdir: str, cfg: config_lib.Config) -> None:
    """Writes workdir/config.json (process 0), atomically; unchanged content is not rewritten."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    text = json.dumps(config_lib.to_dict(cfg), indent=2, sort_keys=True)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def inference_mesh(devices=None) -> jax.sharding.Mesh:
    """Every device (default: all of them) on the data axis: batches split, parameters replicated."""
    devices = jax.devices() if devices is None else list(devices)
    return mesh_lib.make_mesh(config_lib.Mesh(data=-1, fsdp=1, tensor=1), devices)


def checkpoint_dir(workdir: str, best: bool = False) -> str:
    return os.path.join(workdir, "best" if best else "checkpoints")


def load(
    path: str,
    *,
    step: int | None = None,
    best: bool = False,
    ema: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    rules: str = "ddp",
) -> Run:
    """The run in workdir `path`: EMA (or, with ema=False, raw) parameters of the newest checkpoint
    (or `step`, or workdir/best), restored onto `mesh` (default `inference_mesh()`) with the
    weight-sharding preset `rules` ("ddp": replicated; "fsdp" to spread a large model)."""
    cfg = load_config(path)
    directory = checkpoint_dir(path, best)
    if not os.path.isdir(directory):
        what = "no best checkpoint (set eval.best_metric and eval_every)" if best else "no checkpoints"
        raise CheckpointError(
            f"{path} has {what}: {directory} does not exist; train first with `dit-jax train`"
        )
    mesh = inference_mesh() if mesh is None else mesh
    spec = model_spec(cfg)
    shardings = mesh_lib.param_shardings(spec.logical_axes, spec.abstract_params, mesh, rules)
    checkpointer = Checkpointer(directory, keep=None, async_save=False)
    try:
        step, params = checkpointer.restore_params(
            abstract_with_shardings(spec.abstract_params, shardings), ema=ema, step=step
        )
    finally:
        checkpointer.close()
    return Run(path, cfg, spec, params, step, mesh)

"""Ahead-of-time plan of a training run: compile the real train step for a target, allocate nothing.

    target = targets.get("tpu:v5p:2x2x1")          # or "gpu:h100:1x8", "cpu:8" (dit_jax.parallel.targets)
    report = plan.plan(cfg, target)
    report.total_bytes_per_device, report.fits, report.custom_calls

The train state is built with `jax.eval_shape`, the mesh from `cfg.mesh` over the target's devices,
and the step is the trainer's own (`dit_jax.train.step.build_train_step`), lowered with
ShapeDtypeStructs that carry the state and batch shardings and compiled under `jax.set_mesh`, so the
TPU / GPU compiler (and the Pallas kernels for that chip) run for real on this host. Per-device bytes
of params, EMA and optimizer state come from the shardings (the bytes of each leaf's shard); the
compiler's memory analysis gives arguments, outputs, donated aliases and temporaries.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax import config as config_lib
from dit_jax import flops
from dit_jax.parallel import mesh as mesh_lib
from dit_jax.parallel.targets import Target
from dit_jax.train import state as state_lib
from dit_jax.train.step import BuiltStep, build_train_step

#: Custom-call targets that run Pallas kernels: Mosaic TPU, Triton, Mosaic GPU.
KERNEL_CALLS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2")
#: XLA:TPU's messages for a program over the chip's HBM (a kernel over its VMEM budget is another error).
_OOM_MARKERS = ("CompileTimeHbmOom", "memory on HBM", "exceeds available HBM")


class PlanError(ValueError):
    """A run that cannot be planned; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one train step of a config costs on a target. Byte counts are per device.

    `total_bytes_per_device` = argument + output - alias + temp (the compiler's figures: the state
    is donated, so its output aliases its input). `fits` compares it with the target's device
    memory; None on CPU targets (host memory). Where the compiler itself rejects the program as too
    large (TPU), `fits` is False, the compiler's figures are None and `compile_error` says why.
    `flops_per_step` is the compiler's count for the whole step over all devices (None where
    cost analysis is unavailable, e.g. GPU; it counts a loop body once, so with scanned blocks it
    covers one group of blocks); `model_flops_per_step` the analytic matmul count
    (`flops.train_flops`). `compile_s` is tracing, lowering and compiling; `lower_s` the first two.
    `hlo` holds the compiled HLO text ("" when the compiler rejected the program).
    """

    target: str
    platform: str
    device_kind: str
    num_devices: int
    mesh: dict[str, int]
    batch_size: int
    num_params: int
    blocks: str  # the block layout and remat policy in force, e.g. "28 scanned, remat save_dots"
    params_bytes_per_device: int
    ema_bytes_per_device: int
    opt_state_bytes_per_device: int
    state_bytes_per_device: int
    state_bytes_total: int
    batch_bytes_per_device: int
    argument_bytes_per_device: int | None
    output_bytes_per_device: int | None
    alias_bytes_per_device: int | None
    temp_bytes_per_device: int | None
    total_bytes_per_device: int | None
    device_memory_bytes: int | None
    fits: bool | None
    flops_per_step: float | None
    model_flops_per_step: float
    custom_calls: tuple[str, ...]
    kernels: tuple[str, ...]
    lower_s: float
    compile_s: float
    compile_error: str | None = None
    hlo: str = dataclasses.field(default="", repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (everything but the HLO text)."""
        out = dataclasses.asdict(self)
        del out["hlo"]
        out["custom_calls"], out["kernels"] = list(self.custom_calls), list(self.kernels)
        return out


def abstract_batch(
    cfg: config_lib.Config, sharding: jax.sharding.Sharding
) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as the data pipeline yields it: x float32 [B, H, W, C], y int32 [B].

    (With data.with_images latents batches also hold the uint8 images for REPA's encoder; the step
    reads them only with REPA, which `check` rejects, so they are left out.)"""
    d = cfg.data
    return {
        "x": jax.ShapeDtypeStruct((cfg.batch_size, d.image_size, d.image_size, d.channels), jnp.float32,
                                  sharding=sharding),
        "y": jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32, sharding=sharding),
    }  # fmt: skip


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs / arrays with NamedShardings."""
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(tree)))  # fmt: skip


def _total_bytes(tree: Any) -> int:
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def custom_calls(hlo: str) -> tuple[str, ...]:
    """Sorted custom-call targets in HLO text (e.g. tpu_custom_call, __gpu$xla.gpu.triton)."""
    return tuple(sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo))))


def kernel_names(hlo: str) -> tuple[str, ...]:
    """Sorted names of the Pallas kernels in HLO text (flash_fwd_tpu, flash_fwd_mgpu, ...): the scope
    each kernel call was made in (`.../flash_fwd_tpu/pallas_call`), as its metadata records it."""
    names = set()
    for line in hlo.splitlines():
        call = re.search(r'custom_call_target="([^"]+)"', line)
        if call is None or call.group(1) not in KERNEL_CALLS:
            continue
        scope = re.search(r'op_name="([^"]+)"', line)
        parts = scope.group(1).split("/") if scope else []
        names.add(parts[-2] if len(parts) > 1 else line.split("=")[0].strip().lstrip("%").split(".")[0])
    return tuple(sorted(names))


def check(cfg: config_lib.Config, target: Target) -> jax.sharding.Mesh:
    """Cheap checks before compiling: the mesh fits the target, the batch splits, no REPA.

    Returns the mesh over the target's devices (cfg.mesh; -1 takes the remaining devices)."""
    if cfg.repa.weight > 0:
        raise PlanError(
            "repa.weight > 0: REPA's frozen encoder is loaded from its weights file, which a plan does not "
            "read; plan the model alone with --config.repa.weight=0 (the encoder adds its forward pass)"
        )
    mesh = mesh_lib.make_mesh(cfg.mesh, devices=list(target.devices))
    mesh_lib.check_batch(cfg.batch_size, mesh)
    return mesh


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """Bytes of the train state: per device (each leaf's shard) and in all (unsharded)."""

    num_params: int
    params_per_device: int
    ema_per_device: int
    opt_state_per_device: int
    per_device: int  # params + EMA + optimizer state + step
    total: int


def abstract_state(cfg: config_lib.Config, built: BuiltStep) -> state_lib.TrainState:
    """The train state of `built` as ShapeDtypeStructs carrying their shardings (nothing allocated): the
    first argument of `built.step_fn.lower`."""
    abstract = state_lib.abstract_state(cfg, built.spec, built.tx)
    to_struct = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    return jax.tree.map(to_struct, abstract, built.shardings)


def state_bytes_of(state: state_lib.TrainState) -> StateBytes:
    """Bytes of a train state of arrays or ShapeDtypeStructs that carry their shardings."""
    return StateBytes(
        num_params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))),
        params_per_device=shard_bytes(state.params),
        ema_per_device=shard_bytes(state.ema),
        opt_state_per_device=shard_bytes(state.opt_state),
        per_device=shard_bytes(state),
        total=_total_bytes(state),
    )


def state_bytes(cfg: config_lib.Config, mesh: jax.sharding.Mesh) -> StateBytes:
    """Per-device and total bytes of the train state of `cfg` sharded over `mesh` (compiles nothing)."""
    return state_bytes_of(abstract_state(cfg, build_train_step(cfg, mesh)))


def plan(cfg: config_lib.Config, target: Target) -> Plan:
    """Compiles the train step of `cfg` for `target` (nothing allocated) and reports its cost."""
    mesh = check(cfg, target)
    built = build_train_step(cfg, mesh)
    state = abstract_state(cfg, built)
    batch = abstract_batch(cfg, mesh_lib.batch_sharding(mesh))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        try:
            lowered = built.step_fn.lower(state, batch, None)
        except (ValueError, NotImplementedError) as e:  # e.g. a kernel the target cannot serve
            raise PlanError(f"the train step cannot be built for {target.name}: {_first_line(e)}") from e
        lower_s = time.perf_counter() - t0
        try:
            compiled, error = lowered.compile(), None
        except Exception as e:  # XLA's errors have no stable type across versions
            if not any(marker in str(e) for marker in _OOM_MARKERS):
                raise PlanError(f"the train step does not compile for {target.name}: {_first_line(e)}") from e
            compiled, error = None, _first_line(e)
    compile_s = time.perf_counter() - t0
    memory = compiled_memory(compiled)
    device_memory = target.device_memory_bytes
    if error is not None:
        fits = False
    elif device_memory is None or memory["total"] is None:
        fits = None
    else:
        fits = memory["total"] <= device_memory
    hlo = compiled.as_text() if compiled is not None else ""
    sizes = state_bytes_of(state)
    m = cfg.model
    return Plan(
        target=target.name,
        platform=target.platform,
        device_kind=target.device_kind,
        num_devices=target.num_devices,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        batch_size=cfg.batch_size,
        num_params=sizes.num_params,
        blocks=f"{m.depth} {'scanned' if m.scanned else 'per block'}, remat {m.remat_policy}",
        params_bytes_per_device=sizes.params_per_device,
        ema_bytes_per_device=sizes.ema_per_device,
        opt_state_bytes_per_device=sizes.opt_state_per_device,
        state_bytes_per_device=sizes.per_device,
        state_bytes_total=sizes.total,
        batch_bytes_per_device=shard_bytes(batch),
        argument_bytes_per_device=memory["argument"],
        output_bytes_per_device=memory["output"],
        alias_bytes_per_device=memory["alias"],
        temp_bytes_per_device=memory["temp"],
        total_bytes_per_device=memory["total"],
        device_memory_bytes=device_memory,
        fits=fits,
        flops_per_step=_flops(compiled, target.num_devices),
        model_flops_per_step=flops.train_flops(cfg),
        custom_calls=custom_calls(hlo),
        kernels=kernel_names(hlo),
        lower_s=lower_s,
        compile_s=compile_s,
        compile_error=error,
        hlo=hlo,
    )


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def compiled_memory(compiled) -> dict[str, int | None]:
    """Per-device bytes of a compiled step: argument, output, alias, temp and their total."""
    stats = compiled.memory_analysis() if compiled is not None else None
    if stats is None:
        return dict.fromkeys(("argument", "output", "alias", "temp", "total"))
    out = {
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
        "temp": int(stats.temp_size_in_bytes),
    }
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _flops(compiled, num_devices: int) -> float | None:
    """The compiler's FLOP count of the step over all devices (it counts one device's program)."""
    if compiled is None:
        return None
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not implemented on some backends
        return None
    if isinstance(cost, list | tuple):  # older JAX: one dict per program
        cost = cost[0] if cost else None
    if not cost or cost.get("flops") is None or cost["flops"] < 0:
        return None
    return float(cost["flops"]) * num_devices


def size_text(n: int | None) -> str:
    """Bytes as text in GiB / MiB / KiB."""
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _fits_line(p: Plan) -> str:
    if p.compile_error is not None:
        return f"does NOT fit: the compiler rejects it ({p.compile_error})"
    if p.fits is None:
        return f"{size_text(p.total_bytes_per_device)} (CPU target: host memory, no device memory to compare)"
    share = p.total_bytes_per_device / p.device_memory_bytes
    line = f"{size_text(p.total_bytes_per_device)} of {size_text(p.device_memory_bytes)} ({share:.1%}): "
    if p.fits:
        return line + "fits"
    return (
        line
        + f"does NOT fit, {size_text(p.total_bytes_per_device - p.device_memory_bytes)} over: "
        + parts_line(p)
    )


def parts_line(p: Plan) -> str:
    """Per-device bytes by part, largest first: what to shrink when a job does not fit."""
    parts = {
        "params": p.params_bytes_per_device,
        "EMA": p.ema_bytes_per_device,
        "optimizer state": p.opt_state_bytes_per_device,
        "temporaries": p.temp_bytes_per_device or 0,
        "batch": p.batch_bytes_per_device,
    }
    return ", ".join(f"{k} {size_text(v)}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))


def memory_line(sizes: StateBytes, memory: dict[str, int | None], device_memory: int | None) -> str:
    """One line of per-device memory: the train state by part, temporaries, total (of the device's)."""
    total = memory["total"]
    line = (
        f"state {size_text(sizes.per_device)} (params {size_text(sizes.params_per_device)}, EMA "
        f"{size_text(sizes.ema_per_device)}, optimizer {size_text(sizes.opt_state_per_device)}), temporaries "
        f"{size_text(memory['temp'])}, total {size_text(total)}"
    )
    if device_memory and total is not None:
        line += f" of {size_text(device_memory)} ({total / device_memory:.1%})"
    return line


def format_table(p: Plan) -> str:
    """The plan as a human-readable table."""
    mesh = " × ".join(f"{k}={v}" for k, v in p.mesh.items())
    if p.flops_per_step is not None:
        compiler = f"{p.flops_per_step:.4g} (loop bodies once)"
    else:
        compiler = (
            "n/a (" + ("not compiled" if p.compile_error else "no cost analysis on this platform") + ")"
        )
    rows = [
        ("target", f"{p.target}: {p.num_devices} × {p.device_kind}, mesh {mesh}"),
        ("model", f"{p.num_params / 1e6:.1f}M parameters, global batch {p.batch_size}; blocks {p.blocks}"),
        ("params / device", size_text(p.params_bytes_per_device)),
        ("EMA / device", size_text(p.ema_bytes_per_device)),
        ("optimizer / device", size_text(p.opt_state_bytes_per_device)),
        (
            "state / device",
            f"{size_text(p.state_bytes_per_device)} (whole state {size_text(p.state_bytes_total)})",
        ),
        ("batch / device", size_text(p.batch_bytes_per_device)),
        ("arguments / device", size_text(p.argument_bytes_per_device)),
        (
            "outputs / device",
            f"{size_text(p.output_bytes_per_device)} ({size_text(p.alias_bytes_per_device)} aliased)",
        ),
        ("temporaries / device", size_text(p.temp_bytes_per_device)),
        ("total / device", _fits_line(p)),
        (
            "FLOPs / step",
            f"compiler {compiler}; analytic {p.model_flops_per_step:.4g} (3 × forward matmuls)",
        ),
        ("custom calls", ", ".join(p.custom_calls) or "none"),
        ("kernels", ", ".join(p.kernels) or "none"),
        ("compile", f"{p.compile_s:.1f} s (tracing and lowering {p.lower_s:.1f} s)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

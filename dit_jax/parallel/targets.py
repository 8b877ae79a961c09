"""Named compile targets: devices of real TPU / GPU systems, without the hardware.

`get("tpu:v5p:2x2x1")` returns a `Target` whose devices are deviceless TPU v5p chips from libtpu's
topology description; `get("gpu:h100:1x8")` one host of eight H100s from the target description
that XLA ships inside the installed CUDA plugin; `get("cpu:8")` eight (fake) CPU devices. A mesh
over a target's devices, given to `jax.set_mesh`, makes `jax.jit(...).lower(...).compile()`
produce the program the real chips would run: the TPU compiler (XLA:TPU + Mosaic) or the GPU one
(XLA:GPU + Triton / Mosaic GPU + ptxas), with real per-device memory analysis. See AOT.md.

TPU and GPU targets need the ahead-of-time environment (`make install-aot`: Python 3.12, JAX
0.12, libtpu, the CUDA plugin) and `JAX_PLATFORMS=cpu`.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import mmap
import os
import re

import jax
import numpy as np

GiB = 2**30

# TPU generations: (libtpu topology name, HBM per chip, peak bf16 dense FLOP/s per chip).
_TPUS = {
    "v4": ("v4", 32 * GiB, 275e12),
    "v5e": ("v5e", 16 * GiB, 197e12),
    "v5p": ("v5p", 95 * GiB, 459e12),
    "v6e": ("v6e", 32 * GiB, 918e12),
}
# GPUs: (device_description_str in the CUDA plugin's target descriptions, peak bf16 dense FLOP/s).
_GPUS = {
    "h100": ("NVIDIA H100 80GB HBM3", 989e12),
    "h100-pcie": ("NVIDIA H100 PCIe", 756e12),
    "h200": ("NVIDIA H200 141GB HBM3e", 989e12),
    "b200": ("NVIDIA B200", 2250e12),
    "a100": ("NVIDIA A100-SXM4-80GB", 312e12),
    "a100-40gb": ("NVIDIA A100-SXM4-40GB", 312e12),
}
EXAMPLES = ("cpu:8", "tpu:v5e:2x2", "tpu:v5p:2x2x1", "tpu:v5p:4x4x4", "tpu:v6e:2x2", "gpu:h100:1x8",
            "gpu:h200:2x8")  # fmt: skip


class TargetError(ValueError):
    """A target name that cannot be resolved; the message says what is known / what to install."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "cpu" | "tpu" | "gpu"
    devices: tuple
    device_kind: str
    device_memory_bytes: int | None  # None on CPU (host memory)
    peak_flops: float | None  # bf16 dense FLOP/s per device, where known

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def mesh(self, shape: tuple[int, ...], axis_names: tuple[str, ...]) -> jax.sharding.Mesh:
        """A mesh over the target's devices (topology-aware on TPU)."""
        from jax.experimental import mesh_utils

        if math.prod(shape) != self.num_devices:
            raise TargetError(
                f"mesh {shape} needs {math.prod(shape)} devices; {self.name} has {self.num_devices}"
            )
        try:
            grid = mesh_utils.create_device_mesh(shape, devices=list(self.devices))
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(self.devices, dtype=object).reshape(shape)
        return jax.sharding.Mesh(grid, axis_names)


def known() -> list[str]:
    """Name patterns of every known target."""
    return ["cpu:N", f"tpu:{{{','.join(_TPUS)}}}:<topology>", f"gpu:{{{','.join(_GPUS)}}}:<hosts>x<gpus>"]


def _unknown(name: str, why: str) -> TargetError:
    return TargetError(
        f"unknown target {name!r}: {why}; known targets: {', '.join(known())} (e.g. {', '.join(EXAMPLES)})"
    )


def get(name: str) -> Target:
    """The target called `name` ("cpu:8", "tpu:v5p:2x2x1", "gpu:h100:1x8", ...)."""
    kind, _, rest = name.partition(":")
    if kind == "cpu":
        return _cpu(name, rest)
    if kind == "tpu":
        gen, _, topology = rest.partition(":")
        if gen not in _TPUS:
            raise _unknown(name, f"TPU generation {gen!r} is not one of {', '.join(_TPUS)}")
        if not re.fullmatch(r"\d+(x\d+){1,2}", topology):
            raise _unknown(name, f"TPU topology {topology!r} should look like 2x2 or 2x2x1")
        return _tpu(name, gen, topology)
    if kind == "gpu":
        model, _, topology = rest.partition(":")
        if model not in _GPUS:
            raise _unknown(name, f"GPU {model!r} is not one of {', '.join(_GPUS)}")
        m = re.fullmatch(r"(\d+)x(\d+)", topology)
        if not m:
            raise _unknown(name, f"GPU topology {topology!r} should be <hosts>x<gpus per host>, e.g. 1x8")
        return _gpu(name, model, int(m.group(1)), int(m.group(2)))
    raise _unknown(name, "it should start with cpu:, tpu: or gpu:")


def _cpu(name: str, count: str) -> Target:
    if not count.isdigit() or int(count) < 1:
        raise _unknown(name, "a CPU target is cpu:N with N >= 1 devices")
    n = int(count)
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise TargetError(
            f"target {name!r} needs {n} CPU devices but {len(devices)} exist; start Python with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} (dit-jax plan does this itself)"
        )
    return Target(name, "cpu", tuple(devices[:n]), devices[0].device_kind, None, None)


def _need_aot(name: str, what: str) -> TargetError:
    return TargetError(
        f"target {name!r} needs {what}, which this environment lacks; run `make install-aot` and use "
        ".venv-aot/bin/dit-jax (Python 3.12, JAX 0.12 with libtpu and the CUDA plugin)"
    )


def _quiet_libtpu() -> None:
    # libtpu looks for a TPU VM's metadata when loaded; deviceless compilation needs none.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _tpu(name: str, gen: str, topology: str) -> Target:
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise _need_aot(name, "libtpu") from None
    _quiet_libtpu()
    topo_name, hbm, peak = _TPUS[gen]
    try:
        topo = topologies.get_topology_desc(f"{topo_name}:{topology}", platform="tpu")
    except Exception as e:  # libtpu's own error names the bad topology
        raise _unknown(
            name, f"libtpu rejects topology {topo_name}:{topology} ({str(e).splitlines()[0]})"
        ) from None
    devices = tuple(topo.devices)
    return Target(name, "tpu", devices, devices[0].device_kind, hbm, peak)


@functools.cache
def gpu_target_description(device: str) -> str:
    """The GpuTargetConfigProto text for `device`, read from the installed CUDA plugin."""
    libraries = _plugin_libraries()
    marker = b"# proto-message: stream_executor.GpuTargetConfigProto"
    with open(libraries[0], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        at = data.find(f'device_description_str: "{device}"'.encode())
        if at < 0:
            raise KeyError(device)
        start = data.rfind(marker, 0, at)
        return data[start : data.find(b"\0", at)].decode()


def _plugin_libraries() -> list[str]:
    """xla_cuda_plugin.so of the installed jax-cuda12-plugin (or -cuda13-)."""
    try:
        import jax_plugins
    except ImportError:
        raise ImportError("no CUDA plugin") from None
    found = [p for d in jax_plugins.__path__ for p in sorted(glob.glob(os.path.join(d, "xla_cuda*", "*.so")))]
    if not found:
        raise ImportError("no CUDA plugin")
    return found


def _gpu(name: str, model: str, hosts: int, per_host: int) -> Target:
    from jax.experimental import topologies

    device, peak = _GPUS[model]
    try:
        spec = gpu_target_description(device)
    except ImportError:
        raise _need_aot(name, "the CUDA plugin (jax-cuda12-plugin)") from None
    except (FileNotFoundError, KeyError):
        raise TargetError(f"the installed CUDA plugin has no target description for {device!r}") from None
    topo = topologies.get_topology_desc(platform="cuda", target_config=spec, topology=f"1x{hosts}x{per_host}")
    devices = tuple(topo.devices)
    memory = int(re.search(r"device_memory_size: (\d+)", spec).group(1))
    return Target(name, "gpu", devices, devices[0].device_kind, memory, peak)

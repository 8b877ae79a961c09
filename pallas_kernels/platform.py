"""Which chip a computation is compiled for: the one place that answers it for the kernels.

The answer comes from the devices of the mesh in context (`jax.set_mesh(mesh)`, or the mesh a
`shard_map` runs over), else from the default backend. So one model, traced on this CPU host under
the mesh of a deviceless TPU or H100 topology (`dit_jax.parallel.targets`), selects the TPU or GPU
kernel and compiles it for real, while the same code on CPU devices runs the kernels interpreted.
"""

from __future__ import annotations

import dataclasses
import re

import jax

#: Scoped-VMEM budget per TPU generation that the kernels plan for (bytes). Mosaic's default scoped
#: limit is 16 MiB on v4/v5e and 32 MiB on v5p/v6e; physical VMEM is 128 MiB on v5e/v5p/v6e.
TPU_VMEM_BYTES = {"v4": 16 * 2**20, "v5e": 16 * 2**20, "v5p": 32 * 2**20, "v6e": 32 * 2**20}

#: Opt-in dynamic shared memory per thread block, by compute capability (bytes).
GPU_SMEM_BYTES = {(7, 0): 96 * 1024, (8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 9): 99 * 1024,
                  (9, 0): 227 * 1024, (10, 0): 227 * 1024, (12, 0): 99 * 1024}  # fmt: skip

_GPU_KINDS = (  # device_kind substring -> compute capability, when the device does not say
    ("H100", (9, 0)), ("H200", (9, 0)), ("H800", (9, 0)), ("GH200", (9, 0)),
    ("B200", (10, 0)), ("B300", (10, 0)), ("GB200", (10, 0)), ("GB300", (10, 0)),
    ("A100", (8, 0)), ("A800", (8, 0)), ("A30", (8, 0)), ("L40", (8, 9)), ("L4", (8, 9)),
    ("A10", (8, 6)), ("A6000", (8, 6)), ("V100", (7, 0)),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Platform:
    """A compile target as the kernels see it: "cpu", "gpu" or "tpu" and the device kind."""

    name: str
    device_kind: str
    compute_capability: tuple[int, int] | None = None  # GPUs only

    @property
    def family(self) -> str:
        """The Pallas kernel family: "tpu" on TPUs, else "gpu" (also interpreted on CPU)."""
        return "tpu" if self.name == "tpu" else "gpu"

    @property
    def interpret(self) -> bool:
        """Kernels run in interpret mode only on CPU devices."""
        return self.name == "cpu"

    @property
    def tpu_generation(self) -> str | None:
        """ "v4", "v5e", "v5p", "v6e", ... from a TPU device kind ("TPU v5 lite" is v5e)."""
        if self.name != "tpu":
            return None
        m = re.search(r"v(\d+)\s*(lite|e|p)?", self.device_kind, re.IGNORECASE)
        if m is None:
            return None
        gen, suffix = m.group(1), (m.group(2) or "").lower()
        if suffix in ("lite", "e"):
            return f"v{gen}e"
        if gen == "5":
            return "v5p"
        return f"v{gen}" if gen == "4" else f"v{gen}p"

    @property
    def vmem_bytes(self) -> int:
        return TPU_VMEM_BYTES.get(self.tpu_generation or "", 16 * 2**20)

    @property
    def smem_bytes(self) -> int:
        """Shared memory per block the GPU kernels may use (H100's 227 KiB when unknown, e.g. CPU)."""
        return GPU_SMEM_BYTES.get(self.compute_capability or (9, 0), 227 * 1024)

    @property
    def is_hopper(self) -> bool:
        return self.name == "gpu" and self.compute_capability is not None and self.compute_capability[0] == 9


def _capability(device) -> tuple[int, int] | None:
    if device.platform != "gpu":
        return None
    text = getattr(device, "compute_capability", None)
    if text:
        major, _, minor = str(text).partition(".")
        return int(major), int(minor or 0)
    for name, cc in _GPU_KINDS:
        if name in device.device_kind:
            return cc
    return None


def of_device(device) -> Platform:
    return Platform(device.platform, device.device_kind, _capability(device))


def current() -> Platform:
    """The platform the enclosing computation is compiled for (mesh in context, else default backend)."""
    abstract = jax.sharding.get_abstract_mesh()
    dev = getattr(abstract, "abstract_device", None)
    if dev is not None and not abstract.empty:
        cc = None
        if dev.platform == "gpu":
            cc = next((c for n, c in _GPU_KINDS if n in dev.device_kind), None)
        return Platform(dev.platform, dev.device_kind, cc)
    return of_device(jax.devices()[0])

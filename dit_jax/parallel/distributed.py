"""Multi-process start-up: one call before any other JAX use.

`--coordinator` (every dit-jax command that runs on devices has it) selects how a process joins
its job:

- absent: a single process; nothing to set up.
- `HOST:PORT` with `--num_processes` and `--process_id`: explicit (launch/local.py does this).
- `auto`: found in the environment, in this order
    1. SLURM (`srun`, launch/slurm.sbatch): SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID and the
       node list (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST / SLURM_NODELIST). The coordinator
       is the first host of the node list, on port 61440 + job id % 4096 (JAX_COORDINATOR_PORT
       overrides it). With several tasks on a node, each task keeps the GPU of its SLURM_LOCALID
       (unless SLURM already gave it a single GPU); with one task per node it keeps all of them.
    2. A launcher's environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID
       (or JOB_COMPLETION_INDEX, a Kubernetes indexed Job's pod index), as launch/gke/render.py
       writes for GPU node pools.
    3. JAX's own cluster detection (`jax.distributed.initialize()` without arguments): TPU VMs
       (launch/tpu_vm.sh), GKE TPU node pools (launch/gke/), Kubernetes with the `kubernetes`
       package, Open MPI.

`--num_processes` / `--process_id` given with `auto` win over the environment. On CPU devices
collectives go through gloo. Importing this module has no side effects.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping

log = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """The job cannot be joined as asked; the message says why and what to pass instead."""


@dataclasses.dataclass(frozen=True)
class Join:
    """How to call `jax.distributed.initialize`: None fields are left to JAX's own detection."""

    source: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: list[int] | None = None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-004,9],cpu1' -> 'gpu003'."""
    host, i = "", 0
    while i < len(nodelist) and nodelist[i] != ",":
        if nodelist[i] == "[":
            end = nodelist.index("]", i)
            host += re.split(r"[,-]", nodelist[i + 1 : end])[0]
            i = end + 1
        else:
            host += nodelist[i]
            i += 1
    return host


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """SLURM's compressed tasks-per-node list ('4(x2),1' = 4,4,1) at index `node_id`."""
    counts = []
    for item in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if m is None:
            raise DistributedError(f"cannot read SLURM tasks per node {tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[min(node_id, len(counts) - 1)]


def _slurm(env: Mapping[str, str]) -> Join | None:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    ntasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if not (env.get("SLURM_JOB_ID") and nodelist and ntasks and "SLURM_PROCID" in env):
        return None
    job = env["SLURM_JOB_ID"]
    port = env.get("JAX_COORDINATOR_PORT") or str(61440 + int(job) % 4096)
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    local_ids: list[int] | None = []  # []: every device of the node stays visible
    single_gpu = len(env.get("CUDA_VISIBLE_DEVICES", "").split(",")) == 1 and env.get("CUDA_VISIBLE_DEVICES")
    if "JAX_LOCAL_DEVICE_IDS" in env:
        local_ids = None  # JAX reads it
    elif tasks_on_node(per_node, int(env.get("SLURM_NODEID", "0"))) > 1 and not single_gpu:
        local_ids = [int(env.get("SLURM_LOCALID", "0"))]
    return Join(
        source=f"SLURM job {job}",
        coordinator=f"{first_host(nodelist)}:{port}",
        num_processes=int(ntasks),
        process_id=int(env["SLURM_PROCID"]),
        local_device_ids=local_ids,
    )


def _launcher_env(env: Mapping[str, str]) -> Join | None:
    process_id = env.get("JAX_PROCESS_ID") or env.get("JOB_COMPLETION_INDEX")
    if not (env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES") and process_id):
        return None
    return Join(
        source="JAX_COORDINATOR_ADDRESS",
        coordinator=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(env["JAX_NUM_PROCESSES"]),
        process_id=int(process_id),
    )


def detect(
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    env: Mapping[str, str] | None = None,
) -> Join | None:
    """What `initialize` would do, without doing it: None for a single process."""
    if coordinator is None:
        return None
    if coordinator != "auto":
        if num_processes is None or process_id is None:
            raise DistributedError("--coordinator=HOST:PORT needs --num_processes and --process_id")
        return Join("--coordinator", coordinator, num_processes, process_id)
    env = os.environ if env is None else env
    join = _slurm(env) or _launcher_env(env) or Join("JAX cluster detection")
    return dataclasses.replace(
        join,
        num_processes=join.num_processes if num_processes is None else num_processes,
        process_id=join.process_id if process_id is None else process_id,
    )


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Joins the multi-process JAX job described by the flags and the environment (see above)."""
    join = detect(coordinator, num_processes, process_id)
    if join is None:
        return
    import jax

    if not jax.config.jax_platforms or "cpu" in jax.config.jax_platforms:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            join.coordinator,
            num_processes=join.num_processes,
            process_id=join.process_id,
            local_device_ids=join.local_device_ids,
        )
    except ValueError as e:  # JAX found no cluster: "coordinator_address should be defined."
        if join.coordinator is not None:
            raise
        raise DistributedError(
            f"--coordinator=auto found no cluster ({e}): not under SLURM, a TPU VM or a Kubernetes "
            "JobSet; pass --coordinator=HOST:PORT --num_processes=N --process_id=I"
        ) from e
    where = join.coordinator or "found by JAX"
    log.info(
        "process %d of %d joined via %s (coordinator %s)",
        jax.process_index(),
        jax.process_count(),
        join.source,
        where,
    )

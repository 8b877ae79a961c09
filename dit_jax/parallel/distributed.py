"""Multi-process start-up: one call before any other JAX use."""

from __future__ import annotations

import jax


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Joins a multi-process JAX job.

    With an explicit coordinator ("host:port"), the process count and id must be given too (the
    local launcher `launch/local.py` does this). On CPU, collectives go through gloo. Without a
    coordinator nothing happens: single-process runs need no set-up, and on clusters that JAX
    detects itself (SLURM, TPU VMs, GKE) call `jax.distributed.initialize()` with no arguments by
    passing `--coordinator=auto`.
    """
    if coordinator is None:
        return
    if coordinator == "auto":
        jax.distributed.initialize()
        return
    if not jax.config.jax_platforms or "cpu" in jax.config.jax_platforms:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)

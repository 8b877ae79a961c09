"""Checkpoints: the only module that imports Orbax.

A checkpoint holds the train state (params, EMA, optimizer state, step), the data iterator state
and the config. Saves are asynchronous; Orbax writes each step into a temporary directory and
renames it when complete, so an interrupted save never replaces the last good checkpoint. On
restore, a newest checkpoint that cannot be read is skipped with a warning in favour of the
previous one.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint; the message says where and what to do."""


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, data_state: Any, config: dict) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state if data_state is not None else {}),
                config=ocp.args.JsonSave(config),
            ),
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, Any]:
        """Restores onto the shardings in `abstract_state` (a tree of ShapeDtypeStructs with
        `.sharding`), so a checkpoint written on one mesh restores onto any other.

        With `step=None`, tries the newest checkpoint first and falls back to older ones if it is
        damaged. Returns (step, state, data_state).
        """
        candidates = [step] if step is not None else self.steps()[::-1]
        if not candidates:
            raise CheckpointError(f"no checkpoints in {self.directory}; train first with `dit-jax train`")
        errors = []
        for s in candidates:
            try:
                restored = self._manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any failure to read means "damaged"
                first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                errors.append(f"step {s}: {first_line[:200]}")
                log.warning(
                    "checkpoint at step %d in %s cannot be restored (%s); trying an older one",
                    s,
                    self.directory,
                    first_line[:200],
                )
                continue
            return s, restored.state, restored.data
        raise CheckpointError(
            f"no checkpoint in {self.directory} could be restored ({'; '.join(errors)}); "
            "delete the damaged step directories or start a new workdir"
        )

    def restore_params(
        self, abstract_params: Any, *, ema: bool = True, step: int | None = None
    ) -> tuple[int, Any]:
        """(step, params): only the EMA (or raw) parameters of the newest (or given) checkpoint,
        onto the shardings in `abstract_params`; the optimizer state is never read."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoints in {self.directory}; train first with `dit-jax train`")
        which = "ema" if ema else "params"
        item = {which: abstract_params}
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(item, partial_restore=True))
            )
        except Exception as e:  # noqa: BLE001 - unreadable, or written for another model
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"could not restore the {which} parameters of step {step} in {self.directory}: "
                f"{first_line[:300]}"
            ) from e
        return step, restored.state[which]

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

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
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dit_jax.models import layout

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint; the message says where and what to do."""


class Checkpointer:
    def __init__(self, directory: str, *, keep: int | None = 3, async_save: bool = True):
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

    def restore(
        self, abstract_state: Any, step: int | None = None, *, set_aside_unreadable: bool = False
    ) -> tuple[int, Any, Any]:
        """Restores onto the shardings in `abstract_state` (a tree of ShapeDtypeStructs with
        `.sharding`), so a checkpoint written on one mesh restores onto any other.

        With `step=None`, tries the newest checkpoint first and falls back to older ones while a
        checkpoint cannot be read. A checkpoint written for another train-state tree (another model
        or optimizer) is not damage: CheckpointError at once. With `set_aside_unreadable` (training),
        the unreadable newer checkpoints are then moved to `<directory>_unreadable/`, so that their
        steps can be saved again. Returns (step, state, data_state).
        """

        def args(s: int):
            target = self._in_stored_layout(abstract_state, s, lambda tree: tree)
            return ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())

        s, restored, unreadable = self._first_readable(step, args)
        if set_aside_unreadable and unreadable:
            self._set_aside(unreadable)
        return s, _in_layout_of(restored.state, abstract_state), restored.data

    def restore_params(
        self, abstract_params: Any, *, ema: bool = True, step: int | None = None
    ) -> tuple[int, Any]:
        """(step, params): only the EMA (or raw) parameters of the newest readable (or the given)
        checkpoint, onto the shardings in `abstract_params`; the optimizer state is never read."""
        which = "ema" if ema else "params"

        def args(s: int):
            item = {which: self._in_stored_layout(abstract_params, s, lambda tree: tree[which])}
            restore_args = ocp.checkpoint_utils.construct_restore_args(item)
            return ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)
            )

        s, restored, _ = self._first_readable(step, args)
        return s, _in_layout_of(restored.state[which], abstract_params)

    def _in_stored_layout(self, abstract: Any, step: int, part) -> Any:
        """`abstract` with its blocks in the layout (models.layout) that checkpoint `step` stores for
        `part(stored state tree)`: weights saved per block restore into a scanned model and back."""
        try:
            metadata = ocp.PyTreeCheckpointer().metadata(os.path.join(self.directory, str(step), "state"))
            stored = layout.is_stacked(part(metadata.item_metadata.tree))
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore itself reports it
            return abstract
        if stored is None or stored == layout.is_stacked(abstract):
            return abstract
        return layout.convert(abstract, stacked=stored, period=layout.period_of(abstract))

    def _first_readable(self, step: int | None, args) -> tuple[int, Any, list[int]]:
        """(step, restored, newer unreadable steps) for the newest checkpoint (or `step`) that reads;
        `args(step)` gives the restore arguments for a step."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoints in {self.directory}; train first with `dit-jax train`")
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory}; it holds steps {steps}")
        candidates = [step] if step is not None else steps[::-1]
        errors = []
        for i, s in enumerate(candidates):
            try:
                return s, self._manager.restore(s, args=args(s)), candidates[:i]
            except Exception as e:  # noqa: BLE001 - sorted below: another tree, or unreadable
                mismatch = _tree_mismatch(e)
                if mismatch is not None:
                    raise CheckpointError(
                        f"the checkpoint at step {s} in {self.directory} was written for a different model "
                        f"or optimizer than this config builds ({mismatch}); it is not damaged: use the "
                        "config it was trained with (its workdir's config.json), or a new workdir"
                    ) from e
                errors.append(f"step {s}: {_describe(e)}")
                older = f"trying step {candidates[i + 1]}" if i + 1 < len(candidates) else "no older one"
                log.warning("checkpoint at step %d in %s cannot be read (%s); %s", s, self.directory,
                            _describe(e), older)  # fmt: skip
        raise CheckpointError(
            f"no checkpoint in {self.directory} could be restored: none of them can be read "
            f"({'; '.join(errors)}); copy their files back from a backup, or train again in a new workdir"
        )

    def _set_aside(self, steps: list[int]) -> None:
        """Moves the step directories of `steps` to `<directory>_unreadable/` (kept for inspection)."""
        aside = f"{self.directory}_unreadable"
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            for s in steps:
                target = os.path.join(aside, str(s))
                n = 1
                while os.path.exists(target):
                    target, n = os.path.join(aside, f"{s}.{n}"), n + 1
                os.rename(os.path.join(self.directory, str(s)), target)
                log.warning("moved the unreadable checkpoint of step %d to %s", s, target)
        multihost_utils.sync_global_devices("dit_jax set aside unreadable checkpoints")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _in_layout_of(tree: Any, abstract: Any) -> Any:
    """Restored `tree` converted to the block layout of `abstract`, on its shardings."""
    stacked = layout.is_stacked(abstract)
    if stacked is None or layout.is_stacked(tree) == stacked:
        return tree
    converted = layout.convert(tree, stacked=stacked, period=layout.period_of(abstract))
    return jax.device_put(converted, jax.tree.map(lambda a: a.sharding, abstract))


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _describe(e: BaseException) -> str:
    """'<type>: <first line of the message>', at most 200 characters."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}"[:200] if lines else type(e).__name__


def _tree_mismatch(e: BaseException) -> str | None:
    """What differs when `e` (or its cause) is Orbax saying the checkpoint holds another tree than the
    restore target; None for any other error. Orbax 0.12 raises ValueError 'User-provided restore item
    and on-disk value metadata tree structures do not match:' followed by the differing key paths,
    or 'Requested shape: S is not compatible with the stored shape: T'."""
    for _ in range(8):  # e, its cause, its cause's cause, ...
        if e is None:
            break
        text = str(e) if isinstance(e, ValueError) else ""
        if "tree structures do not match" in text:
            paths = [ln[:-1] for ln in text.splitlines()[1:] if ln.endswith(":") and not ln[:1].isspace()]
            shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            return f"the trees differ at {shown}" if paths else "the trees differ"
        shapes = re.search(
            r"Requested shape: (\(.*?\)) is not compatible with the stored shape: (\(.*?\))", text
        )
        if shapes:
            return f"an array stored as {shapes[2]} is {shapes[1]} here"
        e = e.__cause__ or e.__context__
    return None

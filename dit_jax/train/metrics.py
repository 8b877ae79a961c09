"""Metrics: metrics.jsonl + TensorBoard on process 0, and a progress bar with ETA."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray | jax.Array | np.generic):
        value = np.asarray(value)
        if value.ndim:  # e.g. moe/expert_load: a JSON list (TensorBoard takes scalars only)
            return [_plain(v) for v in value.tolist()]
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the file parseable
    return value


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard.

    Only process 0 writes. Appending keeps the history of a resumed run in one file; `start`, the
    step training continues from, makes that history read as one uninterrupted run: see `rewind`.
    """

    def __init__(self, workdir: str, *, start: int | None = None, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            if start is not None:
                rewind(workdir, start)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
            from tensorboardX import SummaryWriter

            # purge_step writes a SessionLog.START at start + 1: TensorBoard then hides the steps from
            # there on that earlier event files hold (logged after the checkpoint being resumed).
            purge_step = start + 1 if start else None
            self._tb = SummaryWriter(logdir=workdir, flush_secs=30, purge_step=purge_step)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, step)

    def write_image(self, step: int, tag: str, image_HWC: np.ndarray) -> None:
        if self.enabled:
            self._tb.add_image(tag, image_HWC, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def rewind(workdir: str, start: int) -> None:
    """Prepares the logs of `workdir` for a run that continues from step `start`.

    start > 0 (a resume from the checkpoint of that step): drops the metrics.jsonl records of later
    steps, written after that checkpoint by the interrupted run, so that none is logged twice, and a
    last line cut short by a kill; TensorBoard hides those steps of the old event files (see
    `purge_step` in MetricsWriter). start == 0 (a fresh run): removes metrics.jsonl and the TensorBoard
    event files, left by an earlier run that stopped before its first checkpoint.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    records = _read_lines(path) if os.path.exists(path) else []
    if start == 0:
        events = [
            os.path.join(workdir, n) for n in os.listdir(workdir) if n.startswith("events.out.tfevents.")
        ]
        for name in events + ([path] if os.path.exists(path) else []):
            os.remove(name)
        if records or events:
            log.info(
                "removed metrics.jsonl (%d records) and %d TensorBoard event files of an earlier run here "
                "that saved no checkpoint",
                len(records),
                len(events),
            )
        return
    kept = [line for line in records if (step := _step(line)) is not None and step <= start]
    if len(kept) < len(records):
        with open(path + ".tmp", "w") as f:
            f.writelines(line + "\n" for line in kept)
        os.replace(path + ".tmp", path)
        log.info(
            "resuming from step %d: dropped %d records of metrics.jsonl written after that checkpoint",
            start,
            len(records) - len(kept),
        )


def last_record(workdir: str, step: int, key: str) -> dict | None:
    """The last metrics.jsonl record at or before `step` that holds `key` (None if there is none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    found = None
    for line in _read_lines(path) if os.path.exists(path) else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a last line cut short by a kill
            continue
        if key in record and record.get("step", step + 1) <= step:
            found = record
    return found


def _read_lines(path: str) -> list[str]:
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _step(line: str) -> int | None:
    """The step of a metrics.jsonl record; None for a line that is not one (cut short by a kill)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class Progress:
    """A tqdm bar over training steps showing loss, img/s and ETA (process 0 only)."""

    def __init__(self, start: int, total: int, *, enabled: bool | None = None):
        enabled = jax.process_index() == 0 if enabled is None else enabled
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                initial=start,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                smoothing=0.1,
                mininterval=0.5,
            )

    def update(self, step: int, **postfix: float) -> None:
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

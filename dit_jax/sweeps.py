"""Sweeps: a config file's `sweep(arg)` -> named runs, one workdir each, and their state.

A config file may define, beside `get_config(arg)`, a `sweep(arg)` returning a list of override
dicts, one per run (big_vision style); `product` and `zip_` build the usual grids:

  def sweep(arg=""):
      return sweeps.product(
          sweeps.zip_({"model.hidden_size": [32, 64, 128], "optim.lr": [2e-3, 1e-3, 5e-4]}),
          {"total_steps": [300, 1000]},
      )

Each run trains with `dit-jax train --config=SPEC --workdir=ROOT/NAME --config.KEY=VALUE ...`, where
NAME says what the run overrides (`model.hidden_size=64,optim.lr=0.001`; see `run_name`).
`run_state` reads a run's state back from its workdir: checkpoints, metrics.jsonl and the
`sweep_run.json` a launcher leaves there. `launch/sweep.py` is the command line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import re
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dit_jax import config as config_lib
from dit_jax import config_files

MARKER = "sweep_run.json"  # what the launcher knows of a run's last attempt (state, pid, job id)
LOG = "train.log"
MAX_NAME = 120  # characters of a run name; longer ones are shortened (and get a hash)
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]")

Overrides = dict[str, Any]
TRAIN_FLAGS = ("--coordinator=", "--num_processes=", "--process_id=")  # dit-jax train's, besides --config.*


class SweepError(ValueError):
    """A user error in a sweep; the message is one line that names the run."""


# ----------------------------------------------------------------------------- building sweeps


def _axis_runs(axis: Mapping[str, Any] | Sequence[Mapping[str, Any]], combine) -> list[Overrides]:
    """One axis of `product` / `zip_` as a list of override dicts. A dict maps keys to lists of
    values (combined by `combine`; a value that is not a list or range is the same in every run);
    a list of dicts is taken as it is."""
    if isinstance(axis, Mapping):
        keys = list(axis)
        columns = [list(v) if isinstance(v, list | range) else [v] for v in axis.values()]
        return [dict(zip(keys, values, strict=True)) for values in combine(*columns)]
    runs = list(axis)
    if not all(isinstance(r, Mapping) for r in runs):
        raise SweepError(f"a sweep axis must be a dict of value lists or a list of dicts, got {axis!r}")
    return [dict(r) for r in runs]


def _merge(parts: Iterable[Overrides]) -> Overrides:
    out: Overrides = {}
    for part in parts:
        for key, value in part.items():
            if key in out:
                raise SweepError(f"sweep key {key!r} is set by two axes")
            out[key] = value
    return out


def _zip_columns(*columns: list) -> Iterable[tuple]:
    sizes = {len(c) for c in columns if len(c) != 1}
    if len(sizes) > 1:
        raise SweepError(f"zip_ needs value lists of one length, got lengths {sorted(sizes)}")
    n = sizes.pop() if sizes else 1
    return zip(*(c * n if len(c) == 1 else c for c in columns), strict=True)


def product(*axes: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Overrides]:
    """Every combination: `product({"a": [1, 2]}, {"b": [3, 4]})` -> 4 runs; the keys of one dict
    also combine: `product({"a": [1, 2], "b": [3, 4]})` is the same 4 runs. No axes: one run."""
    lists = [_axis_runs(axis, itertools.product) for axis in axes]
    return [_merge(parts) for parts in itertools.product(*lists)]


def zip_(*axes: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Overrides]:
    """Element-wise: `zip_({"model.hidden_size": [32, 64], "optim.lr": [2e-3, 1e-3]})` -> 2 runs;
    all lists (and axes) must have one length (a one-element list is repeated)."""
    lists = [_axis_runs(axis, _zip_columns) for axis in axes]
    sizes = {len(runs) for runs in lists if len(runs) != 1}
    if len(sizes) > 1:
        raise SweepError(f"zip_ needs axes of one length, got lengths {sorted(sizes)}")
    n = sizes.pop() if sizes else 1
    return [_merge(parts) for parts in zip(*(r * n if len(r) == 1 else r for r in lists), strict=True)]


# ----------------------------------------------------------------------------- values and names


def _plain(value: Any) -> Any:
    """NumPy scalars (np.logspace, np.arange) -> Python numbers."""
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def value_text(value: Any) -> str:
    """`value` as `--config.KEY=TEXT` spells it: config_files.parse_value(TEXT) gives it back."""
    value = _plain(value)
    if isinstance(value, str) and config_files.parse_value(value) == value:
        text = value  # a bare string: digits, cosine
    else:
        text = repr(value)
    back = config_files.parse_value(text)
    if back != value or type(back) is not type(value):
        raise SweepError(f"value {value!r} cannot be written as a command-line override")
    return text


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """["--config.model.hidden_size=64", ...] in the dict's order."""
    return [f"--config.{key}={value_text(value)}" for key, value in overrides.items()]


def short_hash(text: str) -> str:
    """8 hex digits of the SHA-1 of `text`."""
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def run_name(overrides: Mapping[str, Any]) -> str:
    """A readable, file-system-safe, stable name: `model.hidden_size=64,optim.lr=0.001` (keys sorted).

    Only [A-Za-z0-9._,=+-] are kept. Whenever the name is not the exact `key=value` list (a character
    replaced by `_`, or a name longer than MAX_NAME shortened to the last part of each key, then cut)
    a hash of the exact list is appended (`-1a2b3c4d`), so different runs never share a name. A run
    without overrides is `base`."""
    items = sorted((key, value_text(value)) for key, value in overrides.items())
    if not items:
        return "base"
    exact = ",".join(f"{k}={v}" for k, v in items)
    name = _UNSAFE.sub("_", exact.replace(", ", ","))
    if len(name) > MAX_NAME:
        leaves = [k.rsplit(".", 1)[-1] for k, _ in items]
        keys = leaves if len(set(leaves)) == len(leaves) else [k for k, _ in items]
        name = _UNSAFE.sub(
            "_", ",".join(f"{k}={v.replace(', ', ',')}" for k, (_, v) in zip(keys, items, strict=True))
        )
        name = name[: MAX_NAME - 9]
    return name if name == exact else f"{name}-{short_hash(exact)}"


# ----------------------------------------------------------------------------- expansion


@dataclasses.dataclass(frozen=True)
class Run:
    index: int  # position in the sweep, from 0
    name: str
    workdir: str
    overrides: Overrides
    total_steps: int  # of the run's full config: done once a checkpoint of this step exists


def _load_module(spec: str):
    name, _, _ = spec.partition(":")
    path = config_files.resolve(name)
    module_spec = importlib.util.spec_from_file_location(f"dit_jax_sweep_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, path


def load_sweep(spec: str) -> list[Overrides]:
    """The override dicts of the config file's `sweep(arg)` (arg: what follows `:` in `spec`)."""
    module, path = _load_module(spec)
    arg = spec.partition(":")[2]
    if not callable(getattr(module, "sweep", None)):
        raise SweepError(
            f"config file {path} has no sweep(arg) function; define one returning a list of override "
            "dicts, e.g. dit_jax.sweeps.product({'model.hidden_size': [32, 64]})"
        )
    runs = module.sweep(arg) if arg else module.sweep()
    if not isinstance(runs, list | tuple) or not runs:
        raise SweepError(
            f"sweep() of {path} returned {type(runs).__name__}; expected a non-empty list of dicts"
        )
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping) or not all(isinstance(k, str) for k in run):
            raise SweepError(f"sweep() of {path}: run {i + 1} is {run!r}; expected a dict of 'key': value")
    return [{k: _plain(v) for k, v in run.items()} for run in runs]


def default_root(spec: str) -> str:
    """runs/sweeps/<config name>[_<arg>] for `--config=spec`."""
    name, _, arg = spec.partition(":")
    base = os.path.splitext(os.path.basename(name))[0]
    return os.path.join("runs", "sweeps", _UNSAFE.sub("_", f"{base}_{arg}" if arg else base))


def expand(spec: str, root: str, extra_overrides: Sequence[str] = ()) -> list[Run]:
    """The runs of `spec`'s sweep under `root`, each checked against the config before any launches:
    an unknown key or an invalid value raises SweepError naming the key and the run.

    `extra_overrides` (`--config.KEY=VALUE` and the multi-process flags of `dit-jax train`, the same
    for every run) may not set a swept key."""
    sweep = load_sweep(spec)
    config_dict = config_files.load_config_file(spec)
    extra = [a for a in extra_overrides if not a.startswith(TRAIN_FLAGS)]
    try:
        config_files.apply_overrides(config_dict, extra)
    except ValueError as e:
        raise SweepError(f"arguments for every run: {e}") from None
    swept = {k for run in sweep for k in run}
    for arg in extra:
        key = arg[len("--config.") :].partition("=")[0]
        if key in swept:
            raise SweepError(f"{arg} sets {key!r}, which the sweep sets per run; drop it or change sweep()")
    runs, seen = [], {}
    for i, overrides in enumerate(sweep):
        where = (
            f"run {i + 1}/{len(sweep)} ({', '.join(f'{k}={v!r}' for k, v in overrides.items()) or 'base'})"
        )
        try:
            name = run_name(overrides)
            where = f"run {i + 1}/{len(sweep)} ({name})"
            values = config_files.apply_overrides(config_dict, [*override_args(overrides), *extra])
            cfg = config_lib.from_dict(values)
        except ValueError as e:  # ConfigError, SweepError
            raise SweepError(f"{where}: {e}") from None
        if name in seen:
            raise SweepError(
                f"runs {seen[name] + 1} and {i + 1} of the sweep are the same run ({name}); drop one"
            )
        seen[name] = i
        runs.append(Run(i, name, os.path.join(root, name), overrides, cfg.total_steps))
    return runs


# ----------------------------------------------------------------------------- run state


@dataclasses.dataclass(frozen=True)
class RunState:
    state: str  # pending, running, done, failed, or submitted (to a scheduler; not known here)
    step: int | None = None  # the newest logged or checkpointed step
    loss: float | None = None  # the last logged loss
    eval: dict[str, Any] = dataclasses.field(default_factory=dict)  # the last eval/* metrics
    note: str = ""  # exit code, pid, job id, ...


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the complete checkpoints (Orbax renames a step's directory to its number when done)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def read_metrics(workdir: str) -> tuple[int | None, float | None, dict[str, Any]]:
    """(last step, last loss, last eval/* metrics) of metrics.jsonl; Nones when absent."""
    step = loss = None
    evals: dict[str, Any] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return step, loss, evals
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                step = max(step or 0, int(record["step"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
            if "loss" in record:
                loss = record["loss"]
            found = {
                k[len("eval/") :]: v
                for k, v in record.items()
                if k.startswith("eval/") and k != "eval/num_samples"
            }
            evals = found or evals
    return step, loss, evals


def read_marker(workdir: str) -> dict[str, Any]:
    try:
        with open(os.path.join(workdir, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_marker(workdir: str, state: str, **fields: Any) -> None:
    """Records a launcher's view of the run (running + pid, failed + exit code, submitted + job id)."""
    os.makedirs(workdir, exist_ok=True)
    record = {"state": state, "host": socket.gethostname(), "time": time.time(), **fields}
    tmp = os.path.join(workdir, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(workdir, MARKER))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_state(workdir: str, total_steps: int) -> RunState:
    """done: a checkpoint of step >= total_steps; running: a launcher's process on this host is alive;
    failed: its last attempt exited non-zero; submitted: handed to a scheduler; else pending."""
    ckpts = checkpoint_steps(workdir)
    step, loss, evals = read_metrics(workdir)
    if ckpts:
        step = max(step or 0, ckpts[-1])
    marker = read_marker(workdir)
    state, note = "pending", ""
    if ckpts and ckpts[-1] >= total_steps:
        state = "done"
    elif marker.get("state") == "running" and marker.get("host") == socket.gethostname():
        if _alive(int(marker.get("pid", 0)) or -1):
            state, note = "running", f"pid {marker['pid']}"
    elif marker.get("state") == "failed":
        state, note = "failed", marker.get("reason", "")
    elif marker.get("state") == "submitted":
        state, note = "submitted", marker.get("job", "")
    elif marker.get("state") == "running":  # on another host
        state, note = "running", f"on {marker.get('host')}"
    return RunState(state, step, loss, evals, note)


def status_table(runs: Sequence[Run], states: Sequence[RunState]) -> str:
    """One row per run: name, state, step/total, last loss, last eval metrics, note."""
    rows = [("run", "state", "step", "loss", "eval", "note")]
    for run, s in zip(runs, states, strict=True):
        step = f"{'-' if s.step is None else s.step}/{run.total_steps}"
        loss = f"{s.loss:.4g}" if isinstance(s.loss, int | float) else "-"
        shown = list(s.eval.items())[:3]
        evals = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown)
        evals += " ..." if len(s.eval) > 3 else ""
        rows.append((run.name, s.state, step, loss, evals or "-", s.note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)

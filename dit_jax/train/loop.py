"""The training loop: data -> step -> metrics -> checkpoint -> sample grids.

Resume order: if `workdir/checkpoints` holds a checkpoint, the config is first compared with
workdir/config.json (keys outside config.RESUMABLE_KEYS must not change: ConfigError, nothing
touched), then the train state and the data iterator are restored from the newest readable
checkpoint and training continues from its step; only then is config.json rewritten. The random
stream is `fold_in(seed, step)`, so a resumed run reproduces an uninterrupted one, and the logs
after the restored step are dropped, so metrics.jsonl reads as one run (metrics.rewind).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from dit_jax import config as config_lib
from dit_jax import data as data_lib
from dit_jax import flops, grids, plan, sampling
from dit_jax.parallel import mesh as mesh_lib
from dit_jax.train import repa
from dit_jax.train import state as state_lib
from dit_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from dit_jax.train.metrics import MetricsWriter, Progress, last_record
from dit_jax.train.step import build_train_step, global_batch
from dit_jax.workdir import load_config, write_config

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `train`; the message says which checkpoint a re-run of the command resumes from."""

    def __init__(self, step: int | None):
        self.step = step
        super().__init__(
            f"interrupted; the checkpoint of step {step} is kept; re-run the same command to resume"
            if step is not None
            else "interrupted; no checkpoint was written yet; re-running the same command starts from step 0"
        )


def check_resume(cfg: config_lib.Config, workdir: str, step: int) -> None:
    """Before resuming the checkpoint of `step`: compares `cfg` with workdir/config.json, logs each
    changed key of config.RESUMABLE_KEYS and raises ConfigError naming every other one. Reads only."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        log.warning("%s not found: resuming step %d without checking the config against it", path, step)
        return
    changes = config_lib.diff(config_lib.to_dict(load_config(workdir)), config_lib.to_dict(cfg))
    fixed = [(k, old, new) for k, old, new in changes if not config_lib.is_resumable(k)]
    if fixed:
        listed = ", ".join(f"{k} ({old!r} → {new!r})" for k, old, new in fixed)
        raise config_lib.ConfigError(
            f"cannot resume {workdir} from its checkpoint of step {step} with a different {listed}: "
            "these keys define the train state or what is trained and cannot change on resume; set them "
            f"back to the values in {path}, or train in a new workdir"
        )
    for k, old, new in changes:
        log.info("resuming with a changed %s: %r → %r", k, old, new)


def count_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class Trainer:
    """Everything derived from (config, mesh) once: model spec, optimizer, shardings, jitted step."""

    def __init__(self, cfg: config_lib.Config, workdir: str, mesh: jax.sharding.Mesh | None = None):
        self.cfg = cfg
        self.workdir = workdir
        self.mesh = mesh or mesh_lib.make_mesh(cfg.mesh)
        mesh_lib.check_batch(cfg.batch_size, self.mesh)
        encoder = repa.make_encoder(cfg) if cfg.repa.weight > 0 else None
        self.encoder_params = encoder.params if encoder is not None else None
        self.encoder_flops = encoder.flops_per_image if encoder is not None else 0.0
        self.flops_per_step = flops.train_flops(cfg, encoder_flops_per_image=self.encoder_flops)
        self.spec, self.tx, self.shardings, self.step_fn = build_train_step(cfg, self.mesh, encoder)
        self.checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
        self._best: Checkpointer | None = None
        self._decoder: sampling.LatentDecoder | None = None
        self._sample_fn = None

    def decoder(self) -> sampling.LatentDecoder | None:
        """The VAE decoder of a latents run (None in pixel space), loaded and jitted on first use
        and reused by every sample grid and evaluation."""
        if self._decoder is None:
            self._decoder = sampling.make_decoder(self.cfg, self.mesh)
        return self._decoder

    def sample_fn(self):
        """The jitted sampler of cfg.sampler, built once: every grid and evaluation reuses its
        compilation."""
        if self._sample_fn is None:
            self._sample_fn = sampling.make_sample_fn(self.cfg, self.spec, self.cfg.sampler, self.mesh)
        return self._sample_fn

    def abstract_state(self) -> state_lib.TrainState:
        return abstract_with_shardings(state_lib.abstract_state(self.cfg, self.spec, self.tx), self.shardings)

    def restore_or_init(self, data_iter) -> state_lib.TrainState:
        """The train state (and the data iterator's position) of the newest readable checkpoint,
        or a new state when there is no checkpoint."""
        if self.checkpointer.latest_step() is None:
            return state_lib.init_state(self.cfg, self.spec, self.tx, self.shardings)
        step, state, data_state = self.checkpointer.restore(self.abstract_state(), set_aside_unreadable=True)
        if data_iter is not None and data_state:
            data_iter.set_state(data_state)
        log.info("resumed from step %d in %s", step, self.checkpointer.directory)
        return state

    def save(self, state: state_lib.TrainState, data_iter) -> None:
        step = int(jax.device_get(state.step))
        self.checkpointer.save(step, state, data_iter.get_state(), config_lib.to_dict(self.cfg))

    def sample_grid(self, state: state_lib.TrainState, step: int, writer: MetricsWriter) -> None:
        m = self.cfg.model
        per_class = self.cfg.grid_samples_per_class
        labels = sampling.balanced_labels(max(m.num_classes, 1) * per_class, m.num_classes)
        images = sampling.generate(
            self.cfg,
            self.spec,
            state.ema,
            labels,
            mesh=self.mesh,
            seed=self.cfg.seed,
            progress=False,
            decoder=self.decoder(),
            sample_fn=self.sample_fn(),
        )
        if jax.process_index() == 0:
            os.makedirs(os.path.join(self.workdir, "samples"), exist_ok=True)
            path = os.path.join(self.workdir, "samples", f"step_{step:07d}.png")
            grid = grids.save_grid_png(path, images, labels, m.num_classes, per_class)
            writer.write_image(step, "samples", grid)

    def evaluate(self, state: state_lib.TrainState, step: int, writer: MetricsWriter, data_iter) -> dict:
        """Samples eval.num_samples images (sharded), computes the run's metrics, logs them as
        eval/<name>, and keeps the best checkpoint by eval.best_metric in workdir/best."""
        from dit_jax.eval import evaluate as eval_lib

        cfg = self.cfg
        labels = sampling.balanced_labels(cfg.eval.num_samples, cfg.model.num_classes)
        images = sampling.generate(
            cfg,
            self.spec,
            state.ema,
            labels,
            mesh=self.mesh,
            seed=cfg.seed + 1,
            batch_size=cfg.eval.batch_size,
            progress=False,
            decoder=self.decoder(),
            sample_fn=self.sample_fn(),
        )
        metrics = eval_lib.run_metrics(cfg, images, labels if cfg.model.num_classes else None)
        writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
        name = cfg.eval.best_metric
        if not name:
            return metrics
        if name not in metrics:
            raise config_lib.ConfigError(
                f"config key 'eval.best_metric': {name!r} is not among the metrics {sorted(metrics)}"
            )
        best_dir = os.path.join(self.workdir, "best")
        record = os.path.join(best_dir, "best.json")
        old = None
        if os.path.exists(record):
            with open(record) as f:
                best = json.load(f)
            if best["metric"] == name:  # eval.best_metric may change on resume: then a new best starts
                old = best["value"]
        if eval_lib.is_better(name, metrics[name], old):
            self._best = self._best or Checkpointer(best_dir, keep=1)
            self._best.save(step, state, data_iter.get_state(), config_lib.to_dict(cfg))
            self._best.wait()
            if jax.process_index() == 0:
                with open(record, "w") as f:
                    json.dump({"metric": name, "value": metrics[name], "step": step}, f)
        return metrics

    def close(self) -> None:
        self.checkpointer.close()
        if self._best is not None:
            self._best.close()


def train(
    cfg: config_lib.Config, workdir: str, mesh: jax.sharding.Mesh | None = None
) -> state_lib.TrainState:
    """Trains (or resumes) until cfg.total_steps; returns the final state.

    Raises ConfigError, before anything in `workdir` is written, when a key outside
    config.RESUMABLE_KEYS differs from the run being resumed, and `Interrupted` on Ctrl-C."""
    trainer = Trainer(cfg, workdir, mesh)
    writer = None
    try:
        latest = trainer.checkpointer.latest_step()
        if latest is not None:
            check_resume(cfg, workdir, latest)
        elif os.path.exists(os.path.join(workdir, "config.json")):
            log.info(
                "no checkpoint in %s (an earlier run stopped before its first): starting from step 0", workdir
            )
        data_iter = data_lib.make_iterator(
            cfg.data, global_batch_size=cfg.batch_size, seed=cfg.seed, with_images=cfg.data.with_images
        )
        state = trainer.restore_or_init(data_iter)
        start = int(jax.device_get(state.step))
        totals = _totals_at(workdir, start, trainer) if start else (0.0, 0)
        write_config(workdir, cfg)
        if start >= cfg.total_steps:
            log.info("already trained to step %d (total_steps=%d)", start, cfg.total_steps)
            return state
        writer = MetricsWriter(workdir, start=start)
        with jax.set_mesh(trainer.mesh):
            state = _run(trainer, state, data_iter, start, writer, totals)
    except KeyboardInterrupt:
        trainer.checkpointer.wait()  # a save in flight completes and counts
        raise Interrupted(trainer.checkpointer.latest_step()) from None
    finally:
        trainer.close()
        if writer is not None:
            writer.close()
    return state


def _totals_at(workdir: str, start: int, trainer: Trainer) -> tuple[float, int]:
    """(training FLOPs, images seen) up to step `start` of the run being resumed: the last logged
    totals at or before `start`, plus the steps after them at the resumed run's own batch size
    (workdir/config.json, read before it is rewritten), so that a batch_size changed on resume
    keeps the totals exact."""
    old = load_config(workdir) if os.path.exists(os.path.join(workdir, "config.json")) else trainer.cfg
    per_step = flops.train_flops(old, encoder_flops_per_image=trainer.encoder_flops)
    record = last_record(workdir, start, "flops")
    if record is None or "images_seen" not in record:
        return start * per_step, start * old.batch_size
    gap = start - record["step"]
    return record["flops"] + gap * per_step, record["images_seen"] + gap * old.batch_size


def _device_memory() -> int | None:
    """Memory of one local device (bytes_limit of its memory stats); None where not reported (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def _every(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def _run(trainer: Trainer, state, data_iter, start: int, writer: MetricsWriter, totals: tuple[float, int]):
    cfg, mesh = trainer.cfg, trainer.mesh
    first = global_batch(next(data_iter), mesh)
    t0 = time.perf_counter()
    compiled = trainer.step_fn.lower(state, first, trainer.encoder_params).compile()
    compile_s = time.perf_counter() - t0
    memory, sizes = plan.compiled_memory(compiled), plan.state_bytes_of(state)
    log.info("memory per device: %s", plan.memory_line(sizes, memory, _device_memory()))
    if start == 0:
        writer.write(
            0,
            {
                "num_devices": jax.device_count(),
                "num_processes": jax.process_count(),
                "mesh": dict(mesh.shape),
                "num_params": count_params(state.params),
                "compile_s": compile_s,
                "state_bytes_per_device": sizes.per_device,
                "temp_bytes_per_device": memory["temp"],
                "flops_per_step": trainer.flops_per_step,
                "flops": 0.0,
                "images_seen": 0,
            },
        )
    # Model FLOP/s per device and MFU (where the device's peak for the compute dtype is known).
    peak = flops.device_peak(jax.devices()[0].device_kind, cfg.model.dtype)
    base_flops, base_images = totals
    progress = Progress(start, cfg.total_steps)
    pending: list[tuple[int, dict]] = []
    window = {"t": time.perf_counter(), "steps": 0}

    def drain() -> None:
        """Fetches metrics of dispatched steps: checks them, logs them, updates the bar."""
        for step, metrics in pending:
            m = jax.device_get(metrics)
            if m["nonfinite"]:
                last = trainer.checkpointer.latest_step()
                raise NonFiniteLoss(
                    f"loss became non-finite ({float(m['loss'])}) at step {step}; stopped without "
                    f"saving it (last good checkpoint: {'none' if last is None else f'step {last}'}). "
                    "Lower optim.lr, enable optim.grad_clip, or use float32."
                )
            window["steps"] += 1
            elapsed = max(time.perf_counter() - window["t"], 1e-9)
            img_per_s = window["steps"] * cfg.batch_size / elapsed
            progress.update(step, loss=float(m["loss"]), img_per_s=img_per_s)
            if _every(step, cfg.log_every) or step == cfg.total_steps:
                logged = {k: v for k, v in m.items() if k != "nonfinite"}  # loss, grad_norm, lr, ...
                flops_per_s = window["steps"] * trainer.flops_per_step / elapsed / jax.device_count()
                done = step - start
                logged.update(
                    img_per_s=img_per_s,
                    tflops_per_s_per_device=flops_per_s / 1e12,
                    flops=base_flops + done * trainer.flops_per_step,
                    images_seen=base_images + done * cfg.batch_size,
                )
                if peak:
                    logged["mfu"] = flops_per_s / peak
                writer.write(step, logged)
                window.update(t=time.perf_counter(), steps=0)
        pending.clear()

    batch = first
    try:
        for step in range(start + 1, cfg.total_steps + 1):
            if batch is None:
                batch = global_batch(next(data_iter), mesh)
            state, metrics = compiled(state, batch, trainer.encoder_params)
            batch = None
            drain()  # the previous step's metrics: fetched while this step runs
            pending.append((step, metrics))
            last = step == cfg.total_steps
            if last or any(_every(step, n) for n in (cfg.checkpoint_every, cfg.sample_every, cfg.eval_every)):
                drain()
            if last or _every(step, cfg.checkpoint_every):
                trainer.save(state, data_iter)
            if _every(step, cfg.sample_every):
                trainer.sample_grid(state, step, writer)
            if _every(step, cfg.eval_every):
                trainer.evaluate(state, step, writer, data_iter)
        drain()
    finally:
        progress.close()
    return state

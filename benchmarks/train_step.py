"""Train-step throughput: the jitted step exactly as `dit-jax train` builds it, on a synthetic batch.

  python benchmarks/train_step.py --config=configs/dit.py:variant=S/2 --batch_size=8 --steps=20 --json
  python benchmarks/train_step.py --config=configs/dit.py:variant=S/2 --batch_size=8 --steps=10 \
      --rounds=5 --torch_reference --json

Prints human-readable lines and, last, one JSON object: `step_s` (median seconds per step),
`img_per_s`, `tflops_per_s` (analytic model FLOPs, `dit_jax.flops.train_flops`), `mfu` (null where the
device peak is unknown, e.g. CPU), device, versions, config and batch. `--torch_reference` also
times diffusers' `DiTTransformer2DModel` (eager, AdamW, MSE on eps) in the same process,
alternating rounds of JAX and PyTorch steps so that both see the same machine load, and adds
`torch_step_s` and `speed_vs_torch` (= torch_step_s / step_s; > 1 means JAX is faster).

The PyTorch step is the step of DiT's train.py: forward, MSE on eps, backward, AdamW, and the EMA
update (`update_ema`, here with torch._foreach ops). It is lighter than ours only by the non-finite
guard and, for a learn-sigma config, the VLB term; diffusers' DiT carries its own timestep/label
embedder in every block (+7M parameters for S/2, negligible FLOPs). On a shared machine, pin the
process (`taskset -c N ... --torch_threads=1`) for ratios that other processes' load does not skew;
see benchmarks/results/README.md. `step_cpu_s` / `torch_step_cpu_s` / `cpu_speed_vs_torch` are the
same medians in process CPU seconds (all threads): with a one-core pin, the time the step actually
ran, without the time spent waiting for the core while other processes held it. `--also_attention
xla` adds the JAX step with another attention implementation to the same interleaved rounds (an A/B
that shares the machine's load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dit_jax.flops import device_peak, train_flops  # shared with `dit-jax plan` and the trainer


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/dit.py:variant=S/2", help="configs/<name>.py[:arg]")
    parser.add_argument("--batch_size", type=int, default=8, help="global batch (overrides the config)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and framework")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (JAX then PyTorch in each round)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument(
        "--torch_reference",
        action="store_true",
        help="also time diffusers' DiTTransformer2DModel (needs the `torch` extra)",
    )
    parser.add_argument("--torch_threads", type=int, default=0, help="0: the cores this process may use")
    parser.add_argument(
        "--also_attention",
        nargs="*",
        default=[],
        metavar="IMPL",
        help="also time the JAX step with config.attention.impl=IMPL (same process, interleaved rounds: "
        "an A/B comparison that shares the machine load), e.g. --also_attention xla",
    )
    return parser.parse_known_args(argv)


def build_config(spec: str, batch_size: int, overrides: list[str]):
    from dit_jax import config_files

    return config_files.load(spec, [f"--config.batch_size={batch_size}", *overrides])


def jax_stepper(cfg) -> tuple[Callable[[], None], dict[str, Any]]:
    """A closure running one train step (blocking), built exactly as `dit_jax.train.loop` does."""
    import jax

    from dit_jax.models import build
    from dit_jax.parallel import mesh as mesh_lib
    from dit_jax.train import state as state_lib
    from dit_jax.train.step import global_batch, make_train_step

    mesh = mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_batch(cfg.batch_size, mesh)
    spec = build.model_spec(cfg)
    tx = state_lib.optimizer(cfg)
    shardings = state_lib.state_shardings(cfg, spec, tx, mesh)
    step_fn = make_train_step(cfg, spec, tx, mesh, shardings)
    rng = np.random.default_rng(cfg.seed)
    m = cfg.model
    local = {
        "x": rng.uniform(-1, 1, (cfg.batch_size, m.image_size, m.image_size, m.in_channels)).astype(
            np.float32
        ),
        "y": rng.integers(0, max(m.num_classes, 1), (cfg.batch_size,)).astype(np.int32),
    }
    with jax.set_mesh(mesh):
        batch = global_batch(local, mesh)
        state = state_lib.init_state(cfg, spec, tx, shardings)
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batch, None).compile()
        compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def run() -> None:
        with jax.set_mesh(mesh):
            holder["state"], metrics = compiled(holder["state"], batch, None)
        jax.block_until_ready(metrics["loss"])

    info = {"compile_s": compile_s, "num_params": sum(x.size for x in jax.tree.leaves(state.params))}
    return run, info


def torch_stepper(cfg, threads: int) -> tuple[Callable[[], None], dict[str, Any]]:
    """One eager PyTorch train step of diffusers' DiT of the same shape, as DiT's train.py: MSE on the
    eps channels, AdamW, EMA update."""
    import torch
    from diffusers import DiTTransformer2DModel

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    m, o = cfg.model, cfg.optim
    if m.mlp_ratio != 4.0:
        print(f"warning: diffusers' DiT has mlp_ratio 4, the config {m.mlp_ratio}", file=sys.stderr)
    model = DiTTransformer2DModel(
        num_attention_heads=m.num_heads,
        attention_head_dim=m.hidden_size // m.num_heads,
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        num_layers=m.depth,
        sample_size=m.image_size,
        patch_size=m.patch_size,
        num_embeds_ada_norm=max(m.num_classes, 1),
    ).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
    )
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    b = cfg.batch_size
    x0 = torch.rand(b, m.in_channels, m.image_size, m.image_size) * 2 - 1
    labels = torch.randint(0, max(m.num_classes, 1), (b,))

    def run() -> None:
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (b,))
        a = (1 - t.float() / 1000).view(b, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        out = model(x_t, timestep=t, class_labels=labels).sample
        loss = torch.nn.functional.mse_loss(out[:, : m.in_channels], noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # DiT's update_ema: ema = decay * ema + (1 - decay) * param
            torch._foreach_mul_(ema, o.ema_decay)
            torch._foreach_add_(ema, params, alpha=1 - o.ema_decay)

    info = {"num_params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}
    return run, info


def time_steps(run: Callable[[], None], steps: int, cpu: list[float] | None = None) -> list[float]:
    """Wall seconds per step; also appends the process CPU seconds per step to `cpu` if given."""
    times = []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
    return times


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    import jax

    cfg = build_config(args.config, args.batch_size, overrides)
    device = jax.devices()[0]
    threads = args.torch_threads or len(os.sched_getaffinity(0))
    print(
        f"device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}), jax {jax.__version__}"
    )
    m = cfg.model
    print(
        f"model: depth {m.depth} width {m.hidden_size} heads {m.num_heads} patch {m.patch_size} "
        f"image {m.image_size}x{m.image_size}x{m.in_channels}, dtype {m.dtype}, "
        f"attention {cfg.attention.impl}, batch {cfg.batch_size}"
    )

    load_before = os.getloadavg()[0]  # other processes on the machine skew every timing; recorded
    jax_run, jax_info = jax_stepper(cfg)
    print(f"jax: {jax_info['num_params'] / 1e6:.2f}M params, compiled in {jax_info['compile_s']:.1f}s")
    runners = {"jax": jax_run}
    for impl in args.also_attention:
        alt_cfg = build_config(args.config, args.batch_size, [*overrides, f"--config.attention.impl={impl}"])
        runners[f"jax[{impl}]"], alt_info = jax_stepper(alt_cfg)
        print(f"jax[{impl}]: compiled in {alt_info['compile_s']:.1f}s")
    torch_info: dict[str, Any] = {}
    if args.torch_reference:
        try:
            torch_run, torch_info = torch_stepper(cfg, threads)
        except ImportError as e:
            print(f"--torch_reference needs the `torch` extra (torch, diffusers): {e}", file=sys.stderr)
            return 2
        print(f"torch: {torch_info['num_params'] / 1e6:.2f}M params, {torch_info['threads']} threads")
        runners["torch"] = torch_run
    for run in runners.values():
        time_steps(run, args.warmup)

    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu_times: dict[str, list[float]] = {name: [] for name in runners}
    round_ratios: list[dict[str, float]] = []
    for r in range(args.rounds):
        line = []
        for name, run in runners.items():
            t = time_steps(run, args.steps, cpu_times[name])
            times[name] += t
            line.append(f"{name} {statistics.median(t) * 1e3:.1f} ms")
        ratio = ""
        if "torch" in runners:
            last = {name: statistics.median(t[-args.steps :]) for name, t in times.items()}
            ratio = f"  (torch/jax {last['torch'] / last['jax']:.2f})"
            round_ratios.append({name: last["torch"] / t for name, t in last.items() if name != "torch"})
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(line) + ratio)

    step_s = statistics.median(times["jax"])
    flops = train_flops(cfg)
    peak = device_peak(device.device_kind, m.dtype) if jax.default_backend() != "cpu" else None
    result: dict[str, Any] = {
        "step_s": step_s,
        "img_per_s": cfg.batch_size / step_s,
        "tflops_per_s": flops / step_s / 1e12,
        "mfu": flops / step_s / (peak * jax.device_count()) if peak else None,
        "step_tflop": flops / 1e12,
        "compile_s": jax_info["compile_s"],
        "device": device.device_kind,
        "num_devices": jax.device_count(),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "config": args.config,
        "overrides": overrides,
        "batch": cfg.batch_size,
        "steps": args.steps * args.rounds,
        "attention": cfg.attention.impl,
        "dtype": m.dtype,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cores": len(os.sched_getaffinity(0)),
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "step_cpu_s": statistics.median(cpu_times["jax"]),
    }
    print(
        f"jax: {step_s * 1e3:.1f} ms/step, {result['img_per_s']:.1f} img/s, "
        f"{result['tflops_per_s'] * 1e3:.1f} GFLOP/s" + (f", MFU {result['mfu']:.1%}" if peak else "")
    )
    if "torch" in runners:
        import torch

        torch_s = statistics.median(times["torch"])
        result.update(
            torch_step_s=torch_s,
            speed_vs_torch=torch_s / step_s,
            torch=torch.__version__,
            torch_threads=torch_info["threads"],
            rounds_torch_over_jax=[round(r["jax"], 3) for r in round_ratios],
            torch_step_cpu_s=statistics.median(cpu_times["torch"]),
            cpu_speed_vs_torch=statistics.median(cpu_times["torch"]) / statistics.median(cpu_times["jax"]),
        )
        print(f"torch: {torch_s * 1e3:.1f} ms/step; JAX speed vs torch: {torch_s / step_s:.2f}x")
    alternatives = {}
    for impl in args.also_attention:
        name = f"jax[{impl}]"
        alt_s = statistics.median(times[name])
        alternatives[impl] = {"step_s": alt_s, "step_cpu_s": statistics.median(cpu_times[name])}
        line = f"{name}: {alt_s * 1e3:.1f} ms/step"
        if "torch" in runners:
            alternatives[impl].update(
                speed_vs_torch=torch_s / alt_s,
                cpu_speed_vs_torch=statistics.median(cpu_times["torch"]) / statistics.median(cpu_times[name]),
                rounds_torch_over_jax=[round(r[name], 3) for r in round_ratios],
            )
            line += f"; speed vs torch: {torch_s / alt_s:.2f}x"
        print(line)
    if alternatives:
        result["also_attention"] = alternatives
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`dit-jax` command line: train, sample, eval, encode, plan. Thin: parses, then calls the library.

User errors (bad config, missing files, damaged checkpoints, bad data) end with one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def cmd_train(args, overrides: list[str]) -> None:
    from dit_jax import config_files
    from dit_jax.train import loop

    cfg = config_files.load(args.config, overrides)
    loop.train(cfg, args.workdir)


def _output_dir_exists(flag: str, path: str | None) -> None:
    """Checked before any sampling: a missing output folder must not cost the run."""
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise FileNotFoundError(
            f"{flag}={path}: folder {os.path.dirname(os.path.abspath(path))} does not exist"
        )


def _sample_run(run, num_samples: int, seed: int, batch_size: int, sampler):
    from dit_jax import sampling

    labels = sampling.balanced_labels(num_samples, run.config.model.num_classes)
    cfg_note = f", guidance {sampler.cfg_scale}" if run.config.model.num_classes else ""
    print(
        f"sampling {num_samples} images from step {run.step} on {run.mesh.size} device(s): "
        f"{sampler.kind}, {sampler.num_steps} steps{cfg_note}, batch <= {batch_size}",
        flush=True,
    )
    images = sampling.generate(
        run.config,
        run.spec,
        run.params,
        labels,
        mesh=run.mesh,
        seed=seed,
        batch_size=batch_size,
        sampler=sampler,
    )
    return images, labels


def _with_sampler(cfg, kind=None, num_steps=None, cfg_scale=None):
    """The config with sampler overrides, validated against the objective (one-line ConfigError)."""
    import dataclasses

    from dit_jax import sampling

    sampler = sampling.with_overrides(cfg.sampler, kind=kind, num_steps=num_steps, cfg_scale=cfg_scale)
    return dataclasses.replace(cfg, sampler=sampler)


def cmd_sample(args, overrides: list[str]) -> None:
    import dataclasses

    from dit_jax import grids, sampling, workdir
    from dit_jax.config import ConfigError

    if overrides:
        raise ConfigError(f"unrecognised arguments: {' '.join(overrides)}; see `dit-jax sample --help`")
    if args.num_samples < 1 or args.batch_size < 1:
        raise ConfigError(
            f"--num_samples and --batch_size must be >= 1, got {args.num_samples}, {args.batch_size}"
        )
    _output_dir_exists("--output", args.output)
    _output_dir_exists("--grid", args.grid)
    cfg = _with_sampler(workdir.load_config(args.workdir), args.sampler, args.num_steps, args.cfg_scale)
    run = dataclasses.replace(workdir.load(args.workdir, best=args.best), config=cfg)
    images, labels = _sample_run(run, args.num_samples, args.seed, args.batch_size, cfg.sampler)
    sampling.save_npz(args.output, images, labels)
    if args.grid:
        grids.save_grid_png(args.grid, images, labels, cfg.model.num_classes, cfg.grid_samples_per_class)
    print(
        f"wrote {len(images)} samples from step {run.step} to {args.output}"
        + (f" and a grid to {args.grid}" if args.grid else "")
    )


def cmd_eval(args, overrides: list[str]) -> None:
    """Samples vs an ADM reference batch, or a training run's own metrics."""
    from dit_jax import workdir
    from dit_jax.config import ConfigError
    from dit_jax.eval import evaluate, load_samples

    if overrides:
        raise ConfigError(f"unrecognised arguments: {' '.join(overrides)}; see `dit-jax eval --help`")
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError(f"--num_samples must be >= 1, got {args.num_samples}")
    _output_dir_exists("--output", args.output)
    if args.reference:
        if not args.samples:
            raise ConfigError("--reference needs --samples=FILE.npz")
        images, _ = load_samples(args.samples)
        metrics = [m for m in args.metrics.split(",") if m]
        result = evaluate.compare_to_reference(images, args.reference, metrics, args.inception_weights)
        output = args.output or os.path.splitext(args.samples)[0] + "_eval.json"
    elif args.workdir:
        cfg = workdir.load_config(args.workdir)
        evaluate.check_run_metrics(cfg)  # before sampling: a run without metrics says so at once
        if args.samples:
            images, labels = load_samples(args.samples)
            step = None
        else:
            run = workdir.load(args.workdir, best=args.best)
            num = args.num_samples or cfg.eval.num_samples
            images, labels = _sample_run(run, num, args.seed, cfg.eval.batch_size, cfg.sampler)
            step = run.step
            labels = labels if cfg.model.num_classes else None
        result = {**({"step": step} if step is not None else {}), **evaluate.run_metrics(cfg, images, labels)}
        output = args.output or os.path.join(args.workdir, "eval.json")
    else:
        raise ConfigError("pass --workdir=DIR (a training run) or --samples=FILE.npz --reference=REF.npz")
    print(evaluate.write_result(output, result))


def cmd_reference(args, overrides: list[str]) -> None:
    from dit_jax.config import ConfigError
    from dit_jax.eval import evaluate, load_samples
    from dit_jax.eval.samples_io import EvalError

    if overrides:
        raise ConfigError(f"unrecognised arguments: {' '.join(overrides)}; see `dit-jax reference --help`")
    if os.path.isdir(args.images):
        images = _load_image_folder(args.images, args.image_size)
    elif os.path.isfile(args.images):
        images, _ = load_samples(args.images)
    else:
        raise EvalError(f"--images={args.images!r} is neither an .npz file nor a folder of images")
    shapes = evaluate.build_reference(images, args.output, args.inception_weights)
    print(f"wrote reference statistics of {len(images)} images to {args.output} ({shapes})")


def _load_image_folder(folder: str, size: int):
    """All images under `folder` (recursively), centre-cropped and resized to size×size RGB uint8."""
    import numpy as np

    from dit_jax.data.image_folder import IMAGE_EXTENSIONS, images_under, load_image
    from dit_jax.eval.samples_io import EvalError

    paths = sorted(images_under(folder))
    if not paths:
        raise EvalError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    return np.stack([load_image(path, size, 3) for path in paths])


def cmd_encode(args, overrides: list[str]) -> None:
    from dit_jax.config import ConfigError
    from dit_jax.data import encode

    if overrides:
        raise ConfigError(f"unrecognised arguments: {' '.join(overrides)}; see `dit-jax encode --help`")
    options = encode.EncodeOptions(
        **{
            f: getattr(args, f)
            for f in encode.EncodeOptions.__dataclass_fields__
            if getattr(args, f, None) is not None
        }
    )
    info, written = encode.encode(options)
    print(
        f"latents data set at {os.path.abspath(args.output)}: {info.num_examples} examples, latents "
        f"{'x'.join(map(str, info.latent_shape))} ({info.dtype}{', with flipped' if info.hflip else ''}"
        f"{', with images' if info.store_images else ''}), "
        f"{info.num_classes} classes; this process wrote {written} of {info.num_shards} shards"
    )


def cmd_convert(args, overrides: list[str]) -> None:
    """A published checkpoint -> a workdir for sample / eval / train (see dit_jax.interop.convert)."""
    from dit_jax.config import ConfigError
    from dit_jax.interop import convert

    if overrides:
        raise ConfigError(f"unrecognised arguments: {' '.join(overrides)}; see `dit-jax convert --help`")
    family = getattr(args, "from")
    cfg = convert.convert(family, args.input, args.output, vae=args.vae or "", num_heads=args.num_heads)
    m = cfg.model
    print(
        f"wrote {args.output}: {family} model, {m.depth} blocks of width {m.hidden_size}, "
        f"patch {m.patch_size}, {m.image_size}x{m.image_size}x{m.in_channels} inputs, "
        f"{m.num_classes} classes; sampler {cfg.sampler.kind} {cfg.sampler.num_steps} steps, "
        f"CFG {cfg.sampler.cfg_scale}"
    )


def cmd_classifier(args, overrides: list[str]) -> None:
    from dit_jax import config_files
    from dit_jax.eval import load_or_train_classifier

    cfg = config_files.load(args.config, overrides)
    classifier = load_or_train_classifier(cfg.data)
    print(f"digits classifier ready (test accuracy {classifier.test_accuracy:.3f})")


def _plan_backend(target: str) -> None:
    """Before any JAX backend starts: plan runs nothing on a device (CPU backend unless
    JAX_PLATFORMS says otherwise) and a `cpu:N` target needs N CPU devices."""
    import jax

    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    kind, _, count = target.partition(":")
    if kind == "cpu" and count.isdigit() and int(count) > 0:
        try:
            jax.config.update("jax_num_cpu_devices", int(count))
        except RuntimeError:  # backends already started (an in-process caller); targets.get checks the count
            pass


def cmd_plan(args, overrides: list[str]) -> None:
    """Compiles the train step ahead of time for --target and prints its per-device cost."""
    import json

    from dit_jax import config_files

    cfg = config_files.load(args.config, overrides)
    _plan_backend(args.target)
    from dit_jax import plan
    from dit_jax.parallel import targets

    report = plan.plan(cfg, targets.get(args.target))
    print(plan.format_table(report))
    if args.dump_hlo and report.hlo:
        with open(args.dump_hlo, "w") as f:
            f.write(report.hlo)
        print(f"compiled HLO written to {args.dump_hlo}")
    elif args.dump_hlo:
        print(f"no compiled HLO to write to {args.dump_hlo}: the compiler rejected the program")
    if args.json:
        print(json.dumps(report.to_dict()))
    if report.fits is False:  # after the report: a launch script can test the exit code
        over = (
            f"needs {plan.size_text(report.total_bytes_per_device)} per device, "
            f"{plan.size_text(report.total_bytes_per_device - report.device_memory_bytes)} more than "
            f"{plan.size_text(report.device_memory_bytes)}"
            if report.compile_error is None
            else f"the compiler rejects it ({report.compile_error})"
        )
        raise plan.PlanError(
            f"the train step does not fit {report.target}: {over}; per device: {plan.parts_line(report)}; "
            "shard more (mesh.fsdp, mesh.rules), lower batch_size, or set model.remat"
        )


def cmd_scaling(args, overrides: list[str]) -> None:
    """Scaling-law fit over training runs (dit_jax.scaling): frontier, a·C^(−b) + c, N_opt; plot + table."""
    import json

    from dit_jax import scaling, scaling_report
    from dit_jax.config import ConfigError

    if overrides:
        raise ConfigError(f"unrecognised arguments: {' '.join(overrides)}; see `dit-jax scaling --help`")
    for flag, value, ok, expected in (
        ("--predict_flops", args.predict_flops, args.predict_flops is None or args.predict_flops > 0, "> 0"),
        ("--min_flops", args.min_flops, args.min_flops >= 0, ">= 0"),
        ("--smooth", args.smooth, args.smooth is None or 0 <= args.smooth < 1, "in [0, 1)"),
        ("--num_bootstrap", args.num_bootstrap, args.num_bootstrap >= 10, ">= 10"),
    ):
        if not ok:
            raise ConfigError(f"{flag}={value}: expected a value {expected}")
    try:
        curves, skipped = scaling.collect(args.runs, args.metric, args.smooth)
        result = scaling.analyse(
            curves,
            args.metric,
            skipped=skipped,
            predict_flops=args.predict_flops,
            min_flops=args.min_flops,
            n_boot=args.num_bootstrap,
            seed=args.seed,
            smooth=scaling.default_smoothing(args.metric) if args.smooth is None else args.smooth,
        )
        output = args.output or scaling_report.default_output(curves)
        try:
            written = scaling_report.write_report(result, output)
        except OSError as e:
            raise scaling.ScalingError(f"cannot write the report into {output}: {e.strerror or e}") from None
    except scaling.ScalingError as e:
        raise ConfigError(str(e)) from None
    print(scaling_report.markdown(result))
    if skipped:
        print(f"left out (no {args.metric} logged): {', '.join(skipped)}", file=sys.stderr)
    if "png" not in written:
        print("matplotlib is not installed: no plot written (pip install matplotlib)", file=sys.stderr)
    print(f"wrote {', '.join(written.values())}")
    if args.json:
        print(json.dumps(result.to_dict()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    multi = argparse.ArgumentParser(add_help=False)
    multi.add_argument("--coordinator", help="host:port of process 0 for multi-process runs, or 'auto'")
    multi.add_argument("--num_processes", type=int)
    multi.add_argument("--process_id", type=int)
    train = sub.add_parser("train", parents=[multi], help="train or resume a model")
    train.add_argument("--config", required=True, help="NAME[:arg] (a packaged config) or PATH.py[:arg]")
    train.add_argument("--workdir", required=True)
    sample = sub.add_parser(
        "sample", parents=[multi], help="sample from the EMA weights of the latest checkpoint"
    )
    sample.add_argument("--workdir", required=True)
    sample.add_argument("--num_samples", type=int, required=True)
    sample.add_argument("--output", required=True, help="FILE.npz (ADM convention)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--cfg_scale", type=float)
    sample.add_argument("--num_steps", type=int)
    sample.add_argument("--sampler", choices=["euler", "heun", "ddpm", "ddim"])
    sample.add_argument("--batch_size", type=int, default=256, help="at most this many images per batch")
    sample.add_argument("--grid", help="also write a labelled PNG grid here")
    sample.add_argument(
        "--best", action="store_true", help="use workdir/best instead of the newest checkpoint"
    )
    evaluate = sub.add_parser("eval", parents=[multi], help="evaluate samples or a training run")
    evaluate.add_argument("--workdir", help="a training run: its metrics on fresh or given samples")
    evaluate.add_argument("--samples", help="FILE.npz in the ADM convention")
    evaluate.add_argument("--reference", help="ADM reference batch REF.npz (mu, sigma, mu_s, sigma_s, arr_0)")
    evaluate.add_argument("--metrics", default="fid,sfid,is,prec_recall", help="with --reference")
    evaluate.add_argument("--inception_weights", help="FID Inception weights (.pth or .npz)")
    evaluate.add_argument("--num_samples", type=int, help="with --workdir: default eval.num_samples")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--best", action="store_true", help="use workdir/best")
    evaluate.add_argument("--output", help="JSON file (default: workdir/eval.json or next to the samples)")
    reference = sub.add_parser("reference", parents=[multi], help="build ADM-format reference statistics")
    reference.add_argument("--images", required=True, help="FILE.npz (arr_0) or a folder of images")
    reference.add_argument("--output", required=True)
    reference.add_argument("--image_size", type=int, default=256, help="for a folder: centre-crop + resize")
    reference.add_argument("--inception_weights")
    enc = sub.add_parser(
        "encode", parents=[multi], help="precompute VAE latents of a data set (sharded, resumable)"
    )
    enc.add_argument("--data", required=True, help="'digits' or a folder with one sub-folder per class")
    enc.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder (config.json + weights)")
    enc.add_argument("--output", required=True, help="folder of the latents data set (re-run to resume)")
    enc.add_argument("--image_size", type=int, default=256, help="center crop + resize to this (pixels)")
    enc.add_argument("--hflip", action="store_true", help="also store latents of the flipped images")
    enc.add_argument("--batch_size", type=int, default=32, help="images per device per step")
    enc.add_argument("--data_dir", default="", help="where digits are prepared (default ~/.cache/dit_jax)")
    enc.add_argument("--split", default="train")
    enc.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="stored precision")
    enc.add_argument("--shard_size", type=int, default=1024, help="examples per shard file")
    enc.add_argument("--num_workers", type=int, default=8, help="image reading threads per process")
    enc.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    enc.add_argument(
        "--store_images",
        action="store_true",
        help="also store each encoded image (uint8, at --image_size), for REPA's encoder (data.with_images)",
    )
    conv = sub.add_parser("convert", parents=[multi], help="turn a published checkpoint into a workdir")
    conv.add_argument("--from", required=True, choices=["dit", "diffusers", "sit", "repa", "lightningdit"])
    conv.add_argument("--input", required=True, help="checkpoint .pt (diffusers: a model or pipeline folder)")
    conv.add_argument("--output", required=True, help="a new workdir")
    conv.add_argument("--vae", help="diffusers VAE folder that decodes samples (data.vae)")
    conv.add_argument("--num_heads", type=int, help="only for sizes outside the published variant table")
    classifier = sub.add_parser(
        "classifier", parents=[multi], help="train and cache the digits classifier for proxy metrics"
    )
    classifier.add_argument("--config", default="quickstart")
    plan = sub.add_parser(
        "plan", help="compile the train step ahead of time for a target: per-device memory, FLOPs, kernels"
    )
    plan.add_argument("--config", required=True, help="NAME[:arg] (a packaged config) or PATH.py[:arg]")
    plan.add_argument("--target", required=True, help="cpu:8, tpu:v5p:2x2x1, gpu:h100:1x8, ...")
    plan.add_argument("--json", action="store_true", help="end with one JSON object")
    plan.add_argument("--dump_hlo", help="write the compiled HLO text to this file")
    scaling = sub.add_parser(
        "scaling", help="fit metric-vs-compute scaling laws over training runs: frontier, fit, plot, table"
    )
    scaling.add_argument(
        "--runs", nargs="+", required=True, help="workdirs, or folders holding workdirs (e.g. a sweep root)"
    )
    scaling.add_argument(
        "--metric", default="loss", help="a metrics.jsonl key: loss, eval/fd_classifier, ..."
    )
    scaling.add_argument("--json", action="store_true", help="end with one JSON object")
    scaling.add_argument("--output", help="report folder (default: scaling/ in the folder holding the runs)")
    scaling.add_argument(
        "--predict_flops", type=float, help="predict the metric here (default: 10x the largest run)"
    )
    scaling.add_argument(
        "--smooth",
        type=float,
        help="trailing mean over this fraction of compute (default 0.1 for loss, 0 for eval metrics)",
    )
    scaling.add_argument("--min_flops", type=float, default=0.0, help="fit only frontier points from here on")
    scaling.add_argument("--num_bootstrap", type=int, default=200, help="bootstrap resamples")
    scaling.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("dit_jax").setLevel(logging.INFO)
    args, overrides = build_parser().parse_known_args(argv)
    coordinator = getattr(args, "coordinator", None)
    if coordinator not in (None, "auto") and (args.num_processes is None or args.process_id is None):
        print(
            f"dit-jax {args.command}: error: --coordinator needs --num_processes and --process_id",
            file=sys.stderr,
        )
        return 2
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    from dit_jax.config import ConfigError
    from dit_jax.data import DataError
    from dit_jax.eval import EvalError
    from dit_jax.interop import CheckpointFormatError
    from dit_jax.parallel.distributed import DistributedError
    from dit_jax.parallel.targets import TargetError
    from dit_jax.plan import PlanError
    from dit_jax.train.checkpoint import CheckpointError
    from dit_jax.train.loop import NonFiniteLoss
    from dit_jax.train.repa import RepaError

    user_errors = (
        ConfigError,
        DataError,
        CheckpointError,
        CheckpointFormatError,
        DistributedError,
        EvalError,
        NonFiniteLoss,
        RepaError,
        TargetError,
        PlanError,
        FileNotFoundError,
        FileExistsError,
    )
    from dit_jax.parallel import distributed

    try:
        distributed.initialize(
            coordinator, getattr(args, "num_processes", None), getattr(args, "process_id", None)
        )
        commands = {
            "train": cmd_train,
            "sample": cmd_sample,
            "eval": cmd_eval,
            "reference": cmd_reference,
            "classifier": cmd_classifier,
            "encode": cmd_encode,
            "convert": cmd_convert,
            "plan": cmd_plan,
            "scaling": cmd_scaling,
        }
        commands[args.command](args, overrides)
    except user_errors as e:
        print(f"dit-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if str(e):  # train's Interrupted says whether a checkpoint is kept
            message = str(e)
        elif args.command == "encode":
            message = "interrupted; finished shards are kept; re-run the same command to resume"
        else:
            message = "interrupted; nothing was written"
        print(f"dit-jax {args.command}: {message}", file=sys.stderr)
        return 130
    return 0

"""`dit-jax encode`: images -> VAE posterior latents, over all devices and processes, resumable.

Work is split into fixed shards of `shard_size` consecutive source images (see dit_jax.data.latents
for the format). Process p of P encodes shards p, p + P, p + 2P, ... on its own devices (a jit with
the batch split over a 1-D mesh of its local devices; the last batch of a shard is padded), so
processes never wait on each other until the end, where process 0 writes the TFDS metadata.

`batch_size` is per device: every device always encodes batches of that shape, so the latents do
not depend on how many devices or processes share the work, up to the backend's float rounding
(~1e-6 relative: XLA:CPU splits work by its thread count, XLA:GPU autotunes convolutions; in one
CPU process 1 and 8 devices give bitwise equal latents).

Each shard is written under a temporary name and renamed when complete, so an interrupted shard
never counts as finished. Re-running the same command skips the finished shards (present, and
readable with the expected number of records) and gives an identical data set; a different command
on the same output folder is refused.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dit_jax import config
from dit_jax.data import image_folder, latents, pixels, sources
from dit_jax.data.errors import DataError

log = logging.getLogger(__name__)

VAE_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_PREFETCH_BATCHES = 2
_TMP = ".tmp-"  # marks files (and folders) being written; never part of a finished data set
_HASH_CHUNK = 1 << 22


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """What `dit-jax encode` encodes. `batch_size` is per device; `num_workers` threads per
    process read and resize images."""

    data: str  # "digits" or a folder with one sub-folder of images per class
    vae: str  # diffusers AutoencoderKL folder (config.json + weights), or a pipeline folder with vae/
    output: str
    image_size: int = 256
    hflip: bool = False
    batch_size: int = 32
    data_dir: str = ""
    split: str = "train"
    dtype: str = "float32"
    shard_size: int = 1024
    num_workers: int = 8
    limit: int = 0  # encode only the first `limit` images of the split (0 = all)
    store_images: bool = False  # also store each encoded image as uint8 (for REPA's target encoder)

    def __post_init__(self):
        for key in ("image_size", "batch_size", "shard_size", "num_workers"):
            if getattr(self, key) <= 0:
                raise DataError(f"--{key}={getattr(self, key)} must be positive")
        if self.limit < 0:
            raise DataError(f"--limit={self.limit} must be >= 0 (0 = all images)")
        if self.dtype not in latents.DTYPES:
            raise DataError(f"--dtype={self.dtype!r}: expected one of {', '.join(latents.DTYPES)}")


# --- inputs ---------------------------------------------------------------------------------------


def _vae_files(path: str) -> tuple[str, str]:
    """(weights file, config.json) of a diffusers VAE folder, pipeline folder (vae/) or weights file."""
    if not os.path.exists(path):
        raise DataError(
            f"--vae={path!r} does not exist; pass a diffusers AutoencoderKL folder "
            f"(config.json + {VAE_WEIGHT_FILES[0]})"
        )
    if os.path.isdir(path):
        folder = path
        if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "vae")):
            folder = os.path.join(path, "vae")  # a diffusers pipeline folder
        found = [os.path.join(folder, f) for f in VAE_WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))]
        if not found:
            raise DataError(f"--vae={path!r} holds no {' or '.join(VAE_WEIGHT_FILES)}")
        weights = found[0]
    else:
        folder, weights = os.path.dirname(path), path
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise DataError(
            f"--vae={path!r}: no config.json in {folder!r}; pass a diffusers AutoencoderKL folder"
        )
    return weights, config_file


def _sha256(files: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


class _Digits:
    """The digits split via its TFDS builder, resized to image_size, grey repeated to `channels`."""

    def __init__(self, opts: EncodeOptions, channels: int):
        cfg = config.Data(
            source="digits", data_dir=opts.data_dir, image_size=opts.image_size, channels=1, num_classes=10
        )
        self.source = sources.make_source(cfg, opts.split)
        self.channels = channels
        self.class_names = tuple(str(k) for k in range(self.source.num_classes))
        self.name, self.digest = "digits", f"{self.source.builder.info.full_name}/{opts.split}"

    def __len__(self) -> int:
        return len(self.source)

    def load(self, indices: Sequence[int], pool) -> tuple[np.ndarray, np.ndarray]:
        elements = self.source.__getitems__(indices)
        x = np.stack([e["x"] for e in elements])
        return np.repeat(x, self.channels, axis=-1), np.array([e["y"] for e in elements], np.int64)


class _Folder:
    """A folder of class sub-folders, read directly (center crop + bicubic resize, as the builder)."""

    def __init__(self, opts: EncodeOptions, channels: int):
        path = os.path.abspath(os.path.expanduser(opts.data))
        if not os.path.isdir(path):
            raise DataError(
                f"--data={opts.data!r} is not a folder; pass 'digits' or a folder with one sub-folder "
                "of images per class"
            )
        if opts.split != "train":
            raise DataError(f"--split={opts.split!r}: an image folder has only the split 'train'")
        if channels not in image_folder.MODES:
            raise DataError(f"the VAE takes {channels}-channel images; only 1 or 3 are supported")
        try:
            classes, files = image_folder.scan_folder(path)
        except DataError as err:
            raise DataError(str(err).replace("data.path=", "--data=", 1)) from None
        self.files, self.channels, self.size = files, channels, opts.image_size
        self.class_names, self.name = tuple(classes), path
        listing = "".join(f"{os.path.relpath(f, path)}\t{label}\n" for f, label in files)
        self.digest = hashlib.sha256(listing.encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.files)

    def _one(self, index: int) -> np.ndarray:
        return pixels.from_uint8(image_folder.load_image(self.files[index][0], self.size, self.channels))

    def load(self, indices: Sequence[int], pool) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack(list(pool.map(self._one, indices)))
        return x, np.array([self.files[i][1] for i in indices], np.int64)


def plan(opts: EncodeOptions):
    """(LatentsInfo, images, VAE weights file), checking the inputs; loads no weights."""
    from dit_jax.interop import CheckpointFormatError
    from dit_jax.models.vae import VAEConfig

    vae = os.path.abspath(os.path.expanduser(opts.vae))
    weights, config_file = _vae_files(vae)
    try:
        with open(config_file) as f:
            vae_cfg = VAEConfig.from_diffusers(json.load(f))
    except (ValueError, TypeError) as err:
        raise CheckpointFormatError(f"--vae={opts.vae!r}: bad config.json ({err})") from err
    images = (
        _Digits(opts, vae_cfg.in_channels) if opts.data == "digits" else _Folder(opts, vae_cfg.in_channels)
    )
    factor = vae_cfg.downsample_factor
    if opts.image_size % factor:
        raise DataError(
            f"--image_size={opts.image_size} is not divisible by {factor}, the VAE's downsampling "
            f"factor; use a multiple of {factor}, e.g. {max(factor, opts.image_size // factor * factor)}"
        )
    size = opts.image_size // factor
    info = latents.LatentsInfo(
        source=images.name,
        source_digest=images.digest,
        split=opts.split,
        num_examples=min(len(images), opts.limit or len(images)),
        class_names=images.class_names,
        image_size=opts.image_size,
        image_channels=vae_cfg.in_channels,
        vae=vae,
        vae_digest=_sha256([config_file, weights]),
        scaling_factor=float(vae_cfg.scaling_factor),
        shift_factor=float(vae_cfg.shift_factor or 0.0),
        latent_shape=(size, size, vae_cfg.latent_channels),
        hflip=opts.hflip,
        dtype=opts.dtype,
        shard_size=opts.shard_size,
        store_images=opts.store_images,
    )
    return info, images, weights


# --- output folder --------------------------------------------------------------------------------


def _check_output(directory: str, info: latents.LatentsInfo) -> None:
    """Refuses a file, a folder of other files, or a latents data set of a different job."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise DataError(f"--output={directory!r} is a file; pass a folder for the latents data set")
    if not os.path.isdir(directory):
        return
    existing = latents.read_info(directory, key="--output")
    if existing is None:
        if [name for name in os.listdir(directory) if _TMP not in name]:
            raise DataError(f"--output={directory!r} already holds other files; choose a new or empty folder")
        return
    differences = info.differences(existing)
    if differences:
        raise DataError(
            f"--output={directory!r} holds a different latents data set ({'; '.join(differences)}); "
            "choose another --output, or delete that folder to start over"
        )


def _tmp_name(path: str) -> str:
    return f"{path}{_TMP}{uuid.uuid4().hex[:8]}"


def _atomic_write(path: str, text: str) -> None:
    tmp = _tmp_name(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_finished(path: str, expected: int) -> bool:
    """A shard counts as written when its final file opens with the expected number of records."""
    from array_record.python import array_record_module

    if not os.path.isfile(path):
        return False
    try:
        reader = array_record_module.ArrayRecordReader(path)
        try:
            return reader.num_records() == expected
        finally:
            reader.close()
    except (OSError, RuntimeError, ValueError):
        return False


def _write_shard(path: str, records: list[bytes]) -> None:
    from array_record.python import array_record_module

    for stale in glob.glob(glob.escape(path + _TMP) + "*"):
        os.remove(stale)
    tmp = _tmp_name(path)
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_tfds_metadata(directory: str, info: latents.LatentsInfo) -> None:
    """features.json, then dataset_info.json (the completion marker), each replaced atomically."""
    paths = latents.shard_paths(directory, info)
    split = tfds.core.SplitInfo(
        name=info.split,
        shard_lengths=info.shard_lengths,
        num_bytes=sum(os.path.getsize(p) for p in paths),
        filename_template=latents.file_template(directory, info.split),
    )
    identity = tfds.core.DatasetIdentity(
        name=latents.DATASET_NAME, version=tfds.core.Version("1.0.0"), data_dir=directory, module_name=""
    )
    dataset_info = tfds.core.DatasetInfo(
        builder=identity,
        features=latents.features(info),
        description=(
            f"VAE posterior latents {info.latent_shape} of {info.image_size}px images from {info.source} "
            f"({info.split}), encoded with {info.vae}{', with the images' if info.store_images else ''}; "
            "see metadata.json."
        ),
        supervised_keys=("mean", "label"),
    )
    dataset_info.set_file_format("array_record")
    dataset_info.set_splits(tfds.core.SplitDict([split]))
    staging = _tmp_name(os.path.join(directory, ".metadata"))
    os.makedirs(staging)
    dataset_info.write_to_directory(staging)
    for name in sorted(os.listdir(staging), key=lambda n: n == latents.COMPLETE_FILE):
        os.replace(os.path.join(staging, name), os.path.join(directory, name))
    os.rmdir(staging)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"dit_jax_encode_{name}")


# --- encoding -------------------------------------------------------------------------------------


class _Encoder:
    """jit(images float32 [B, H, W, C] in [-1, 1]) -> (mean, std[, mean_flipped, std_flipped]),
    B = batch_size per device x devices, split over a 1-D mesh of `devices`, the VAE replicated."""

    def __init__(self, vae, devices: Sequence[jax.Device], hflip: bool, batch_size: int):
        from flax import nnx

        mesh = Mesh(np.asarray(devices), ("data",))
        replicated, self.sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        self.batch_size = batch_size * len(devices)
        graphdef, params = nnx.split(vae)
        self.params = jax.device_put(params, replicated)

        def run(params, x_BHWC):
            model = nnx.merge(graphdef, params)
            out = tuple(model.encode(x_BHWC))
            return out + tuple(model.encode(x_BHWC[:, :, ::-1])) if hflip else out

        self._fn = jax.jit(run, in_shardings=(replicated, self.sharding), out_shardings=self.sharding)

    def __call__(self, x_BHWC: np.ndarray) -> tuple[jax.Array, ...]:
        pad = self.batch_size - len(x_BHWC)
        x_BHWC = np.pad(x_BHWC, [(0, pad)] + [(0, 0)] * 3) if pad else x_BHWC
        return self._fn(self.params, jax.device_put(x_BHWC, self.sharding))


def _load(images, indices: Sequence[int], pool, store_images: bool):
    """(images float32 [B, H, W, C] in [-1, 1], labels, the same images as uint8 or None): exact
    for images read as uint8 (image folders); digits resized in float are quantised to 1/255 here."""
    x, labels = images.load(indices, pool)
    return x, labels, pixels.to_uint8(x) if store_images else None


def _serialize(
    info: latents.LatentsInfo, outputs: Sequence[np.ndarray], labels: np.ndarray, pixels: np.ndarray | None
) -> list[bytes]:
    spec = latents.features(info)
    keys = ("mean", "std", "mean_flipped", "std_flipped")[: len(outputs)]
    dtype = np.dtype(info.dtype)
    records = []
    for i, label in enumerate(labels):
        example = {k: np.asarray(o[i], dtype) for k, o in zip(keys, outputs, strict=True)}
        if pixels is not None:
            example["image"] = pixels[i]
        records.append(spec.serialize_example({"label": int(label), **example}))
    return records


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="img",
        desc="encoding",
        dynamic_ncols=True,
        file=sys.stderr,
        smoothing=0.1,
    )


def encode(
    opts: EncodeOptions, *, devices: Sequence[jax.Device] | None = None, progress: bool = True
) -> tuple[latents.LatentsInfo, int]:
    """Encodes (or finishes encoding) the data set; returns its info and the number of shards this
    process wrote. `devices`: this process's devices to use (default: all local ones)."""
    from dit_jax.interop import load_diffusers_vae

    info, images, weights = plan(opts)
    directory = os.path.abspath(os.path.expanduser(opts.output))
    _check_output(directory, info)
    _sync("checked")
    paths = latents.shard_paths(directory, info)
    lengths = info.shard_lengths
    if jax.process_index() == 0:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as err:
            raise DataError(f"--output={opts.output!r}: cannot create the folder ({err})") from err
        _atomic_write(os.path.join(directory, latents.METADATA_FILE), json.dumps(info.to_dict(), indent=2))
        complete = os.path.join(directory, latents.COMPLETE_FILE)
        if os.path.exists(complete) and not all(map(shard_finished, paths, lengths)):
            os.remove(complete)  # a shard went missing: the data set is incomplete until re-encoded
    _sync("started")
    own = range(jax.process_index(), info.num_shards, jax.process_count())
    todo = [k for k in own if not shard_finished(paths[k], lengths[k])]
    if todo:
        log.info("encoding %d of %d shards into %s", len(todo), info.num_shards, directory)
        encoder = _Encoder(
            load_diffusers_vae(weights), devices or jax.local_devices(), opts.hflip, opts.batch_size
        )
        bar = _progress(sum(lengths[k] for k in own), sum(lengths[k] for k in own if k not in todo), progress)
        try:
            _encode_shards(info, images, encoder, todo, paths, opts.num_workers, bar)
        finally:
            if bar is not None:
                bar.close()
    _sync("encoded")
    if jax.process_index() == 0:
        missing = [
            os.path.basename(p) for p, n in zip(paths, lengths, strict=True) if not shard_finished(p, n)
        ]
        if missing:
            raise DataError(
                f"{len(missing)} shards of {directory!r} are missing ({missing[0]}, ...); "
                "re-run the same command to finish them"
            )
        _write_tfds_metadata(directory, info)
        for entry in os.scandir(directory):  # left by interrupted runs
            if _TMP in entry.name and entry.is_dir():
                shutil.rmtree(entry.path)
            elif _TMP in entry.name:
                os.remove(entry.path)
    _sync("done")
    return info, len(todo)


def _encode_shards(info, images, encoder: _Encoder, shards, paths, num_workers: int, bar) -> None:
    """Reads the next batches in threads while the devices encode; writes each shard when full."""
    batches = [
        (k, range(start, min(start + encoder.batch_size, info.shard_range(k).stop)))
        for k in shards
        for start in range(info.shard_range(k).start, info.shard_range(k).stop, encoder.batch_size)
    ]
    buffers: dict[int, list] = collections.defaultdict(list)

    def collect(shard: int, indices: range, outputs, labels: np.ndarray, pixels) -> None:
        outputs = [np.asarray(o)[: len(indices)] for o in jax.device_get(outputs)]
        buffers[shard].append(_serialize(info, outputs, labels, pixels))
        if indices.stop == info.shard_range(shard).stop:
            _write_shard(paths[shard], [r for chunk in buffers.pop(shard) for r in chunk])
        if bar is not None:
            bar.update(len(indices))

    with (
        concurrent.futures.ThreadPoolExecutor(num_workers) as pool,
        concurrent.futures.ThreadPoolExecutor(1) as reader,
    ):
        loads = collections.deque()
        for _, indices in batches[:_PREFETCH_BATCHES]:
            loads.append(reader.submit(_load, images, indices, pool, info.store_images))
        previous = None
        for b, (shard, indices) in enumerate(batches):
            x, labels, pixels = loads.popleft().result()
            if b + _PREFETCH_BATCHES < len(batches):
                next_indices = batches[b + _PREFETCH_BATCHES][1]
                loads.append(reader.submit(_load, images, next_indices, pool, info.store_images))
            outputs = encoder(x)  # dispatched asynchronously; the previous batch is saved meanwhile
            if previous is not None:
                collect(*previous)
            previous = (shard, indices, outputs, labels, pixels)
        if previous is not None:
            collect(*previous)

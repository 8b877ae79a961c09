"""Precomputed VAE latents (written by `dit-jax encode`) as a TFDS ArrayRecord data set.

Layout of the data set folder DIR (`tfds.builder_from_directory(DIR)` reads it, without TensorFlow):

    metadata.json      `LatentsInfo`: what was encoded, with which VAE, latent shape, classes;
                       written first (it identifies the job when resuming)
    features.json      TFDS feature spec
    dataset_info.json  TFDS split info; written last, so its presence marks a complete data set
    dit_latents-<split>.array_record-<shard>-of-<num_shards>
                       `shard_size` examples per shard, in the source's order

Each record holds the VAE posterior of one image, "mean" and "std" ([h, w, c], float32, or
float16 with `--dtype=float16`), "label", with `--hflip` also "mean_flipped" / "std_flipped",
the posterior of the horizontally flipped image, and with `--store_images` also "image", the
uint8 [H, W, C] image that was encoded (C = the VAE's input channels; its flip is the mirrored
array, not stored), for encoders of the clean image such as REPA's.

Training (`data.source = "latents"`, `data.path = DIR`) samples x = (mean + std * eps - shift_factor)
* scaling_factor with eps ~ N(0, I) drawn from (seed, stream position) — the position encodes
(epoch, index within the epoch) — so a resumed run sees exactly the latents it would have seen.
Where flipped latents are stored, the same draw picks plain or flipped with probability 1/2, and
the image (where asked for) is mirrored exactly when the flipped latent is picked.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from grain.experimental import ShapeDtypeStruct

from dit_jax import config
from dit_jax.data import records
from dit_jax.data.errors import DataError

DATASET_NAME = "dit_latents"
FORMAT = "dit_latents/1"
METADATA_FILE = "metadata.json"
COMPLETE_FILE = "dataset_info.json"
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
DTYPES = ("float32", "float16")
# Fields that may differ between the run that started a data set and the one that resumes it.
NOT_IDENTITY = ("vae",)
# Fields added after the first version of the format, with the value metadata without them means.
OPTIONAL_FIELDS = {"store_images": False}


@dataclasses.dataclass(frozen=True)
class LatentsInfo:
    """The metadata of a latents data set (metadata.json). `image_size` is in pixels."""

    source: str  # "digits" or the absolute path of the image folder
    source_digest: str  # hash of the source's file listing (image folders) or its name
    split: str
    num_examples: int
    class_names: tuple[str, ...]
    image_size: int
    image_channels: int
    vae: str  # absolute path of the diffusers VAE folder or weights file used to encode
    vae_digest: str  # sha256 of its config.json and weights
    scaling_factor: float
    shift_factor: float
    latent_shape: tuple[int, int, int]
    hflip: bool
    dtype: str
    shard_size: int
    store_images: bool = False  # each record also holds the uint8 image that was encoded
    format: str = FORMAT

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of the stored images (with `store_images`): uint8 [H, W, C]."""
        return (self.image_size, self.image_size, self.image_channels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_shards(self) -> int:
        return -(-self.num_examples // self.shard_size)

    def shard_range(self, shard: int) -> range:
        """Source indices held by `shard`."""
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_examples))

    @property
    def shard_lengths(self) -> list[int]:
        return [len(self.shard_range(k)) for k in range(self.num_shards)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LatentsInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or values.get("format") != FORMAT:
            raise ValueError(f"not {FORMAT} metadata")
        values = {**OPTIONAL_FIELDS, **values}
        if set(values) != names:
            raise ValueError(f"not {FORMAT} metadata (fields {sorted(set(values) ^ names)})")
        values["class_names"] = tuple(values["class_names"])
        values["latent_shape"] = tuple(values["latent_shape"])
        return cls(**values)

    def differences(self, other: LatentsInfo) -> list[str]:
        """'key: A there, B here' for every identity field where `other` (on disk) differs."""
        out = []
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name not in NOT_IDENTITY and mine != theirs:
                if f.name == "class_names":
                    mine, theirs = f"{len(mine)} classes", f"{len(theirs)} classes"
                out.append(f"{f.name}: {theirs!r} there, {mine!r} here")
        return out


def features(info: LatentsInfo) -> tfds.features.FeaturesDict:
    """The TFDS feature spec of one record (tensors stored as raw bytes: exact, compact)."""

    def tensor() -> tfds.features.Tensor:
        return tfds.features.Tensor(
            shape=info.latent_shape, dtype=np.dtype(info.dtype), encoding=tfds.features.Encoding.BYTES
        )

    spec = {"mean": tensor(), "std": tensor(), "label": tfds.features.ClassLabel(names=info.class_names)}
    if info.hflip:
        spec.update(mean_flipped=tensor(), std_flipped=tensor())
    if info.store_images:
        spec["image"] = tfds.features.Tensor(
            shape=info.image_shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
        )
    return tfds.features.FeaturesDict(spec)


def file_template(directory: str, split: str) -> tfds.core.ShardedFileTemplate:
    return tfds.core.ShardedFileTemplate(
        data_dir=tfds.core.Path(directory),
        template=FILE_TEMPLATE,
        dataset_name=DATASET_NAME,
        split=split,
        filetype_suffix="array_record",
    )


def shard_paths(directory: str, info: LatentsInfo) -> list[str]:
    return [os.fspath(p) for p in file_template(directory, info.split).sharded_filepaths(info.num_shards)]


def read_info(directory: str, *, key: str = "data.path") -> LatentsInfo | None:
    """The metadata in `directory`, None when it has none; raises DataError when it is unreadable."""
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return LatentsInfo.from_dict(json.load(f))
    except (OSError, ValueError, TypeError) as err:
        raise DataError(
            f"{key}={directory!r}: {path} is not dit-jax latents metadata ({err}); "
            "point it at a folder written by `dit-jax encode`"
        ) from err


def load_info(directory: str) -> LatentsInfo:
    """The metadata of a complete latents data set at `directory` (data.path); DataError otherwise."""
    directory = os.path.abspath(os.path.expanduser(directory))
    if not os.path.isdir(directory):
        raise DataError(
            f"data.path={directory!r} does not exist; write a latents data set there with "
            f"`dit-jax encode --output={directory} ...` first"
        )
    info = read_info(directory)
    if info is None:
        raise DataError(
            f"data.path={directory!r} is not a latents data set (no {METADATA_FILE}); "
            "write one with `dit-jax encode`"
        )
    if not os.path.isfile(os.path.join(directory, COMPLETE_FILE)):
        raise DataError(
            f"data.path={directory!r} is an unfinished latents data set (its encoding was interrupted); "
            "re-run the same `dit-jax encode` command to finish it"
        )
    return info


def vae_path(cfg: config.Data, info: LatentsInfo) -> str:
    """The VAE that decodes samples: data.vae, or the one the data set was encoded with."""
    path = os.path.abspath(os.path.expanduser(cfg.vae)) if cfg.vae else info.vae
    if not os.path.exists(path):
        key = "data.vae" if cfg.vae else f"the VAE recorded in {cfg.path}/{METADATA_FILE} (data.vae unset)"
        raise DataError(f"{key}: {path!r} does not exist; set data.vae to the diffusers VAE folder")
    return path


def check_matches(cfg: config.Data, info: LatentsInfo) -> None:
    """Raises DataError, naming the config key, where the config does not fit the data set."""
    h, w, c = info.latent_shape
    name = f"the latents data set {cfg.path!r} ({h}x{w}x{c} latents of {info.image_size}px images)"
    if cfg.image_size != h:
        raise DataError(
            f"data.image_size={cfg.image_size} but {name} has latent size {h}; with data.source='latents' "
            f"data.image_size is the latent size: set data.image_size and model.image_size to {h}"
        )
    if cfg.channels != c:
        raise DataError(
            f"data.channels={cfg.channels} but {name} has {c} latent channels; "
            f"set data.channels and model.in_channels to {c}"
        )
    if cfg.num_classes not in (0, info.num_classes):
        raise DataError(
            f"data.num_classes={cfg.num_classes} but {name} has {info.num_classes} classes; set "
            "data.num_classes (and model.num_classes) to match, or 0 for unconditional"
        )
    if cfg.hflip and not info.hflip:
        raise DataError(
            f"data.hflip=True but {name} holds no flipped latents; re-encode with "
            "`dit-jax encode --hflip` or set data.hflip=False"
        )


def check_images(cfg: config.Data, info: LatentsInfo) -> None:
    """Raises DataError where the run asks for the clean images (data.with_images) but the data
    set at data.path does not store them."""
    if not info.store_images:
        raise DataError(
            f"data.with_images=True but the latents data set {cfg.path!r} stores no images; "
            "re-encode it with `dit-jax encode --store_images` (into a new --output folder)"
        )


class LatentSource(records.ArrayRecordSource):
    """Random-access source of stored records {"mean", "std", ["mean_flipped", "std_flipped"],
    ["image"], "y"}.

    Pickles as (directory, split) and reopens lazily, like the image sources."""

    def __init__(self, directory: str, split: str, info: LatentsInfo):
        super().__init__(split, info.num_examples)
        self.directory = directory
        self.info = info

    @property
    def element_spec(self) -> dict[str, ShapeDtypeStruct]:
        keys = ("mean", "std", "mean_flipped", "std_flipped") if self.info.hflip else ("mean", "std")
        spec = {k: ShapeDtypeStruct(self.info.latent_shape, np.dtype(self.info.dtype)) for k in keys}
        if self.info.store_images:
            spec["image"] = ShapeDtypeStruct(self.info.image_shape, np.uint8)
        return {**spec, "y": ShapeDtypeStruct((), np.int32)}

    def __repr__(self) -> str:
        return f"LatentSource({self.directory!r}, split={self.split!r}, latents={self.info.latent_shape})"

    def _builder(self) -> tfds.core.DatasetBuilder:
        return tfds.builder_from_directory(self.directory)

    def _open_failed(self, err: Exception) -> str:
        return (
            f"data.path={self.directory!r}: cannot open split {self.split!r} of the latents data "
            f"set ({err}); re-run `dit-jax encode` into a fresh folder"
        )

    def _read_failed(self, err: Exception) -> str:
        return (
            f"the latents data set at {self.directory!r} is missing shards or is corrupt ({err}); "
            "re-run the `dit-jax encode` command that wrote it (finished shards are kept)"
        )

    def _convert(self, record: dict) -> dict[str, np.ndarray]:
        out = {k: np.asarray(v) for k, v in record.items() if k != "label"}
        return {**out, "y": np.int32(record["label"])}


class LatentSampler:
    """Grain `map_with_index` transform: stored posterior -> {"x": diffusion latent float32, "y"},
    with `with_images` also "image" (the stored uint8 image, mirrored iff the flipped latent is
    drawn).

    Draws from Philox(seed, stream position), so resuming replays the same latents (and images)."""

    def __init__(self, seed: int, info: LatentsInfo, with_images: bool = False):
        if with_images and not info.store_images:
            raise DataError("with_images=True but the latents data set stores no images")
        self.seed = seed
        self.scaling_factor = info.scaling_factor
        self.shift_factor = info.shift_factor
        self.hflip = info.hflip
        self.with_images = with_images

    def __call__(self, position: int, element: dict) -> dict:
        rng = np.random.Generator(np.random.Philox(key=[self.seed, int(position)]))
        flip = bool(self.hflip and rng.integers(2))
        suffix = "_flipped" if flip else ""
        mean = np.asarray(element["mean" + suffix], np.float32)
        std = np.asarray(element["std" + suffix], np.float32)
        eps = rng.standard_normal(mean.shape, dtype=np.float32)
        x = (mean + std * eps - np.float32(self.shift_factor)) * np.float32(self.scaling_factor)
        out = {"x": x.astype(np.float32), "y": element["y"]}
        if self.with_images:
            image = np.asarray(element["image"], np.uint8)
            out["image"] = np.ascontiguousarray(image[:, ::-1]) if flip else image
        return out


def mode_latent(element: dict, info: LatentsInfo) -> np.ndarray:
    """The posterior mean as a diffusion latent (no noise, not flipped)."""
    mean = np.asarray(element["mean"], np.float32)
    return ((mean - np.float32(info.shift_factor)) * np.float32(info.scaling_factor)).astype(np.float32)


def make_source(cfg: config.Data, split: str = "train") -> LatentSource:
    """The latents data set at data.path, checked against the config."""
    directory = os.path.abspath(os.path.expanduser(cfg.path))
    info = load_info(directory)
    if split != info.split:
        raise DataError(
            f"split {split!r} does not exist for data.source='latents' at {cfg.path!r}; "
            f"available splits: {info.split}"
        )
    check_matches(cfg, info)
    source = LatentSource(directory, split, info)
    source.check_readable()
    return source

"""Random-access sources: {"x": float32 [H, W, C] in [-1, 1], "y": int32} for every `data.source`.

TFDS data sets (digits, image folder) are prepared on first use into `data.data_dir` (default
~/.cache/dit_jax/datasets) and read back from ArrayRecord files without TensorFlow. Their uint8
pixels are scaled to [-1, 1] and, where `data.image_size` differs from the stored size, resized
(bilinear, per channel in float32, antialiased when shrinking).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from grain.experimental import ShapeDtypeStruct
from PIL import Image

from dit_jax import config
from dit_jax.data import digits, image_folder, latents, pixels, records, synthetic
from dit_jax.data.errors import DataError

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "dit_jax", "datasets")
_LOAD_CHUNK = 1024


class TfdsImageSource(records.ArrayRecordSource):
    """A prepared TFDS image data set's split; pickles as (builder, split) and reopens lazily."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str, image_size: int):
        super().__init__(split, builder.info.splits[split].num_examples)
        self.builder = builder
        self.image_size = image_size
        stored = builder.info.features["image"].shape
        self.stored_size, self.channels = stored[0], stored[2]
        self.num_classes = builder.info.features["label"].num_classes

    @property
    def element_spec(self) -> dict[str, ShapeDtypeStruct]:
        shape = (self.image_size, self.image_size, self.channels)
        return {"x": ShapeDtypeStruct(shape, np.float32), "y": ShapeDtypeStruct((), np.int32)}

    def __repr__(self) -> str:
        return f"TfdsImageSource({self.builder.info.full_name}, split={self.split!r}, size={self.image_size})"

    def _builder(self) -> tfds.core.DatasetBuilder:
        return self.builder

    def _read_failed(self, err: Exception) -> str:
        return (
            f"the prepared data set at {self.builder.data_dir!r} is missing or corrupt ({err}); "
            "delete that folder and run again to prepare it afresh"
        )

    _open_failed = _read_failed

    def _convert(self, record: dict) -> dict[str, np.ndarray]:
        x = pixels.from_uint8(record["image"])
        if self.image_size != self.stored_size:
            x = resize_bilinear(x, self.image_size)
        return {"x": x, "y": np.int32(record["label"])}


def resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """Resizes float32 [H, W, C] to [size, size, C] with PIL's bilinear filter, channel by channel."""
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(x[..., c]), mode="F").resize(
                (size, size), Image.Resampling.BILINEAR
            )
        )
        for c in range(x.shape[-1])
    ]
    return np.clip(np.stack(channels, axis=-1), -1.0, 1.0).astype(np.float32)


def data_dir(cfg: config.Data) -> str:
    """Where TFDS data sets are prepared: `data.data_dir`, or ~/.cache/dit_jax/datasets."""
    return os.path.abspath(os.path.expanduser(cfg.data_dir or DEFAULT_DATA_DIR))


def _builder(cfg: config.Data) -> tfds.core.DatasetBuilder:
    if cfg.source == "digits":
        return digits.Digits(data_dir=data_dir(cfg))
    if cfg.source == "image_folder":
        folder = image_folder.ImageFolderConfig.create(cfg.path, cfg.image_size, cfg.channels)
        return image_folder.ImageFolder(config=folder, data_dir=data_dir(cfg))
    raise DataError(f"data.source={cfg.source!r} is not a TFDS data set")


def prepare(cfg: config.Data) -> tfds.core.DatasetBuilder:
    """The data set's builder, prepared into `data_dir(cfg)` on first use (a no-op afterwards)."""
    builder = _builder(cfg)
    if builder.is_prepared():
        return builder
    try:
        os.makedirs(builder.data_dir_root, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"data.data_dir: cannot create {builder.data_dir_root!r} ({err}); "
            "set data.data_dir to a writable folder"
        ) from err
    try:
        builder.download_and_prepare(file_format="array_record")
    except DataError:
        raise
    except Exception:
        # Another process may have prepared the same data set concurrently; that is fine.
        builder = _builder(cfg)
        if not builder.is_prepared():
            raise
    return builder


def _check_split(cfg: config.Data, split: str, available: Sequence[str]) -> None:
    if split not in available:
        raise DataError(
            f"split {split!r} does not exist for data.source={cfg.source!r}; "
            f"available splits: {', '.join(sorted(available))}"
        )


def _check_matches(cfg: config.Data, source: TfdsImageSource) -> None:
    name = "digits" if cfg.source == "digits" else f"image folder {cfg.path!r}"
    if cfg.channels != source.channels:
        plural = "channel" if source.channels == 1 else "channels"
        raise DataError(
            f"data.channels={cfg.channels} but the {name} data set has {source.channels} {plural}; "
            f"set data.channels (and model.in_channels) to {source.channels}"
        )
    if cfg.num_classes not in (0, source.num_classes):
        raise DataError(
            f"data.num_classes={cfg.num_classes} but the {name} data set has {source.num_classes} "
            "classes; set data.num_classes (and model.num_classes) to match, or 0 for unconditional"
        )


def make_source(
    cfg: config.Data, split: str = "train"
) -> TfdsImageSource | synthetic.SyntheticSource | latents.LatentSource:
    """Random-access source (len, [i], element_spec) of `split`, preparing TFDS data on first use.

    A latents source yields the stored posterior; the pipeline draws {"x", "y"} from it."""
    if cfg.image_size <= 0:
        raise DataError(f"data.image_size={cfg.image_size} must be positive")
    if cfg.source == "latents":
        return latents.make_source(cfg, split)
    if cfg.source == "synthetic":
        _check_split(cfg, split, list(synthetic.SPLIT_LENGTHS))
        return synthetic.SyntheticSource(
            image_size=cfg.image_size, channels=cfg.channels, num_classes=cfg.num_classes, split=split
        )
    builder = prepare(cfg)
    _check_split(cfg, split, list(builder.info.splits))
    source = TfdsImageSource(builder, split, cfg.image_size)
    _check_matches(cfg, source)
    source.check_readable()
    return source


def num_examples(cfg: config.Data, split: str = "train") -> int:
    """Number of examples in `split` (prepares TFDS data on first use)."""
    return len(make_source(cfg, split))


def load_split_arrays(cfg: config.Data, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """A whole split in memory: images float32 [N, H, W, C] in [-1, 1] and int32 labels [N].

    For latents: the posterior means, scaled as the diffusion model sees them."""
    source = make_source(cfg, split)
    is_latent = isinstance(source, latents.LatentSource)
    shape = source.info.latent_shape if is_latent else source.element_spec["x"].shape
    images = np.empty((len(source), *shape), np.float32)
    labels = np.empty((len(source),), np.int32)
    for start in range(0, len(source), _LOAD_CHUNK):
        stop = min(start + _LOAD_CHUNK, len(source))
        for offset, element in enumerate(source.__getitems__(range(start, stop))):
            images[start + offset] = latents.mode_latent(element, source.info) if is_latent else element["x"]
            labels[start + offset] = element["y"]
    return images, labels

"""TFDS builder for a folder of the user's own images, one sub-folder per class, in ArrayRecord.

Layout: `path/<class name>/**/<image>`; class names sorted give labels 0..K-1. Every image is opened
with PIL, converted to RGB (or L for one channel), center-cropped to a square and resized (bicubic)
to `image_size`, then stored as uint8 [image_size, image_size, channels].

Each (folder, image size, channels, file listing) gets its own builder config, named by a hash, so
different folders (or a folder whose files changed) never collide inside the same `data_dir`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dit_jax.data.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MODES = {1: "L", 3: "RGB"}


def scan_folder(path: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted sub-folders) and (image file, label) pairs; raises DataError on bad input."""
    if not os.path.exists(path):
        raise DataError(
            f"data.path={path!r} does not exist; point data.path at a folder with one sub-folder "
            "of images per class"
        )
    if not os.path.isdir(path):
        raise DataError(
            f"data.path={path!r} is a file, not a folder; point data.path at a folder with one "
            "sub-folder of images per class"
        )
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(
            f"data.path={path!r} has no class sub-folders; put the images of each class in their "
            f"own sub-folder, e.g. {os.path.join(path, 'class_a', '0001.png')}"
        )
    files = []
    for label, name in enumerate(classes):
        found = sorted(images_under(os.path.join(path, name)))
        if not found:
            raise DataError(
                f"class folder {os.path.join(path, name)!r} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}); add images to it or remove it"
            )
        files.extend((file, label) for file in found)
    return classes, files


def images_under(folder: str) -> Iterator[str]:
    """Image files below `folder` (any depth), skipping hidden files and folders."""
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                yield os.path.join(root, name)


def load_image(file: str, image_size: int, channels: int) -> np.ndarray:
    """One image as uint8 [image_size, image_size, channels]: center crop, then bicubic resize."""
    try:
        with Image.open(file) as image:
            image = image.convert(MODES[channels])
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {file!r} ({err}); fix or delete the file") from err
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != image_size:
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8).reshape(image_size, image_size, channels)


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
    """One image folder at one resolution; build it with `ImageFolderConfig.create`."""

    path: str = ""
    image_size: int = 32
    channels: int = 3
    classes: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    files: tuple[tuple[str, int], ...] = dataclasses.field(default=(), repr=False)

    @classmethod
    def create(cls, path: str, image_size: int, channels: int) -> ImageFolderConfig:
        """Scans `path` (raising DataError on bad input) and names the config after its contents."""
        if channels not in MODES:
            raise DataError(
                f"data.channels={channels} but image_folder images have 1 (grayscale) or 3 (RGB) "
                "channels; set data.channels to 1 or 3"
            )
        if image_size <= 0:
            raise DataError(f"data.image_size={image_size} must be positive")
        path = os.path.abspath(os.path.expanduser(path))
        classes, files = scan_folder(path)
        digest = hashlib.sha256(f"{path}\n{image_size}\n{channels}\n".encode())
        for file, label in files:
            stat = os.stat(file)
            digest.update(
                f"{os.path.relpath(file, path)}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode()
            )
        slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(path).lower()).strip("_") or "images"
        return cls(
            name=f"{slug[:40]}_{image_size}px_{MODES[channels].lower()}_{digest.hexdigest()[:12]}",
            description=f"Images under {path}, {len(classes)} classes, {image_size}x{image_size}.",
            path=path,
            image_size=image_size,
            channels=channels,
            classes=tuple(classes),
            files=tuple(files),
        )


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A user's class-per-sub-folder images as a TFDS data set with a single "train" split."""

    name = "dit_image_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Center crop + bicubic resize, uint8 images, labels from sorted folders."}
    # No checksums / metadata files beside the code; also avoids TFDS needing `importlib_resources`.
    code_path = None
    builder_config: ImageFolderConfig

    def __init__(self, *, config: ImageFolderConfig, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=cfg.description,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=(cfg.image_size, cfg.image_size, cfg.channels), dtype=np.uint8
                    ),
                    "label": tfds.features.ClassLabel(names=list(cfg.classes)),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        return {"train": self._generate_examples(self.builder_config.files)}

    def _generate_examples(self, files: Sequence[tuple[str, int]]) -> Iterator[tuple[str, dict]]:
        cfg = self.builder_config
        for file, label in files:
            key = os.path.relpath(file, cfg.path)
            yield key, {"image": load_image(file, cfg.image_size, cfg.channels), "label": label}

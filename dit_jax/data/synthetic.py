"""A random-access synthetic data set with the element spec of the real ones.

Element `i` of a split is a pure function of (seed, split, i): a fixed random prototype of class
`i % num_classes` blended with per-element noise, so a class-conditional model has something to
learn. Values lie in [-1, 1]. Useful for benchmarks and tests that must not touch the disk.
"""

from __future__ import annotations

import numpy as np
from grain.experimental import ShapeDtypeStruct

SPLIT_LENGTHS = {"train": 10_000, "test": 1_000}
_SPLIT_IDS = {"train": 0, "test": 1}
_PROTOTYPE_STREAM = 2**63  # Philox key words >= this index the class prototypes, below it elements.
_PROTOTYPE_WEIGHT = 0.7


class SyntheticSource:
    """Random-access source of {"x": float32 [size, size, channels] in [-1, 1], "y": int32}."""

    def __init__(
        self,
        *,
        image_size: int,
        channels: int,
        num_classes: int,
        split: str = "train",
        length: int | None = None,
        seed: int = 0,
    ):
        if split not in SPLIT_LENGTHS:
            raise ValueError(f"unknown synthetic split {split!r}; expected one of {sorted(SPLIT_LENGTHS)}")
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.split = split
        self.seed = seed
        self._length = SPLIT_LENGTHS[split] if length is None else length
        if self._length <= 0:
            raise ValueError(f"length must be positive, got {self._length}")

    @property
    def element_spec(self) -> dict[str, ShapeDtypeStruct]:
        shape = (self.image_size, self.image_size, self.channels)
        return {"x": ShapeDtypeStruct(shape, np.float32), "y": ShapeDtypeStruct((), np.int32)}

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return (
            f"SyntheticSource(split={self.split!r}, length={self._length}, image_size={self.image_size}, "
            f"channels={self.channels}, num_classes={self.num_classes}, seed={self.seed})"
        )

    def _uniform(self, stream: int) -> np.ndarray:
        key = [(self.seed * len(_SPLIT_IDS) + _SPLIT_IDS[self.split]) % 2**64, stream]
        if stream >= _PROTOTYPE_STREAM:  # prototypes are shared by all splits
            key[0] = self.seed % 2**64
        rng = np.random.Generator(np.random.Philox(key=key))
        shape = (self.image_size, self.image_size, self.channels)
        return rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self!r}")
        label = index % self.num_classes if self.num_classes > 0 else 0
        prototype = self._uniform(_PROTOTYPE_STREAM + label)
        noise = self._uniform(index)
        x = _PROTOTYPE_WEIGHT * prototype + (1.0 - _PROTOTYPE_WEIGHT) * noise
        return {"x": np.clip(x, -1.0, 1.0).astype(np.float32), "y": np.int32(label)}

    def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
        return [self[i] for i in indices]

"""The random-access source shared by every TFDS ArrayRecord data set (image data sets, latents).

`ArrayRecordSource` opens one split's shards on first access in each process (Grain worker
processes receive it pickled, without an open reader), decodes records with the data set's TFDS
features, and gives len, [i] and the batched __getitems__. A subclass says where the builder comes
from, how a record becomes an element, and what to tell the user when the files cannot be read.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from dit_jax.data.errors import DataError

_READ_ERRORS = (OSError, RuntimeError, ValueError)
_OPEN_ERRORS = (*_READ_ERRORS, KeyError)


class ArrayRecordSource(abc.ABC):
    """Random access to `length` records of `split`; pickles without the open reader and reopens lazily."""

    def __init__(self, split: str, length: int):
        self.split = split
        self._length = length
        self._records = None

    @abc.abstractmethod
    def _builder(self) -> tfds.core.DatasetBuilder:
        """The prepared TFDS builder whose split this source reads."""

    @abc.abstractmethod
    def _convert(self, record: dict) -> dict[str, np.ndarray]:
        """One decoded record -> the element the source yields."""

    @abc.abstractmethod
    def _open_failed(self, err: Exception) -> str:
        """The DataError message when the split cannot be opened."""

    @abc.abstractmethod
    def _read_failed(self, err: Exception) -> str:
        """The DataError message when records cannot be read (missing or corrupt files)."""

    def __len__(self) -> int:
        return self._length

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_records": None}

    def _open(self):
        if self._records is None:
            try:
                self._records = self._builder().as_data_source(split=self.split)
            except DataError:
                raise
            except _OPEN_ERRORS as err:
                raise DataError(self._open_failed(err)) from err
        return self._records

    def check_readable(self) -> None:
        """Reads the first and the last record; raises DataError when files are missing or corrupt."""
        try:
            if self._length:
                self._open().__getitems__([0, self._length - 1])
        except DataError:
            raise
        except _READ_ERRORS as err:
            raise DataError(self._read_failed(err)) from err

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._convert(self._open()[int(index)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        return [self._convert(r) for r in self._open().__getitems__([int(i) for i in indices])]

"""Grain input pipeline: shuffled, repeated, per-process sharded, checkpointable batches.

The global example stream is the source shuffled anew each epoch (a pure function of `seed`) and
repeated forever; epochs follow each other without a gap, so a batch may straddle two epochs.
Global batch k holds stream positions [k * B, (k + 1) * B); process p of P reads the contiguous
slice [k * B + p * B / P, k * B + (p + 1) * B / P) of it. Each process only reads and decodes its
own examples, and the P local batches of a step together form exactly the global batch.

The returned iterator is a `grain.DatasetIterator`: `get_state()` gives a JSON-serialisable dict and
`set_state(state)` on a freshly made iterator (same config, seed, batch and process layout) resumes
with exactly the batches that would have followed.
"""

from __future__ import annotations

import grain
import jax
import numpy as np
from absl import flags

from dit_jax import config
from dit_jax.data.errors import DataError
from dit_jax.data.latents import LatentSampler, check_images
from dit_jax.data.sources import make_source

_SHUFFLE_STREAM = 0
_FLIP_STREAM = 1
_LATENT_STREAM = 2
_READ_THREADS = 4
_PREFETCH_BATCHES = 8


def _derived_seed(seed: int, stream: int) -> int:
    """A 32-bit seed for one use of the run seed; unrelated run seeds give unrelated streams."""
    entropy = [int(seed) % 2**63, stream]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])


class RandomHorizontalFlip:
    """Flips x left-right with probability 1/2, decided by (seed, stream position) alone.

    The stream position encodes (epoch, index in epoch), so an image is flipped differently in
    different epochs but identically whenever the same step is replayed after a resume.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, position: int, element: dict) -> dict:
        rng = np.random.Generator(np.random.Philox(key=[self.seed, int(position)]))
        if rng.integers(2):
            element = {**element, "x": np.ascontiguousarray(element["x"][:, ::-1])}
        return element


def _mark_absl_flags_parsed() -> None:
    """grain 0.2.x's process prefetch reads an absl flag without checking that flags were parsed.

    Outside an absl app (notebooks, pytest) that raises UnparsedFlagAccessError; keep the defaults.
    """
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is not in [0, process_count={process_count})")
    return process_index, process_count


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """The per-process share of the global batch; raises DataError unless it divides evenly."""
    if global_batch_size <= 0:
        raise DataError(f"batch_size={global_batch_size} must be positive")
    if global_batch_size % process_count:
        raise DataError(
            f"batch_size={global_batch_size} is not divisible by the {process_count} processes; "
            f"choose a multiple of {process_count}"
        )
    return global_batch_size // process_count


def make_dataset(
    cfg: config.Data,
    *,
    global_batch_size: int,
    seed: int,
    split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
    with_images: bool = False,
) -> grain.IterDataset:
    """The pipeline as a Grain IterDataset of local batches; `make_iterator` iterates it."""
    if with_images and cfg.source != "latents":
        raise DataError(
            f"data.with_images=True is for data.source='latents' (a data set written by `dit-jax encode "
            f"--store_images`); with data.source={cfg.source!r}, x is the image: set data.with_images=False"
        )
    process_index, process_count = _process_layout(process_index, process_count)
    batch = local_batch_size(global_batch_size, process_count)
    # ShuffleMapDataset reshuffles each epoch (its seed advances with index // len), and
    # RepeatMapDataset passes stream positions through, so positions beyond one epoch stay distinct.
    source = make_source(cfg, split)
    if with_images:
        check_images(cfg, source.info)
    dataset = grain.MapDataset.source(source)
    dataset = dataset.shuffle(seed=_derived_seed(seed, _SHUFFLE_STREAM)).repeat()
    if cfg.source == "latents":  # noise (and the flipped-or-not choice) per stream position
        sampler = LatentSampler(_derived_seed(seed, _LATENT_STREAM), source.info, with_images)
        dataset = dataset.map_with_index(sampler)
    elif cfg.hflip:
        dataset = dataset.map_with_index(RandomHorizontalFlip(_derived_seed(seed, _FLIP_STREAM)))
    dataset = dataset.batch(batch, drop_remainder=True)[process_index::process_count]
    read = grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
    iter_dataset = dataset.to_iter_dataset(read)
    if cfg.num_workers > 0:
        _mark_absl_flags_parsed()
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    return iter_dataset


def make_iterator(
    cfg: config.Data,
    *,
    global_batch_size: int,
    seed: int,
    split: str = "train",
    process_index: int | None = None,
    process_count: int | None = None,
    with_images: bool = False,
) -> grain.DatasetIterator:
    """Endless iterator of {"x": float32 [local_batch, H, W, C] in [-1, 1], "y": int32 [local_batch]}.

    `process_index` / `process_count` default to JAX's; local_batch = global_batch_size //
    process_count. Save `iterator.get_state()` with a checkpoint and `set_state` it to resume.
    `with_images` (data.source="latents" only, a data set encoded with `--store_images`): each
    batch also holds "image", uint8 [local_batch, H_px, W_px, C_px], the clean image of each latent
    (mirrored exactly where the flipped latent was drawn).
    """
    dataset = make_dataset(
        cfg,
        global_batch_size=global_batch_size,
        seed=seed,
        split=split,
        process_index=process_index,
        process_count=process_count,
        with_images=with_images,
    )
    return iter(dataset)

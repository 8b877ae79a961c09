"""Data: TFDS builders (digits, image folder) in ArrayRecord, a synthetic source, Grain pipelines.

    it = data.make_iterator(cfg.data, global_batch_size=cfg.batch_size, seed=cfg.seed)
    batch = next(it)  # {"x": float32 [B / processes, H, W, C] in [-1, 1], "y": int32 [B / processes]}
    state = it.get_state()  # JSON-serialisable; it.set_state(state) on a fresh iterator resumes

Importing has no side effects; TFDS data sets are prepared on first use. `data.source = "latents"`
reads VAE latents written by `dit-jax encode` (dit_jax.data.encode; format in dit_jax.data.latents).
"""

from dit_jax.data.errors import DataError
from dit_jax.data.pipeline import local_batch_size, make_dataset, make_iterator
from dit_jax.data.sources import data_dir, load_split_arrays, make_source, num_examples

__all__ = [
    "DataError",
    "data_dir",
    "load_split_arrays",
    "local_batch_size",
    "make_dataset",
    "make_iterator",
    "make_source",
    "num_examples",
]

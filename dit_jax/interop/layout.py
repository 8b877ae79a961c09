"""Key tables for checkpoint converters: where each PyTorch tensor goes in our parameter tree and
how it is re-laid out, plus the helpers every converter's error messages share."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

MAX_NAMED = 12  # keys listed in one error message before "... (N more)"

Transform = Callable[[np.ndarray], np.ndarray]


class Entry(NamedTuple):
    """One checkpoint tensor: its expected shape, where it goes in our tree, how to re-lay it out."""

    shape: tuple[int, ...]
    path: tuple[Any, ...]
    transform: Transform


def identity(w: np.ndarray) -> np.ndarray:
    return w


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """nn.Linear weight [out, in] -> kernel [in, out]."""
    return w.T


def add_attention(table: dict, prefix: str, path: tuple, width: int, heads: int) -> None:
    """timm-style attention (`{prefix}.qkv`, `{prefix}.proj`, as in DiT, SiT, DINOv2) -> our
    SelfAttention: w_qkv [D, 3, heads, head_dim], w_out [heads, head_dim, D]."""
    d, h, k = width, heads, width // heads
    table[f"{prefix}.qkv.weight"] = Entry((3 * d, d), (*path, "w_qkv"), lambda w: w.T.reshape(d, 3, h, k))
    table[f"{prefix}.qkv.bias"] = Entry((3 * d,), (*path, "b_qkv"), lambda w: w.reshape(3, h, k))
    table[f"{prefix}.proj.weight"] = Entry((d, d), (*path, "w_out"), lambda w: w.T.reshape(h, k, d))
    table[f"{prefix}.proj.bias"] = Entry((d,), (*path, "b_out"), identity)


def set_path(tree: dict, path: tuple, value: np.ndarray) -> None:
    """tree[path[0]][path[1]]... = value, creating the intermediate dicts."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def natural_key(key: str) -> tuple:
    """blocks.2 before blocks.10; numbers and names never compared with each other."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in key.split("."))


def describe_keys(keys: list[str]) -> str:
    """Keys for a message, one per pattern: the same key in several blocks reads `blocks.{0..27}.x`."""
    block_indices: dict[str, list[int]] = {}  # key after "blocks.N." -> the Ns
    entries = []  # (sort key, text)
    for key in keys:
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if m:
            block_indices.setdefault(m.group(2), []).append(int(m.group(1)))
        else:
            entries.append((natural_key(key), key))
    for rest, blocks in block_indices.items():
        blocks.sort()
        if len(blocks) == 1:
            span = str(blocks[0])
        elif blocks == list(range(blocks[0], blocks[-1] + 1)):
            span = f"{{{blocks[0]}..{blocks[-1]}}}"
        else:
            span = "{" + ",".join(map(str, blocks)) + "}"
        entries.append((natural_key(f"blocks.{blocks[0]}.{rest}"), f"blocks.{span}.{rest}"))
    shown = [text for _, text in sorted(entries)]
    text = ", ".join(shown[:MAX_NAMED])
    return text + (f", ... ({len(shown) - MAX_NAMED} more)" if len(shown) > MAX_NAMED else "")

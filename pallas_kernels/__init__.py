"""Attention kernels behind one entry point: `attention(q, k, v, ...)`.

Layout [batch, seq, heads, head_dim]; grouped-query heads allowed. Implementations "xla"
(reference), "dense" (the reference's math with a hand-written backward, the CPU default for short
sequences), "chunked" (XLA blockwise, O(seq) memory), "cudnn", "pallas" (GPU or TPU kernel).
Masks live in `pallas_kernels.masks`; see /work/shared/KERNELS.md for the design brief.
"""

from pallas_kernels import masks
from pallas_kernels.context import context_attention
from pallas_kernels.dispatch import IMPLEMENTATIONS, attention, attention_with_lse
from pallas_kernels.neighborhood import permute, unpermute
from pallas_kernels.plan import BlockPlan, build_plan
from pallas_kernels.sharding import sharded_attention

__all__ = [
    "IMPLEMENTATIONS",
    "BlockPlan",
    "attention",
    "attention_with_lse",
    "build_plan",
    "context_attention",
    "masks",
    "permute",
    "sharded_attention",
    "unpermute",
]

"""Attention kernels behind one entry point: `attention(q, k, v, ...)`.

Layout [batch, seq, heads, head_dim]. See ../KERNELS.md (shared brief) for the plan.
"""

from pallas_kernels.dispatch import attention

__all__ = ["attention"]

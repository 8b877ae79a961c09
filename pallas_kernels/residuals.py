"""Names on what the O(seq) attention kernels save for their backward pass, for remat policies.

The flash kernels (Pallas TPU / Triton / Mosaic GPU), the XLA blockwise kernel and the ring keep the
output and the log-sum-exp of their forward as custom-VJP residuals. Inside `jax.checkpoint` a
policy decides per value whether it is saved or recomputed; these residuals come out of a kernel,
not a matmul, so `dots_with_no_batch_dims_saveable` would drop them and the backward pass would run
the whole forward kernel again. Naming them lets a policy keep them:

    policy = jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*residuals.NAMES))

(both are O(seq): [B, Lq, H, D] and [B, H, Lq]). The dense kernels save their O(seq²) probabilities
and are not named: under such a policy their forward is recomputed.
"""

from __future__ import annotations

from jax.ad_checkpoint import checkpoint_name

OUT, LSE = "attention_out", "attention_lse"
NAMES = (OUT, LSE)


def named(out, lse):
    """`out` and `lse` as residuals a remat policy can keep by name."""
    return checkpoint_name(out, OUT), checkpoint_name(lse, LSE)

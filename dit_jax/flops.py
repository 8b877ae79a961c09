"""Compute accounting: analytic FLOPs of the networks and of a train step, device peaks, MFU.

FLOPs count matmuls only, 2 per multiply-add (the DiT paper's "Gflops" count multiply-adds: half
of these). Norms, softmax, activations, the loss and the optimizer are left out; they are a few
percent of a DiT step (`tests/test_flops.py` holds every formula to XLA's cost analysis within 5%).

A train step is 3 forward passes (the backward pass computes a gradient for the activations and one
for the weights), whatever the remat policy (recomputation is not counted: these are model FLOPs,
the numerator of MFU). REPA's frozen encoder adds one forward pass per image.
"""

from __future__ import annotations

import functools

import numpy as np

from dit_jax import config as config_lib

FREQ_DIM = 256  # the timestep embedder's sinusoid features (models.layers.TimestepEmbedder)

# Dense peak FLOP/s per device by (device-kind substring, compute dtype); f32 on GPUs is TF32.
PEAK_FLOPS = {
    ("H200", "bfloat16"): 989e12,
    ("H200", "float32"): 494.7e12,
    ("H100", "bfloat16"): 989e12,
    ("H100", "float32"): 494.7e12,
    ("A100", "bfloat16"): 312e12,
    ("A100", "float32"): 156e12,
    ("TPU v4", "bfloat16"): 275e12,
    ("TPU v5 lite", "bfloat16"): 197e12,
    ("TPU v5e", "bfloat16"): 197e12,
    ("TPU v5p", "bfloat16"): 459e12,
    ("TPU v6", "bfloat16"): 918e12,
}


def device_peak(device_kind: str, dtype: str) -> float | None:
    """Peak dense FLOP/s of one device of `device_kind` (jax.Device.device_kind) computing in
    `dtype`; None where unknown (CPUs)."""
    for (kind, peak_dtype), peak in PEAK_FLOPS.items():
        if kind.lower() in device_kind.lower() and peak_dtype == dtype:
            return peak
    return None


def mlp_flops(tokens: int, width: int, hidden: int, kind: str) -> float:
    """A token-wise MLP: fc1 + fc2 (GELU) or the two input branches + fc2 (SwiGLU)."""
    return (3 if kind == "swiglu" else 2) * 2 * tokens * width * hidden


def attention_flops(tokens: int, width: int, density: float = 1.0) -> float:
    """Self-attention with its projections: qkv, scores and values over the allowed pairs, output."""
    return 2 * tokens * width * 3 * width + 4 * density * tokens * tokens * width + 2 * tokens * width * width


@functools.lru_cache(maxsize=64)
def _allowed_pairs(mask, tokens: int) -> int:
    rows_per_chunk = max(1, (1 << 22) // tokens)
    kv = np.arange(tokens)[None, :]
    total = 0
    for start in range(0, tokens, rows_per_chunk):
        q = np.arange(start, min(start + rows_per_chunk, tokens))[:, None]
        total += int(np.count_nonzero(np.asarray(mask.mask_fn(q, kv))))
    return total


def attention_density(cfg: config_lib.Config) -> float:
    """The fraction of (query, key) pairs the configured attention mask allows (1 for full
    attention), counted exactly from the mask."""
    from dit_jax.models.build import attention_mask

    mask = attention_mask(cfg)
    if mask is None:
        return 1.0
    tokens = cfg.model.num_patches
    return _allowed_pairs(mask, tokens) / tokens**2


def dit_forward_flops(cfg: config_lib.Config, *, with_projector: bool | None = None) -> float:
    """One forward pass of the DiT of `cfg` for one image.

    L tokens, width D, MLP width M, E experts, k per token, s shared, F = 256 sinusoid features,
    P = p^2 C_in patch features, P' = p^2 C_out output features:
      per block: attention (4 L^2 D scaled by the mask's density) + 2 D 6D (adaLN) + MLP, where an
        MoE block's MLP is the router (2 L D E), k routed experts and s shared ones per token
      once: 2 L P D (patches) + 2 (F D + D D) (timestep MLP) + 2 D 2D + 2 L D P' (final layer)
      REPA's projector (with_projector, default: when training with REPA): 2 L (D W + W W + W Z)
    """
    m = cfg.model
    tokens, d, hidden = m.num_patches, m.hidden_size, m.mlp_hidden_size
    dense_mlp = mlp_flops(tokens, d, hidden, m.mlp)
    moe_mlp = 2 * tokens * d * m.num_experts + (m.experts_per_token + m.shared_experts) * dense_mlp
    attention = attention_flops(tokens, d, attention_density(cfg))
    blocks = sum(
        attention + 2 * d * 6 * d + (moe_mlp if m.is_moe_block(i) else dense_mlp) for i in range(m.depth)
    )
    patch_in, patch_out = m.patch_size**2 * m.in_channels, m.patch_size**2 * m.out_channels
    once = 2 * tokens * patch_in * d + 2 * (FREQ_DIM * d + d * d) + 2 * d * 2 * d + 2 * tokens * d * patch_out
    if with_projector is None:
        with_projector = cfg.repa.weight > 0
    if with_projector and m.repa_depth:
        w, z = m.repa_projector_dim, m.repa_feature_dim
        once += 2 * tokens * (d * w + w * w + w * z)
    return float(blocks + once)


def dinov2_forward_flops(cfg) -> float:
    """One forward pass of a DINOv2 backbone (models.dinov2.DinoV2Config) for one image: patch
    embedding and the blocks over the patch, class and register tokens."""
    patches = (cfg.image_size // cfg.patch_size) ** 2
    tokens, d = patches + 1 + cfg.num_register_tokens, cfg.embed_dim
    embed = 2 * patches * cfg.patch_size**2 * cfg.in_channels * d
    block = attention_flops(tokens, d) + mlp_flops(tokens, d, cfg.mlp_hidden, cfg.ffn)
    return float(embed + cfg.depth * block)


def digits_encoder_flops(image_size: int, channels: int, width: int) -> float:
    """The digits classifier's two 3x3 convolutions (stride 1, then 2) for one image: REPA's
    spatial features (dit_jax.eval.proxy.spatial_encoder)."""
    reduced = -(-image_size // 2)
    return float(2 * image_size**2 * 9 * channels * width + 2 * reduced**2 * 9 * width * 2 * width)


def train_flops(cfg: config_lib.Config, *, encoder_flops_per_image: float = 0.0) -> float:
    """FLOPs of one train step of the global batch: 3 forward passes of the model (with REPA's
    projector when training with REPA) plus one of REPA's frozen encoder per image."""
    return float(cfg.batch_size * (3 * dit_forward_flops(cfg) + encoder_flops_per_image))

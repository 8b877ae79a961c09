"""DINOv2 ViT (Oquab et al., 2023; facebookresearch/dinov2): REPA's frozen target encoder.

A transcription of `DinoVisionTransformer.forward_features` for the torch-hub backbones
(dinov2_vit{s,b,l,g}14, optionally with registers): 14x14 patch embedding, cls token (+ register
tokens), learned positions, pre-norm blocks (LayerNorm eps 1e-6, attention with qkv bias,
LayerScale, MLP with exact-erf GELU, or SwiGLU for ViT-g), final LayerNorm. Images are NHWC.

The module is built for one input resolution `cfg.image_size` (224 for REPA at 256 px): the
checkpoint's position table (37x37 patches for 518 px) is interpolated once, when converting
(dit_jax.interop.dinov2), exactly as `interpolate_pos_encoding` does at every call in PyTorch
(torch's bicubic, reproduced here in numpy by `torch_bicubic_matrix`).

`preprocess` is REPA's `preprocess_raw_image` for DINOv2: [0, 1], ImageNet mean/std, then
`F.interpolate(x, 224, mode="bicubic")` — torch's cubic kernel (a = -0.75, clamped borders),
not jax.image.resize's (a = -0.5).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.models.attention import SelfAttention
from dit_jax.models.layers import AffineLayerNorm, PatchEmbed, SwiGLU, dense

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LN_EPS = 1e-6
FFNS = ("mlp", "swiglu")
# Published backbones: name -> (embed_dim, depth, num_heads, ffn). Patch 14, 518-px position table.
VARIANTS = {
    "vits14": (384, 12, 6, "mlp"),
    "vitb14": (768, 12, 12, "mlp"),
    "vitl14": (1024, 24, 16, "mlp"),
    "vitg14": (1536, 40, 24, "swiglu"),
}
HEADS_BY_WIDTH = {width: heads for width, _, heads, _ in VARIANTS.values()}
REGISTERS = 4  # the "_reg" backbones


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
    """A DINOv2 backbone built for `image_size` x `image_size` inputs.

    `pos_grid`: side of the checkpoint's position table (37 = 518 / 14). `interpolate_offset` and
    `interpolate_antialias` are the backbone's own settings (0.1 / False; 0.0 / True for the
    register variants) used when the table is interpolated to the input grid.
    """

    image_size: int = 224
    patch_size: int = 14
    in_channels: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_hidden: int = 3072
    ffn: str = "mlp"
    layerscale: bool = True
    num_register_tokens: int = 0
    pos_grid: int = 37
    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.ffn not in FFNS:
            raise ValueError(f"ffn must be one of {FFNS}, got {self.ffn!r}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def swiglu_hidden(embed_dim: int, mlp_ratio: float = 4.0) -> int:
    """SwiGLUFFNFused's hidden width: 2/3 of the MLP's, rounded up to a multiple of 8 (4096 for ViT-g)."""
    return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def dinov2_config(name: str = "vitb14", *, image_size: int = 224) -> DinoV2Config:
    """The config of a published backbone: "vits14", "vitb14", "vitl14", "vitg14", each optionally
    with "_reg" (4 register tokens, antialiased position interpolation without offset)."""
    base, _, suffix = name.removeprefix("dinov2_").partition("_")
    if base not in VARIANTS or suffix not in ("", "reg", "reg4"):
        raise ValueError(
            f"unknown DINOv2 backbone {name!r}; expected one of {', '.join(VARIANTS)} (+ '_reg')"
        )
    width, depth, heads, ffn = VARIANTS[base]
    reg = bool(suffix)
    return DinoV2Config(
        image_size=image_size,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_hidden=swiglu_hidden(width) if ffn == "swiglu" else 4 * width,
        ffn=ffn,
        num_register_tokens=REGISTERS if reg else 0,
        interpolate_offset=0.0 if reg else 0.1,
        interpolate_antialias=reg,
    )


class DinoV2Features(NamedTuple):
    """Final-LayerNorm outputs: `x_norm_clstoken` [B, D] and `x_norm_patchtokens` [B, L, D]."""

    cls_BD: jax.Array
    patch_BLD: jax.Array


class GeluMlp(nnx.Module):
    """fc1 -> GELU (exact erf, nn.GELU's default) -> fc2."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = dense(dim, hidden, ("embed", "mlp"), **kw)
        self.fc2 = dense(hidden, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def _layerscale(dim: int, param_dtype) -> nnx.Param:
    return nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("embed",))  # hub init_values=1.0


class DinoV2Block(nnx.Module):
    """x + ls1 * attn(norm1(x)); then x + ls2 * ffn(norm2(x))."""

    def __init__(self, cfg: DinoV2Config, attention_impl: str, *, rngs: nnx.Rngs, dtype, param_dtype):
        d = cfg.embed_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = AffineLayerNorm(d, eps=LN_EPS, param_dtype=param_dtype)
        self.attn = SelfAttention(d, cfg.num_heads, impl=attention_impl, **kw)
        self.norm2 = AffineLayerNorm(d, eps=LN_EPS, param_dtype=param_dtype)
        ffn = GeluMlp if cfg.ffn == "mlp" else SwiGLU
        self.mlp = ffn(d, cfg.mlp_hidden, **kw)
        self.ls1 = _layerscale(d, param_dtype) if cfg.layerscale else None
        self.ls2 = _layerscale(d, param_dtype) if cfg.layerscale else None

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        def scaled(ls, h):
            return h if ls is None else h * ls[...].astype(h.dtype)

        x_BLD = x_BLD + scaled(self.ls1, self.attn(self.norm1(x_BLD)))
        return x_BLD + scaled(self.ls2, self.mlp(self.norm2(x_BLD)))


class DinoV2(nnx.Module):
    """DINOv2 backbone for `cfg.image_size` inputs: (x_BHWC normalised as `preprocess` does) ->
    DinoV2Features. `pos_embed` holds the position table already interpolated to `cfg.grid`."""

    def __init__(
        self,
        cfg: DinoV2Config,
        attention_impl: str = "auto",
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.cfg = cfg
        self.dtype = dtype
        d = cfg.embed_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_channels, d, **kw)
        init = nnx.initializers.normal(stddev=0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (d,), param_dtype), logical_axes=("embed",))
        self.pos_embed = nnx.Param(
            init(rngs.params(), (1 + cfg.grid**2, d), param_dtype), logical_axes=(None, "embed")
        )
        self.register_tokens = (
            nnx.Param(
                init(rngs.params(), (cfg.num_register_tokens, d), param_dtype), logical_axes=(None, "embed")
            )
            if cfg.num_register_tokens
            else None
        )
        self.blocks = nnx.List([DinoV2Block(cfg, attention_impl, **kw) for _ in range(cfg.depth)])
        self.norm = AffineLayerNorm(d, eps=LN_EPS, param_dtype=param_dtype)

    def __call__(self, x_BHWC: jax.Array) -> DinoV2Features:
        cfg = self.cfg
        b, h, w, _ = x_BHWC.shape
        if h != cfg.image_size or w != cfg.image_size:
            raise ValueError(
                f"this DINOv2 module was built for {cfg.image_size}x{cfg.image_size} inputs (its position "
                f"table is interpolated for that grid), got {h}x{w}; resize with dinov2.preprocess or "
                "convert the checkpoint for this image_size"
            )
        x = self.patch_embed(x_BHWC.astype(self.dtype))
        d = x.shape[-1]
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
        if self.register_tokens is not None:  # after the positions, between cls and patches
            regs = jnp.broadcast_to(
                self.register_tokens[...].astype(x.dtype), (b, cfg.num_register_tokens, d)
            )
            x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return DinoV2Features(cls_BD=x[:, 0], patch_BLD=x[:, 1 + cfg.num_register_tokens :])


# --- torch's bicubic interpolation, as resize matrices -------------------------------------------


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter `a` (torch: -0.75, or -0.5 when antialiasing)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def torch_bicubic_matrix(
    in_size: int, out_size: int, *, scale_factor: float | None = None, antialias: bool = False
) -> np.ndarray:
    """[out_size, in_size] float64 matrix M with `M @ x` = torch.nn.functional.interpolate(x,
    mode="bicubic", align_corners=False, antialias=antialias) along one axis.

    `scale_factor`: the factor passed to F.interpolate (torch then maps coordinates with
    1 / scale_factor instead of in_size / out_size); None when an output size is passed.
    Without antialias: a = -0.75, source index (i + 0.5) * scale - 0.5 in float32 as torch computes
    it, the 4 taps clamped to the border. With antialias (PIL-style): a = -0.5, support scaled by
    the downsampling factor, weights renormalised over the taps inside the image.
    """
    scale = np.float32(in_size / out_size if scale_factor is None else 1.0 / scale_factor)
    m = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    if not antialias:
        real = scale * (rows.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)
        first = np.floor(real)
        t = (real - first).astype(np.float32)
        taps = np.arange(-1, 3)  # source offsets of the 4 taps from floor(real)
        weights = _cubic(t[:, None] - taps[None, :].astype(np.float32), -0.75).astype(np.float32)
        index = np.clip(first.astype(np.int64)[:, None] + taps[None, :], 0, in_size - 1)
        np.add.at(m, (np.repeat(rows, 4), index.ravel()), weights.ravel())
        return m
    scale = float(scale)
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    max_taps = math.ceil(support) * 2 + 1
    for i in rows:
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        size = min(max(min(int(center + support + 0.5), in_size) - lo, 0), max_taps)
        w = _cubic((np.arange(lo, lo + size) - center + 0.5) * inv, -0.5)
        m[i, lo : lo + size] = w / w.sum() if w.sum() != 0 else w
    return m


def interpolate_pos_embed(
    pos_embed: np.ndarray, grid: int, *, offset: float = 0.1, antialias: bool = False
) -> np.ndarray:
    """A [1 + M*M, D] (or [1, 1 + M*M, D]) position table -> [1 + grid*grid, D], as DINOv2's
    `interpolate_pos_encoding` for a grid x grid input (unchanged when grid == M)."""
    table = np.asarray(pos_embed, np.float64).reshape(-1, np.shape(pos_embed)[-1])
    n, d = table.shape[0] - 1, table.shape[1]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position table has {n} patch entries, not a square grid")
    if side == grid:
        return table.astype(np.float32)
    if offset:
        factor = (grid + offset) / side
        if math.floor(side * factor) != grid:
            raise ValueError(f"interpolating {side}x{side} positions by {factor} does not give {grid}x{grid}")
        m = torch_bicubic_matrix(side, grid, scale_factor=factor, antialias=antialias)
    else:
        m = torch_bicubic_matrix(side, grid, antialias=antialias)
    patches = np.einsum("ah,bw,hwd->abd", m, m, table[1:].reshape(side, side, d)).reshape(-1, d)
    return np.concatenate([table[:1], patches]).astype(np.float32)


def bicubic_resize(x_BHWC: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """torch.nn.functional.interpolate(x, size, mode="bicubic") (align_corners=False, no antialias)
    for NHWC images, as two float32 matmuls at full precision."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    _, h, w, _ = x_BHWC.shape
    mh = jnp.asarray(torch_bicubic_matrix(h, out_h), jnp.float32)
    mw = jnp.asarray(torch_bicubic_matrix(w, out_w), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", mh, x_BHWC.astype(jnp.float32), precision=hi)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)


def preprocess(images_BHWC: jax.Array, size: int = 224) -> jax.Array:
    """REPA's `preprocess_raw_image` for DINOv2, NHWC: uint8 images / 255 (float images are taken in
    [-1, 1] and mapped to [0, 1]), ImageNet mean/std, then torch's bicubic resize to size x size.

    REPA resizes to 224 * (resolution // 256): 224 for 256-px images, 448 for 512 px. float32 out.
    """
    x = images_BHWC.astype(jnp.float32)
    x = x / 255.0 if images_BHWC.dtype == jnp.uint8 else x * 0.5 + 0.5
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    return bicubic_resize(x, size)

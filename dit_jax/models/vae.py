"""Stable Diffusion VAE (diffusers `AutoencoderKL`) in Flax NNX, NHWC throughout.

The parameter tree mirrors diffusers' module names (`encoder.down_blocks.0.resnets.1.conv1.kernel`, ...),
so converting a checkpoint is a key rename plus OIHW -> HWIO for convolutions (see
dit_jax.interop.diffusers_vae). Every parameter carries `logical_axes` metadata; `dtype` is the compute
dtype and `param_dtype` the storage dtype. GroupNorm statistics and the attention softmax run in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dit_jax.models.layers import dense

CONV_AXES = (None, None, "conv_in", "conv_out")
NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers `AutoencoderKL` config.json that change the network (defaults: SD-VAE)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 256
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels {self.block_out_channels} must be divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> VAEConfig:
        """From a diffusers config dict (unknown keys such as `_class_name` are ignored)."""
        down = config.get("down_block_types", ())
        up = config.get("up_block_types", ())
        bad = [t for t in down if t != "DownEncoderBlock2D"] + [t for t in up if t != "UpDecoderBlock2D"]
        if bad or config.get("act_fn", "silu") != "silu":
            raise ValueError(
                f"unsupported AutoencoderKL config: block types {sorted(set(bad))}, "
                f"act_fn={config.get('act_fn', 'silu')!r} (only DownEncoderBlock2D/UpDecoderBlock2D and silu)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in config.items() if k in names and (v is not None or k == "shift_factor")}
        if "block_out_channels" in kw and down and len(down) != len(kw["block_out_channels"]):
            raise ValueError(
                f"{len(down)} down_block_types for block_out_channels {kw['block_out_channels']}"
            )
        return cls(**kw)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class Posterior(NamedTuple):
    """Diagonal Gaussian over latents (NHWC), unpacks as (mean, std); logvar was clipped to [-30, 20]."""

    mean: jax.Array
    std: jax.Array

    @property
    def logvar(self) -> jax.Array:
        return 2.0 * jnp.log(self.std)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over NHWC: statistics and affine in float32, result in `dtype`."""

    def __init__(self, groups: int, channels: int, *, dtype, param_dtype, eps: float = NORM_EPS):
        self.groups, self.eps, self.dtype = groups, eps, dtype
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        xg = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
        mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
        y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def conv(
    c_in: int,
    c_out: int,
    k: int,
    *,
    rngs: nnx.Rngs,
    dtype,
    param_dtype,
    precision=None,
    stride: int = 1,
    padding: int = 0,
) -> nnx.Conv:
    """A k x k convolution (HWIO kernel) whose kernel and bias carry logical axis names."""
    return nnx.Conv(
        c_in,
        c_out,
        (k, k),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dtype=dtype,
        param_dtype=param_dtype,
        precision=precision,
        kernel_metadata={"logical_axes": CONV_AXES},
        bias_metadata={"logical_axes": (CONV_AXES[-1],)},
        rngs=rngs,
    )


class ResnetBlock2D(nnx.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a (1x1-projected) shortcut."""

    def __init__(
        self, c_in: int, c_out: int, groups: int, *, rngs: nnx.Rngs, dtype, param_dtype, precision=None
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, precision=precision)
        self.norm1 = GroupNorm(groups, c_in, dtype=dtype, param_dtype=param_dtype)
        self.conv1 = conv(c_in, c_out, 3, padding=1, **kw)
        self.norm2 = GroupNorm(groups, c_out, dtype=dtype, param_dtype=param_dtype)
        self.conv2 = conv(c_out, c_out, 3, padding=1, **kw)
        self.conv_shortcut = conv(c_in, c_out, 1, **kw) if c_in != c_out else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nnx.Module):
    """Pad (0, 1, 0, 1) (right and bottom only), then a stride-2 3x3 convolution."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype, param_dtype, precision=None):
        self.conv = conv(
            channels,
            channels,
            3,
            stride=2,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype, param_dtype, precision=None):
        self.conv = conv(
            channels,
            channels,
            3,
            padding=1,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Attention(nnx.Module):
    """Single-head self-attention over all H*W positions, with GroupNorm in front and a residual."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs, dtype, param_dtype, precision=None):
        del precision  # Dense uses the default matmul precision.
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.group_norm = GroupNorm(groups, channels, dtype=dtype, param_dtype=param_dtype)
        self.to_q = dense(channels, channels, ("embed", "embed_out"), **kw)
        self.to_k = dense(channels, channels, ("embed", "embed_out"), **kw)
        self.to_v = dense(channels, channels, ("embed", "embed_out"), **kw)
        self.to_out = nnx.List([dense(channels, channels, ("embed_out", "embed"), **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = self.to_out[0](jnp.einsum("bqk,bkc->bqc", probs, v))
        return x + out.reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """ResNet -> attention -> ResNet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool, **kw):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, **kw) for _ in range(2)])
        self.attentions = nnx.List([Attention(channels, groups, **kw)] if add_attention else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, downsample: bool, **kw):
        self.resnets = nnx.List(
            [ResnetBlock2D(c_in if i == 0 else c_out, c_out, groups, **kw) for i in range(layers)]
        )
        self.downsamplers = nnx.List([Downsample2D(c_out, **kw)] if downsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.downsamplers:
            x = down(x)
        return x


class UpBlock(nnx.Module):
    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, upsample: bool, **kw):
        self.resnets = nnx.List(
            [ResnetBlock2D(c_in if i == 0 else c_out, c_out, groups, **kw) for i in range(layers)]
        )
        self.upsamplers = nnx.List([Upsample2D(c_out, **kw)] if upsample else [])

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.upsamplers:
            x = up(x)
        return x


class Encoder(nnx.Module):
    """Image [B, H, W, in] -> moments [B, H/f, W/f, 2 * latent] (mean and logvar, concatenated)."""

    def __init__(self, cfg: VAEConfig, **kw):
        boc, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = conv(cfg.in_channels, boc[0], 3, padding=1, **kw)
        self.down_blocks = nnx.List(
            [
                DownBlock(boc[max(i - 1, 0)], c, cfg.layers_per_block, g, i < len(boc) - 1, **kw)
                for i, c in enumerate(boc)
            ]
        )
        self.mid_block = MidBlock(boc[-1], g, cfg.mid_block_add_attention, **kw)
        self.conv_norm_out = GroupNorm(g, boc[-1], dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.conv_out = conv(boc[-1], 2 * cfg.latent_channels, 3, padding=1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent [B, h, w, latent] -> image [B, h*f, w*f, out]."""

    def __init__(self, cfg: VAEConfig, **kw):
        rev, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = conv(cfg.latent_channels, rev[0], 3, padding=1, **kw)
        self.mid_block = MidBlock(rev[0], g, cfg.mid_block_add_attention, **kw)
        self.up_blocks = nnx.List(
            [
                UpBlock(rev[max(i - 1, 0)], c, cfg.layers_per_block + 1, g, i < len(rev) - 1, **kw)
                for i, c in enumerate(rev)
            ]
        )
        self.conv_norm_out = GroupNorm(g, rev[-1], dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.conv_out = conv(rev[-1], cfg.out_channels, 3, padding=1, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The SD VAE: `encode(x)` -> Posterior, `decode(z)` -> image; images NHWC in [-1, 1].

    Latents for a diffusion model are `(posterior.sample(key) - shift) * scaling_factor`
    (see `to_diffusion_latent` / `from_diffusion_latent`).
    """

    def __init__(
        self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, precision=None
    ):
        self.cfg = cfg
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, precision=precision)
        lat = cfg.latent_channels
        self.encoder = Encoder(cfg, **kw)
        self.quant_conv = conv(2 * lat, 2 * lat, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(lat, lat, 1, **kw) if cfg.use_post_quant_conv else None
        self.decoder = Decoder(cfg, **kw)

    @property
    def scaling_factor(self) -> float:
        return self.cfg.scaling_factor

    def encode(self, x_BHWC: jax.Array) -> Posterior:
        moments = self.encoder(x_BHWC)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        logvar = jnp.clip(logvar.astype(jnp.float32), LOGVAR_MIN, LOGVAR_MAX)
        return Posterior(mean, jnp.exp(0.5 * logvar).astype(mean.dtype))

    def decode(self, z_BHWC: jax.Array) -> jax.Array:
        if self.post_quant_conv is not None:
            z_BHWC = self.post_quant_conv(z_BHWC)
        return self.decoder(z_BHWC)

    def __call__(self, x_BHWC: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Reconstruction: decode a posterior sample (`key` given) or its mean."""
        post = self.encode(x_BHWC)
        return self.decode(post.mode() if key is None else post.sample(key))

    def to_diffusion_latent(self, z: jax.Array) -> jax.Array:
        return (z - (self.cfg.shift_factor or 0.0)) * self.cfg.scaling_factor

    def from_diffusion_latent(self, z: jax.Array) -> jax.Array:
        return z / self.cfg.scaling_factor + (self.cfg.shift_factor or 0.0)

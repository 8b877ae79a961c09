"""DiT building blocks: embedders, adaLN modulation, MLP / SwiGLU, norms, position embeddings, RoPE.

Every parameter carries `logical_axes` metadata (see dit_jax.parallel.rules). `dtype` is the
compute dtype, `param_dtype` the storage dtype. Norms, sinusoids and the adaLN conditioning path
that feeds them run in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

xavier_uniform = nnx.initializers.xavier_uniform()
normal_002 = nnx.initializers.normal(stddev=0.02)
zeros = nnx.initializers.zeros_init()


class Dense(nnx.Linear):
    """nnx.Linear (same parameters) applied as one 2-D matmul over all leading axes.

    [B, L, D] @ [D, F] as a rank-3 dot_general makes XLA:CPU compute the weight gradient from a
    transposed copy of the output gradient with a slow generic kernel; flattening to
    [B*L, D] @ [D, F] gives it a plain x^T g matmul (about 2x faster on CPU, see
    benchmarks/results/README.md). Elsewhere the reshapes are free.
    """

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if inputs.ndim <= 2:
            return super().__call__(inputs, out_sharding)
        lead = inputs.shape[:-1]
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]), out_sharding)
        return y.reshape(*lead, y.shape[-1])


@jax.custom_vjp
def _materialize_cotangent(x: jax.Array) -> jax.Array:
    return x


def _materialize_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return x, None


def _materialize_bwd(_, g: jax.Array) -> tuple[jax.Array]:
    # XLA:CPU's loop fusion duplicates an elementwise producer into all its consumers when each of
    # them can fuse it, and always duplicates "add(x, broadcast(y))". The residual stream's
    # cotangent is a chain of such adds through every block, so each weight-gradient input fusion
    # recomputed the chain from the last block: O(depth^2) work, 55% of a DiT-S/2 step. `g2` is an
    # add of two full-size operands read by a reduction (a library call XLA cannot fuse into), so
    # XLA writes it once. For finite g this is exactly g; a non-finite g stays non-finite.
    g2 = g + (g - g)
    r = jnp.sum(g2, axis=-1, keepdims=True)
    return (g2 + (r - r),)


_materialize_cotangent.defvjp(_materialize_fwd, _materialize_bwd)


def cpu_fusion_barrier(x: jax.Array) -> jax.Array:
    """Identity whose cotangent XLA:CPU materialises instead of recomputing it (see
    `_materialize_bwd`); a plain identity when lowered for any other platform."""
    return jax.lax.platform_dependent(x, cpu=_materialize_cotangent, default=lambda x: x)


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    dtype,
    param_dtype,
    kernel_init=xavier_uniform,
    bias_init=zeros,
) -> Dense:
    """A Linear layer whose kernel and bias carry logical axis names."""
    return Dense(
        in_features,
        out_features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init,
        bias_init=bias_init,
        kernel_metadata={"logical_axes": axes},
        bias_metadata={"logical_axes": (axes[1],)},
        rngs=rngs,
    )


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, statistics in float32, result in x.dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rms_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, statistics in float32, result in x.dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned per-channel scale (initialised to 1), as LightningDiT's (Llama's)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, axis: str = "norm", param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.eps) * self.scale[...].astype(x.dtype)


class AffineLayerNorm(nnx.Module):
    """LayerNorm with learned scale and bias (PyTorch's nn.LayerNorm default, eps 1e-5): timm's qk-norm."""

    def __init__(self, dim: int, *, eps: float = 1e-5, axis: str = "norm", param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis,))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=(axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.eps) * self.scale[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


def modulate(x_BLD: jax.Array, shift_BD: jax.Array, scale_BD: jax.Array) -> jax.Array:
    return x_BLD * (1 + scale_BD[:, None, :]) + shift_BD[:, None, :]


def timestep_sinusoids(
    t_B: jax.Array, dim: int, max_period: float = 10_000.0, freq_shift: int = 0
) -> jax.Array:
    """DiT/ADM timestep features [cos, sin] in float32 (t may be fractional).

    Frequencies exp(-ln(max_period) i / (half - freq_shift)); diffusers' DiT uses freq_shift=1.
    """
    half = dim // 2
    # A host constant: the reference's float32 exponent with exp rounded once from float64. XLA's
    # float32 exp differs from PyTorch's in the last bit for ~15 of 128 frequencies, which moves
    # the features by up to 6e-5 at t ~ 1000.
    exponent = (
        np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
    )
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = t_B.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """DiT's fixed 2-D sin-cos position table [grid_size**2, dim] (float64 on host, as in MAE/DiT).

    As in the reference, the first half of the channels encodes the column index and the second
    half the row index; tokens are in row-major order.
    """

    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10_000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid_size), np.arange(grid_size))
    return np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)


def rope_2d_tables(head_dim: int, grid_size: int, theta: float = 10_000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [grid_size**2, head_dim] (float32) of LightningDiT's 2-D rotary embedding.

    EVA-02's VisionRotaryEmbeddingFast(dim=head_dim // 2, pt_seq_len=grid_size): head_dim // 4
    frequencies theta^(-2j / (head_dim/2)), each repeated for the two channels of a rotated pair
    (interleaved: f0 f0 f1 f1 ...); the first head_dim / 2 channels rotate with the row index, the
    last head_dim / 2 with the column index; tokens in row-major order. Computed in float32 as the
    reference computes it.
    """
    dim = head_dim // 2
    exponents = np.arange(0, dim, 2, dtype=np.float32)[: dim // 2] / np.float32(dim)
    freqs = np.float32(1.0) / np.power(np.float32(theta), exponents)
    # The reference's positions arange(n) / n * n (ft_seq_len = pt_seq_len), in float32.
    pos = np.arange(grid_size, dtype=np.float32) / np.float32(grid_size) * np.float32(grid_size)
    angles = np.repeat(pos[:, None] * freqs[None], 2, axis=-1)  # [grid, dim]
    rows = np.broadcast_to(angles[:, None, :], (grid_size, grid_size, angles.shape[-1]))
    cols = np.broadcast_to(angles[None, :, :], (grid_size, grid_size, angles.shape[-1]))
    table = np.concatenate([rows, cols], axis=-1).reshape(grid_size * grid_size, -1)
    return np.cos(table), np.sin(table)


def apply_rope(x_BLHK: jax.Array, cos_LK: jax.Array, sin_LK: jax.Array) -> jax.Array:
    """x cos + rotate_half(x) sin with interleaved pairs: (x0, x1) -> (-x1, x0); math in float32."""
    x = x_BLHK.astype(jnp.float32)
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = x * cos_LK[None, :, None, :] + rotated * sin_LK[None, :, None, :]
    return out.astype(x_BLHK.dtype)


class TimestepEmbedder(nnx.Module):
    """Sinusoidal features of t (float32) followed by a two-layer SiLU MLP."""

    def __init__(
        self, hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype, freq_dim: int = 256, freq_shift: int = 0
    ):
        self.freq_dim = freq_dim
        self.freq_shift = freq_shift
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_init=normal_002)
        self.fc1 = dense(freq_dim, hidden, (None, "embed"), **kw)
        self.fc2 = dense(hidden, hidden, ("embed", "embed_out"), **kw)

    def __call__(self, t_B: jax.Array) -> jax.Array:
        return self.fc2(
            jax.nn.silu(self.fc1(timestep_sinusoids(t_B, self.freq_dim, freq_shift=self.freq_shift)))
        )


class LabelEmbedder(nnx.Module):
    """Class embeddings with one extra "null" class (index num_classes) for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden: int, dropout: float, *, rngs: nnx.Rngs, param_dtype):
        self.num_classes = num_classes
        self.dropout = dropout
        self.table = nnx.Param(
            normal_002(rngs.params(), (num_classes + 1, hidden), param_dtype),
            logical_axes=("classes", "embed"),
        )

    def __call__(self, y_B: jax.Array, drop_key: jax.Array | None = None) -> jax.Array:
        """`drop_key` given: each label is replaced by the null class with probability `dropout`."""
        if drop_key is not None and self.dropout > 0:
            drop = jax.random.uniform(drop_key, y_B.shape) < self.dropout
            y_B = jnp.where(drop, self.num_classes, y_B)
        return jnp.take(self.table[...], y_B, axis=0)


class PatchEmbed(nnx.Module):
    """Non-overlapping p×p patches -> linear projection (equivalent to DiT's strided conv)."""

    def __init__(self, patch: int, channels: int, hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.patch = patch
        fan_in = patch * patch * channels
        # The reference initialises only the conv weight (Xavier); its bias keeps PyTorch's default.
        bias_init = nnx.initializers.uniform(scale=2 / math.sqrt(fan_in))
        self.proj = dense(
            fan_in,
            hidden,
            ("patch", "embed"),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
            bias_init=lambda key, shape, dtype: bias_init(key, shape, dtype) - 1 / math.sqrt(fan_in),
        )

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        b, h, w, c = x_BHWC.shape
        p = self.patch
        x = x_BHWC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        # Feature order (p, q, c) per patch: the conv weight [D, C, p, q] maps to kernel [(p q c), D].
        return self.proj(x.reshape(b, (h // p) * (w // p), p * p * c))


def unpatchify(x_BLF: jax.Array, patch: int, channels: int, grid: int) -> jax.Array:
    """[B, grid*grid, p*p*C] -> [B, grid*p, grid*p, C] (DiT's (p, q, c) feature order)."""
    b = x_BLF.shape[0]
    x = x_BLF.reshape(b, grid, grid, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid * patch, grid * patch, channels)


class Mlp(nnx.Module):
    """fc1 -> GELU (tanh approximation, as DiT) -> fc2."""

    def __init__(self, hidden: int, mlp_hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = dense(hidden, mlp_hidden, ("embed", "mlp"), **kw)
        self.fc2 = dense(mlp_hidden, hidden, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class SwiGLU(nnx.Module):
    """LightningDiT's SwiGLUFFN: (silu(x W1 + b1) * (x W2 + b2)) W3 + b3.

    W1 and W2 are one fused parameter [embed, 2, mlp] (PyTorch's w12, first half gated), so that the
    MLP axis can be sharded without splitting a gate from its value.
    """

    def __init__(self, hidden: int, mlp_hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.dtype = dtype
        # Xavier-uniform over the fused [hidden, 2*mlp_hidden] matrix, as nn.Linear(hidden, 2*mlp_hidden).
        w_in = xavier_uniform(rngs.params(), (hidden, 2 * mlp_hidden), param_dtype)
        self.w_in = nnx.Param(w_in.reshape(hidden, 2, mlp_hidden), logical_axes=("embed", None, "mlp"))
        self.b_in = nnx.Param(zeros(rngs.params(), (2, mlp_hidden), param_dtype), logical_axes=(None, "mlp"))
        self.fc2 = dense(
            mlp_hidden, hidden, ("mlp", "embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        lead, d = x.shape[:-1], x.shape[-1]
        w_in = self.w_in[...].astype(dtype)
        h = x.astype(dtype).reshape(-1, d) @ w_in.reshape(d, -1)  # one 2-D matmul, as layers.Dense
        h = h.reshape(-1, *w_in.shape[1:]) + self.b_in[...].astype(dtype)
        return self.fc2((jax.nn.silu(h[:, 0]) * h[:, 1]).reshape(*lead, -1))


class Projector(nnx.Module):
    """REPA's projector head: Linear-SiLU-Linear-SiLU-Linear (hidden -> width -> width -> features).

    `input_mult`: a multiplier on the input (μP's readout multiplier, models.mup); None = none."""

    def __init__(
        self,
        hidden: int,
        width: int,
        features: int,
        *,
        input_mult: float | None = None,
        rngs: nnx.Rngs,
        dtype,
        param_dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.input_mult = input_mult
        self.fc1 = dense(hidden, width, ("embed", "mlp"), **kw)
        self.fc2 = dense(width, width, ("mlp", "embed"), **kw)
        self.fc3 = dense(width, features, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.input_mult is not None:
            x = x * self.input_mult
        return self.fc3(jax.nn.silu(self.fc2(jax.nn.silu(self.fc1(x)))))

"""Inception-v3 of the standard FID / sFID / IS evaluators, in Flax NNX (inference only, NHWC, f32).

The network is the 2015-12-05 TensorFlow graph `classify_image_graph_def.pb` that the ADM evaluator
(openai/guided-diffusion `evaluations/evaluator.py`) runs, in the PyTorch layout of pytorch-fid's
`FIDInceptionV3` (torchvision's Inception3 with the `FIDInceptionA/C/E_1/E_2` blocks): BatchNorm with
eps 1e-3 in inference mode, 3x3 average pools that exclude the padding (`count_include_pad=False`,
TF's SAME pooling), a max pool in the last block's pool branch, and a 1008-way classifier.
Attribute names equal the keys of pytorch-fid's weights file (`Mixed_6d.branch1x1.conv.weight` ->
`Mixed_6d.branch1x1.conv.kernel`), so conversion (inception_convert.py) is a 1:1 mapping.

Outputs of `InceptionV3(images)` (images NHWC in [0, 255], uint8 or float, any size, 3 channels):
  pool     [N, 2048]  'pool_3:0', the FID features.
  spatial  [N, 2023]  'mixed_6/conv:0'[..., :7] flattened in TF's (h, w, c) order, the sFID
                      features: the ReLU output of the 1x1 branch (`branch1x1`) of the 4th 17x17
                      block (TF `mixed_6` = torchvision `Mixed_6d`; `mixed` = Mixed_5b, ...).
  logits   [N, 1008]  pool @ fc.kernel WITHOUT the fc bias: the ADM evaluator (and improved-gan's
                      IS code) takes `softmax/logits/MatMul`'s weight only, so IS = softmax of these.

Preprocessing (`preprocess=`), which is where evaluators differ:
  "tf1" (default): what the TF graph itself does after 'ExpandDims:0', where the ADM evaluator feeds
      float32 [0, 255] images: `ResizeBilinear` to 299x299 with TF1 semantics (align_corners=False,
      no half-pixel centers: source = dst * in/out), then (x - 128) / 128, i.e. [-1, 0.9921875].
      torch-fidelity does the same. Matches the graph up to float rounding (we lerp in the same
      order as TF's kernel), not bit for bit.
  "pytorch_fid": what pytorch-fid does: `F.interpolate(bilinear, align_corners=False)` (half-pixel
      centers, no antialiasing) then x / 127.5 - 1, i.e. [-1, 1]. Gives slightly different FIDs.
Images already 299x299 are not resampled by either mode (both resizes are then the identity).
The two differ in the input scale (TF maps 255 to 127/128, not 1) and in the sampling grid: TF1
samples at dst * in/out, PyTorch at (dst + 0.5) * in/out - 0.5, a shift of 0.07 source pixels for
256 -> 299 but 0.45 for 32 -> 299. Neither antialiases when downsampling (e.g. 512 -> 299). Use
"tf1" to compare with ADM reference statistics (`mu`, `sigma`, `mu_s`, `sigma_s`), which the TF
graph computed; the sFID features are flattened in TF's (h, w, c) order for the same reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

IMAGE_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008
BN_EPS = 1e-3
PREPROCESS_MODES = ("tf1", "pytorch_fid")

Preprocess = Literal["tf1", "pytorch_fid"]
HIGHEST = jax.lax.Precision.HIGHEST


def _source_indices(
    in_size: int, out_size: int, mode: Preprocess
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower index, upper index, lerp weight) per output pixel of a 1-D bilinear resize, as float32."""
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    if mode == "tf1":  # tensorflow/core/kernels/image_resizer_state.h, LegacyScaler
        src = dst * scale
    else:  # PyTorch area_pixel_compute_source_index (align_corners=False, clamped at 0); the CPU
        # kernel's multiply-add rounds once (FMA), which float64 then one rounding reproduces
        src = (np.float64(scale) * (dst.astype(np.float64) + 0.5) - 0.5).astype(np.float32)
        src = np.maximum(src, np.float32(0.0))
    lower = np.floor(src).astype(np.int32)
    upper = np.minimum(lower + 1, in_size - 1)
    return lower, upper, (src - lower.astype(np.float32)).astype(np.float32)


def resize_bilinear(images_NHWC: jax.Array, size: int, mode: Preprocess) -> jax.Array:
    """Bilinear resize of float images to size x size without antialiasing, as TF1 or PyTorch do it."""
    _, h, w, _ = images_NHWC.shape
    if (h, w) == (size, size):
        return images_NHWC
    y_lo, y_hi, y_lerp = _source_indices(h, size, mode)
    x_lo, x_hi, x_lerp = _source_indices(w, size, mode)
    x_lerp = jnp.asarray(x_lerp)[None, None, :, None]
    y_lerp = jnp.asarray(y_lerp)[None, :, None, None]
    top, bottom = jnp.take(images_NHWC, y_lo, axis=1), jnp.take(images_NHWC, y_hi, axis=1)
    top_l, top_r = jnp.take(top, x_lo, axis=2), jnp.take(top, x_hi, axis=2)
    bot_l, bot_r = jnp.take(bottom, x_lo, axis=2), jnp.take(bottom, x_hi, axis=2)
    top = top_l + (top_r - top_l) * x_lerp  # TF's order: along x first, then along y
    bottom = bot_l + (bot_r - bot_l) * x_lerp
    return top + (bottom - top) * y_lerp


def preprocess(images_NHWC: jax.Array, mode: Preprocess = "tf1", size: int = IMAGE_SIZE) -> jax.Array:
    """Images in [0, 255] (uint8 or float, NHWC) -> float32 network input at size x size."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"unknown Inception preprocess mode {mode!r}; use one of {PREPROCESS_MODES}")
    if images_NHWC.ndim != 4 or images_NHWC.shape[-1] != 3:
        raise ValueError(
            f"Inception expects RGB images [N, H, W, 3] in [0, 255], got shape {tuple(images_NHWC.shape)}"
            " (repeat grayscale images to 3 channels first)"
        )
    if min(images_NHWC.shape[1:3]) < 1:
        raise ValueError(f"Inception got empty images of shape {tuple(images_NHWC.shape)}")
    x = resize_bilinear(images_NHWC.astype(jnp.float32), size, mode)
    if mode == "tf1":
        return (x - 128.0) / 128.0  # the graph's Sub (128) and Mul (1/128); exact in float32
    return x / 127.5 - 1.0  # pytorch-fid: 2 * (x / 255) - 1


class BasicConv(nnx.Module):
    """Conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU; torchvision's BasicConv2d."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int | tuple[int, int],
        *,
        rngs: nnx.Rngs,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        precision=HIGHEST,
    ):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        self.conv = nnx.Conv(
            in_ch,
            out_ch,
            (kh, kw),
            strides=stride,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(
            out_ch,
            use_running_average=True,
            epsilon=BN_EPS,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool whose border windows average only the real pixels (TF SAME)."""
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nnx.Module):
    """35x35 block (Mixed_5b/c/d); FIDInceptionA: the pool branch excludes padding."""

    def __init__(self, in_ch: int, pool_features: int, **kw):
        self.branch1x1 = BasicConv(in_ch, 64, 1, **kw)
        self.branch5x5_1 = BasicConv(in_ch, 48, 1, **kw)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2, **kw)
        self.branch3x3dbl_1 = BasicConv(in_ch, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1, **kw)
        self.branch_pool = BasicConv(in_ch, pool_features, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """35x35 -> 17x17 reduction (Mixed_6a)."""

    def __init__(self, in_ch: int, **kw):
        self.branch3x3 = BasicConv(in_ch, 384, 3, stride=2, **kw)
        self.branch3x3dbl_1 = BasicConv(in_ch, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, b3d, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nnx.Module):
    """17x17 block with factorised 7x7 convs (Mixed_6b..e); FIDInceptionC: pool excludes padding."""

    def __init__(self, in_ch: int, channels_7x7: int, **kw):
        c7 = channels_7x7
        self.branch1x1 = BasicConv(in_ch, 192, 1, **kw)
        self.branch7x7_1 = BasicConv(in_ch, c7, 1, **kw)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_1 = BasicConv(in_ch, c7, 1, **kw)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3), **kw)
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0), **kw)
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3), **kw)
        self.branch_pool = BasicConv(in_ch, 192, 1, **kw)

    def branches(self, x: jax.Array) -> list[jax.Array]:
        """The four branch outputs in concatenation order (the first is TF's `mixed_N/conv`)."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        return [b1, b7, b7d, self.branch_pool(_avg_pool_3x3(x))]

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate(self.branches(x), axis=-1)


class InceptionD(nnx.Module):
    """17x17 -> 8x8 reduction (Mixed_7a)."""

    def __init__(self, in_ch: int, **kw):
        self.branch3x3_1 = BasicConv(in_ch, 192, 1, **kw)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2, **kw)
        self.branch7x7x3_1 = BasicConv(in_ch, 192, 1, **kw)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3), **kw)
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nnx.Module):
    """8x8 block with split 1x3/3x1 convs (Mixed_7b: FIDInceptionE_1, average pool excluding padding;
    Mixed_7c: FIDInceptionE_2, a 3x3 stride-1 *max* pool, as in the TF graph)."""

    def __init__(self, in_ch: int, *, pool: Literal["avg", "max"], **kw):
        self.pool = pool
        self.branch1x1 = BasicConv(in_ch, 320, 1, **kw)
        self.branch3x3_1 = BasicConv(in_ch, 384, 1, **kw)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch3x3dbl_1 = BasicConv(in_ch, 448, 1, **kw)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1, **kw)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1), **kw)
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0), **kw)
        self.branch_pool = BasicConv(in_ch, 192, 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = jnp.concatenate([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:  # padding never wins the max: -inf padding, and x >= 0 after ReLU anyway
            pooled = nnx.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        return jnp.concatenate([b1, b3, b3d, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """The FID Inception-v3; `model(images)` -> {"pool", "spatial", "logits"} (see the module doc).

    Build it with weights through `inception_convert.load_fid_inception`; constructing it directly
    gives random weights (and unit BN statistics), useful only for shapes and tests. Keep f32: FID is
    sensitive to feature precision, and `precision=HIGHEST` keeps TPU/GPU convolutions in f32 too.
    """

    def __init__(
        self,
        *,
        rngs: nnx.Rngs,
        preprocess: Preprocess = "tf1",
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        precision=HIGHEST,
    ):
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(
                f"unknown Inception preprocess mode {preprocess!r}; use one of {PREPROCESS_MODES}"
            )
        self.preprocess = preprocess
        self.precision = precision
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, precision=precision)
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, pool_features=32, **kw)
        self.Mixed_5c = InceptionA(256, pool_features=64, **kw)
        self.Mixed_5d = InceptionA(288, pool_features=64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, channels_7x7=128, **kw)
        self.Mixed_6c = InceptionC(768, channels_7x7=160, **kw)
        self.Mixed_6d = InceptionC(768, channels_7x7=160, **kw)
        self.Mixed_6e = InceptionC(768, channels_7x7=192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, pool="avg", **kw)
        self.Mixed_7c = InceptionE(2048, pool="max", **kw)
        self.fc = nnx.Linear(POOL_DIM, NUM_LOGITS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def features(self, x_NHWC: jax.Array) -> dict[str, jax.Array]:
        """The network on already-preprocessed input (any size >= 75; 299 gives the standard shapes)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x_NHWC)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool_3x3_s2(x)))
        x = _max_pool_3x3_s2(x)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))))
        branches = self.Mixed_6d.branches(x)  # TF mixed_6; its first branch is 'mixed_6/conv'
        spatial = branches[0][..., :SPATIAL_CHANNELS]
        x = self.Mixed_6e(jnp.concatenate(branches, axis=-1))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = jnp.mean(x, axis=(1, 2))
        logits = jnp.dot(pool, self.fc.kernel[...], precision=self.precision)  # no bias, as ADM's IS
        return {"pool": pool, "spatial": spatial.reshape(spatial.shape[0], -1), "logits": logits}

    def __call__(self, images_NHWC: jax.Array) -> dict[str, jax.Array]:
        """Images [N, H, W, 3] in [0, 255] (uint8 or float) -> {"pool", "spatial", "logits"}, f32."""
        out = self.features(preprocess(images_NHWC, self.preprocess))
        return {key: value.astype(jnp.float32) for key, value in out.items()}


def jit_features(model: InceptionV3) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """A jitted `images -> features` for `model`; weights are passed as arguments, not baked in.

    Compiles once per input shape; shard the image batch over a mesh to use all devices.
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def apply(state, images_NHWC):
        return nnx.merge(graphdef, state)(images_NHWC)

    return functools.partial(apply, state)

"""The Flax FID Inception against an independent PyTorch transcription, through the weights converter.

Every weight, BN affine parameter and BN running statistic is random on the PyTorch side; the
weights go .pth -> convert_to_npz -> .npz -> load_fid_inception, so the converter runs on the real
key names. Images are small and non-square (2 x 80 x 48 / 48 x 80, uint8); both implementations
resize them to 299 x 299, so the network itself always runs at the standard size (spatial 17x17).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest
from flax import nnx

from dit_jax.eval import inception_convert as conv
from dit_jax.interop import CheckpointFormatError
from dit_jax.models import inception as inc

torch = parity.optional("torch")
ref = parity.optional("torch_inception_reference")  # needs torch
needs_torch = parity.requires("torch")
# XLA's CPU convolutions carry about 1.7x the float32 error of PyTorch's (oneDNN) here: the ratio
# max |ours - ref64| / max |torch32 - ref64| of the pool features measured up to 2.5 over 53 random
# image pairs (AMD EPYC), hence 3 instead of tests/parity.py's 2.
MULTIPLE = 3.0


@pytest.fixture(scope="module")
def torch_model():
    torch.manual_seed(0)
    return ref.randomize_(ref.FIDInceptionV3(), seed=0)


@pytest.fixture(scope="module")
def weight_files(torch_model, tmp_path_factory):
    """(.pth written by torch.save, .npz written by convert_to_npz from it)."""
    tmp = tmp_path_factory.mktemp("inception")
    pth = tmp / "pt_inception-random.pth"
    torch.save(torch_model.state_dict(), pth)
    return pth, conv.convert_to_npz(pth, tmp / "converted" / "inception.npz")


@pytest.fixture(scope="module")
def model(weight_files):
    """Loaded once from the .npz (default preprocess "tf1"); `with_preprocess` copies it cheaply."""
    return conv.load_fid_inception(weight_files[1])


def with_preprocess(model: inc.InceptionV3, mode: str) -> inc.InceptionV3:
    copy = nnx.merge(*nnx.split(model))
    copy.preprocess = mode
    return copy


@pytest.fixture(scope="module")
def state_dict(torch_model):
    return {k: v.numpy() for k, v in torch_model.state_dict().items()}


def tf1_resize_reference(image_HWC: np.ndarray, size: int) -> np.ndarray:
    """TensorFlow 1.x ResizeBilinear (align_corners=False, half_pixel_centers=False), transcribed from
    resize_bilinear_op.cc: in = out * (in_size / out_size) in float32; lower = floor(in),
    upper = min(ceil(in), in_size - 1), lerp = in - floor(in); along x first, then along y."""

    def interp(in_size):
        scale = np.float32(in_size) / np.float32(size)
        src = [np.float32(i) * scale for i in range(size)]
        lower = np.array([int(np.floor(v)) for v in src])
        upper = np.array([min(int(np.ceil(v)), in_size - 1) for v in src])
        return lower, upper, np.array([v - np.floor(v) for v in src], np.float32)

    y0, y1, dy = interp(image_HWC.shape[0])
    x0, x1, dx = interp(image_HWC.shape[1])
    dx, dy = dx[None, :, None], dy[:, None, None]
    top = image_HWC[y0][:, x0] + (image_HWC[y0][:, x1] - image_HWC[y0][:, x0]) * dx
    bottom = image_HWC[y1][:, x0] + (image_HWC[y1][:, x1] - image_HWC[y1][:, x0]) * dx
    return top + (bottom - top) * dy


def torch_features(torch_model, images: np.ndarray, mode: str, dtype) -> dict[str, np.ndarray]:
    """The PyTorch Inception's features of uint8 NHWC images, in our layout, computed in `dtype`."""
    if mode == "pytorch_fid":
        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype) / 255.0
        kwargs = dict(pytorch_fid_preprocess=True)
    else:  # TF1's resize transcribed (float32 positions), in `dtype`
        as_numpy = np.float64 if dtype == torch.float64 else np.float32
        resized = np.stack([tf1_resize_reference(im.astype(as_numpy), 299) for im in images])
        x = torch.from_numpy((resized - 128.0) / 128.0).permute(0, 3, 1, 2)
        kwargs = {}
    with torch.no_grad(), parity.float32_resize_positions():
        theirs = torch_model(x, **kwargs)
    n = len(images)
    return {
        "pool": theirs["pool"].numpy(),
        "spatial": theirs["spatial"].permute(0, 2, 3, 1).reshape(n, -1).numpy(),  # TF's (h, w, c) order
        "logits": theirs["logits_unbiased"].numpy(),
    }


@needs_torch
@pytest.mark.parametrize("mode, hw", [("pytorch_fid", (80, 48)), ("tf1", (48, 80))])
def test_features_match_torch_reference(torch_model, model, mode, hw):
    images = np.random.default_rng(1).integers(0, 256, (2, *hw, 3), dtype=np.uint8)
    ours = {k: np.asarray(v) for k, v in inc.jit_features(with_preprocess(model, mode))(images).items()}
    assert all(v.dtype == np.float32 for v in ours.values())
    ref32 = torch_features(torch_model, images, mode, torch.float32)
    ref64 = torch_features(parity.float64(torch_model), images, mode, torch.float64)
    parity.assert_parity(mode, ours, ref32, ref64, multiple=MULTIPLE)
    # the fc bias is not part of the IS logits (ADM evaluator), but it is loaded
    np.testing.assert_array_equal(model.fc.bias[...], torch_model.fc.bias.detach().numpy())
    # the fc bias is not part of the IS logits (ADM evaluator), but it is loaded
    np.testing.assert_allclose(model.fc.bias[...], torch_model.fc.bias.detach().numpy())


@needs_torch
def test_output_shapes_eval_shape(model):
    graphdef, state = nnx.split(model)
    for shape, dtype in [((4, 256, 256, 3), jnp.uint8), ((3, 299, 299, 3), jnp.float32)]:
        out = jax.eval_shape(
            lambda state, x: nnx.merge(graphdef, state)(x), state, jax.ShapeDtypeStruct(shape, dtype)
        )
        n = shape[0]
        assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
            "pool": ((n, inc.POOL_DIM), jnp.float32),
            "spatial": ((n, inc.SPATIAL_DIM), jnp.float32),
            "logits": ((n, inc.NUM_LOGITS), jnp.float32),
        }
    assert inc.SPATIAL_DIM == 2023


def test_resize_known_values():
    """A 2x2 affine image: bilinear interpolation is exact, so the output shows the sample positions."""
    image = jnp.array([[0.0, 10.0], [20.0, 30.0]]).reshape(1, 2, 2, 1)
    positions = {"tf1": [0, 0.5, 1, 1], "pytorch_fid": [0, 0.25, 0.75, 1]}  # clamped at the border
    for mode, p in positions.items():
        want = 20 * np.array(p)[:, None] + 10 * np.array(p)[None, :]
        np.testing.assert_allclose(inc.resize_bilinear(image, 4, mode)[0, ..., 0], want, atol=1e-6)


@needs_torch
@pytest.mark.parametrize("hw", [(37, 64), (512, 301)])
def test_resize_matches_references(hw):
    images = np.random.default_rng(2).uniform(0, 255, (1, *hw, 3)).astype(np.float32)
    tf1 = inc.resize_bilinear(jnp.asarray(images), 299, "tf1")
    ref32, ref64 = (tf1_resize_reference(images[0].astype(dtype), 299) for dtype in (np.float32, np.float64))
    parity.assert_parity("tf1", tf1[0], ref32, ref64)

    def torch_resize(dtype):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).to(dtype)
        with parity.float32_resize_positions():
            resized = torch.nn.functional.interpolate(
                x, size=(299, 299), mode="bilinear", align_corners=False
            )
        return resized.permute(0, 2, 3, 1).numpy()

    ours = inc.resize_bilinear(jnp.asarray(images), 299, "pytorch_fid")
    parity.assert_parity("pytorch_fid", ours, torch_resize(torch.float32), torch_resize(torch.float64))


def test_preprocess_ranges_and_identity_at_299():
    images = np.random.default_rng(3).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    images[0, 0, 0] = [0, 128, 255]
    tf1 = np.asarray(inc.preprocess(jnp.asarray(images), "tf1"))
    pt = np.asarray(inc.preprocess(jnp.asarray(images), "pytorch_fid"))
    np.testing.assert_array_equal(tf1, (images.astype(np.float32) - 128) / 128)
    np.testing.assert_allclose(pt, images / 127.5 - 1, atol=1e-6)
    assert tf1[0, 0, 0].tolist() == [-1.0, 0.0, 127 / 128] and pt[0, 0, 0, 2] == 1.0


def test_preprocess_rejects_bad_input():
    with pytest.raises(ValueError, match=r"RGB images \[N, H, W, 3\].*got shape \(2, 32, 32, 1\)"):
        inc.preprocess(jnp.zeros((2, 32, 32, 1)))
    with pytest.raises(ValueError, match="got shape \\(32, 32, 3\\)"):
        inc.preprocess(jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="unknown Inception preprocess mode 'bicubic'"):
        inc.preprocess(jnp.zeros((1, 8, 8, 3)), "bicubic")


@needs_torch
def test_npz_matches_pth_and_needs_no_torch(weight_files, monkeypatch):
    pth, npz = weight_files
    from_pth = conv.read_weights(pth)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    from_npz = conv.read_weights(npz)
    assert set(from_npz) == {k for k in from_pth if not k.endswith("num_batches_tracked")}
    for key, value in from_npz.items():
        np.testing.assert_array_equal(value, from_pth[key].numpy())
    with pytest.raises(ImportError, match="needs PyTorch"):
        conv.read_weights(pth)


@needs_torch
def test_converter_names_missing_and_unexpected_keys(state_dict):
    broken = dict(state_dict)
    del broken["Mixed_6d.branch1x1.bn.running_var"]
    broken["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    with pytest.raises(CheckpointFormatError) as e:
        conv.convert_fid_inception(broken)
    message = str(e.value)
    assert "missing keys: Mixed_6d.branch1x1.bn.running_var" in message
    assert "unexpected keys: AuxLogits.fc.weight" in message
    assert "\n" not in message


@needs_torch
def test_converter_names_shape_mismatches(state_dict):
    broken = dict(state_dict)
    broken["fc.weight"] = np.zeros((1000, 2048), np.float32)  # torchvision's ImageNet head
    broken["Conv2d_1a_3x3.conv.weight"] = np.zeros((32, 3, 3, 3, 1), np.float32)
    with pytest.raises(CheckpointFormatError) as e:
        conv.convert_fid_inception(broken)
    message = str(e.value)
    assert "fc.weight: file shape (1000, 2048), expected (1008, 2048)" in message
    assert "Conv2d_1a_3x3.conv.weight: file shape (32, 3, 3, 3, 1), expected (32, 3, 3, 3)" in message


@needs_torch
def test_converter_layouts(state_dict):
    params = conv.convert_fid_inception(state_dict)
    kernel = params["Mixed_7c"]["branch3x3_2a"]["conv"]["kernel"]
    assert kernel.shape == (1, 3, 384, 384)
    np.testing.assert_array_equal(
        kernel, state_dict["Mixed_7c.branch3x3_2a.conv.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(params["fc"]["kernel"], state_dict["fc.weight"].T)
    np.testing.assert_array_equal(
        params["Mixed_5b"]["branch_pool"]["bn"]["var"], state_dict["Mixed_5b.branch_pool.bn.running_var"]
    )


def test_missing_file_message(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "pt_inception.pth"
    with pytest.raises(FileNotFoundError) as e:
        conv.load_fid_inception(missing)
    message = str(e.value)
    assert str(missing) in message and conv.WEIGHTS_URL in message
    assert "~/.cache/dit_jax/pt_inception-2015-12-05-6726825d.pth" in message and "\n" not in message
    monkeypatch.setenv(conv.WEIGHTS_ENV, str(tmp_path / "env.npz"))
    assert conv.default_weights_path() == tmp_path / "env.npz"
    with pytest.raises(FileNotFoundError, match="env.npz"):
        conv.read_weights()


@needs_torch
def test_corrupt_files(tmp_path, weight_files):
    truncated = weight_files[1].read_bytes()[:1000]
    for name, content in [("bad.npz", b"not a weights file"), ("bad.pth", b"\x80"), ("cut.npz", truncated)]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointFormatError, match=name):
            conv.read_weights(tmp_path / name)

"""Our DINOv2 encoder against a transcription of the official PyTorch ViT, through the checkpoint
converter; torch's bicubic resize (REPA's preprocessing, the position-table interpolation) against
torch.nn.functional.interpolate; converter errors and config inference.

Every parameter is re-randomised on the PyTorch side (LayerNorms, LayerScales, cls/register
tokens and positions included), so a wrong layout anywhere changes the output.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import parity
import pytest
from flax import nnx

from dit_jax.interop.dinov2 import checkpoint_url, convert_dinov2, infer_dinov2_config, load_dinov2
from dit_jax.interop.torch_checkpoint import CheckpointFormatError
from dit_jax.models import dinov2

torch = parity.optional("torch")
ref = parity.optional("torch_dinov2_reference")  # needs torch
needs_torch = parity.requires("torch")

STORED = 70  # position table of 5 x 5 patches of 14 px (518 px = 37 x 37 for the real backbones)
TINY = dict(img_size=STORED, patch_size=14, embed_dim=48, depth=2, num_heads=3)
# name -> (reference kwargs, input size)
CASES = {
    "mlp_3x3": (dict(), 42),
    "mlp_2x2": (dict(), 28),
    "mlp_native_5x5": (dict(), STORED),  # no interpolation (PyTorch's early return)
    "swiglu_registers_3x3": (
        dict(
            ffn_layer="swiglufused", num_register_tokens=2, interpolate_antialias=True, interpolate_offset=0.0
        ),
        42,
    ),
}


def torch_vit(seed: int = 0, **kwargs) -> ref.DinoVisionTransformer:
    torch.manual_seed(seed)
    model = ref.DinoVisionTransformer(**{**TINY, **kwargs}).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight", "gamma")):
                param.copy_(1 + 0.5 * torch.randn_like(param))
            else:
                fan_in = int(np.prod(param.shape[1:])) if param.ndim == 2 else 100
                param.copy_(torch.randn_like(param) * fan_in**-0.5)
    return model


def state_dict_np(model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def jax_features(path, image_size: int, x_BHWC: np.ndarray) -> dinov2.DinoV2Features:
    module = load_dinov2(path, image_size=image_size, num_heads=TINY["num_heads"])
    graphdef, state = nnx.split(module)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x_BHWC)


@needs_torch
@pytest.mark.parametrize("name", list(CASES))
def test_matches_official_dinov2(name, tmp_path):
    kwargs, size = CASES[name]
    model = torch_vit(**kwargs)
    x_BCHW = np.random.default_rng(0).standard_normal((2, 3, size, size), np.float32)

    def run(module, dtype):
        with torch.no_grad():
            out = module.forward_features(torch.from_numpy(x_BCHW).to(dtype))
        return {"patch": out["x_norm_patchtokens"].numpy(), "cls": out["x_norm_clstoken"].numpy()}

    with parity.float32_resize_positions():  # of the position table
        ref32, ref64 = run(model, torch.float32), run(parity.float64(model), torch.float64)
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    torch.save(model.state_dict(), path)
    got = jax_features(path, size, x_BCHW.transpose(0, 2, 3, 1))
    grid = size // TINY["patch_size"]
    assert got.patch_BLD.shape == (2, grid * grid, TINY["embed_dim"])
    assert np.abs(ref64["patch"]).mean() > 0.1
    parity.assert_parity(name, {"patch": got.patch_BLD, "cls": got.cls_BD}, ref32, ref64)


def test_module_rejects_other_resolutions():
    cfg = dataclasses.replace(dinov2.dinov2_config("vits14"), depth=1)
    module = nnx.eval_shape(lambda: dinov2.DinoV2(cfg, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="built for 224x224"):
        module(jax.ShapeDtypeStruct((1, 256, 256, 3), np.float32))


# name -> (in, out, scale_factor, antialias)
RESIZES = {
    "repa_256_to_224": (256, 224, None, False),
    "repa_512_to_448": (512, 448, None, False),
    "down_5_to_3": (5, 3, None, False),
    "up_5_to_9": (5, 9, None, False),
    "pos_37_to_16_offset": (37, 16, 16.1 / 37, False),
    "pos_37_to_32_offset": (37, 32, 32.1 / 37, False),
    "aa_37_to_16": (37, 16, None, True),
    "aa_up_5_to_9": (5, 9, None, True),
}


@needs_torch
@pytest.mark.parametrize("name", list(RESIZES))
def test_bicubic_matrix_matches_torch_interpolate(name):
    n_in, n_out, factor, antialias = RESIZES[name]
    x = np.random.default_rng(1).standard_normal((1, 2, n_in, n_in), np.float32)
    kw = dict(scale_factor=factor) if factor else dict(size=n_out)

    def interpolate(dtype):
        x_t = torch.from_numpy(x).to(dtype)
        return torch.nn.functional.interpolate(x_t, mode="bicubic", antialias=antialias, **kw).numpy()

    with parity.float32_resize_positions():
        ref32, ref64 = interpolate(torch.float32), interpolate(torch.float64)
    m = dinov2.torch_bicubic_matrix(n_in, n_out, scale_factor=factor, antialias=antialias)
    # Floor 2e-6 (~8 float32 ulp of these outputs): the matrix's cubic weights are computed in float32
    # and differ from exact ones by up to 8e-7, which on 5-px images exceeds 2x PyTorch's error.
    got = m @ x.astype(np.float64) @ m.T  # rows, then columns
    parity.assert_parity(name, got, ref32, ref64, floor=2e-6)


@needs_torch
@pytest.mark.parametrize(
    "grid, offset, antialias", [(16, 0.1, False), (32, 0.1, False), (16, 0.0, True), (37, 0.1, False)]
)
def test_pos_embed_interpolation_matches_dinov2(grid, offset, antialias):
    """ViT-B/14's 37 x 37 table to the 16 x 16 grid of 224 px (REPA), 32 x 32 (448 px), the register
    backbones' antialiased interpolation, and the native grid (unchanged)."""
    table = np.random.default_rng(2).standard_normal((1, 1 + 37 * 37, 8), np.float32)

    def interpolate(dtype):
        table_t = torch.from_numpy(table).to(dtype)
        return ref.interpolate_pos_encoding(table_t, grid, grid, offset, antialias)[0].numpy()

    with parity.float32_resize_positions():
        ref32, ref64 = interpolate(torch.float32), interpolate(torch.float64)
    got = dinov2.interpolate_pos_embed(table, grid, offset=offset, antialias=antialias)
    assert got.shape == (1 + grid * grid, 8)
    parity.assert_parity(f"grid {grid}", got, ref32, ref64)


@needs_torch
@pytest.mark.parametrize("value_range", ["uint8", "minus1_1"])
def test_preprocess_matches_repa(value_range):
    u8 = np.random.default_rng(3).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)

    def reference(dtype):
        return ref.preprocess_raw_image(torch.from_numpy(u8.transpose(0, 3, 1, 2)).to(dtype)).numpy()

    with parity.float32_resize_positions():
        ref32, ref64 = reference(torch.float32), reference(torch.float64)
    images = u8 if value_range == "uint8" else u8.astype(np.float32) / 127.5 - 1
    got = np.asarray(jax.jit(dinov2.preprocess)(images)).transpose(0, 3, 1, 2)
    assert got.shape == (2, 3, 224, 224)
    parity.assert_parity(value_range, got, ref32, ref64)


@needs_torch
def test_converter_names_missing_unexpected_and_misshapen_keys():
    sd = state_dict_np(torch_vit())
    cfg = infer_dinov2_config(sd, image_size=42, num_heads=3)
    broken = {k: v for k, v in sd.items() if k != "blocks.1.ls2.gamma"}
    with pytest.raises(CheckpointFormatError, match=r"missing keys: blocks\.1\.ls2\.gamma"):
        convert_dinov2(broken, cfg)
    with pytest.raises(CheckpointFormatError, match=r"unexpected keys: blocks\.0\.extra"):
        convert_dinov2({**sd, "blocks.0.extra": np.zeros(3)}, cfg)
    with pytest.raises(
        CheckpointFormatError, match=r"blocks\.0\.mlp\.fc1\.bias \(-> blocks/0/mlp/fc1/bias\)"
    ):
        convert_dinov2({**sd, "blocks.0.mlp.fc1.bias": np.zeros(7, np.float32)}, cfg)
    with pytest.raises(CheckpointFormatError, match=r"pos_embed.*expected \(1, 26, 48\)"):
        convert_dinov2({**sd, "pos_embed": np.zeros((1, 50, 48), np.float32)}, cfg)
    with pytest.raises(CheckpointFormatError, match="pass num_heads"):
        infer_dinov2_config(sd)
    with pytest.raises(CheckpointFormatError, match="patch_embed.proj.weight"):
        infer_dinov2_config({"x_embedder.proj.weight": np.zeros((4, 4, 2, 2))})
    params = convert_dinov2(sd, cfg)  # mask_token is dropped
    assert "mask_token" not in params and params["pos_embed"].shape == (1 + 9, 48)


def test_missing_file_names_path_and_download_url(tmp_path):
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    with pytest.raises(FileNotFoundError) as e:
        load_dinov2(path)
    assert str(path) in str(e.value) and checkpoint_url("dinov2_vitl14") in str(e.value)
    assert checkpoint_url("dinov2_vitl14") == (
        "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
    )
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14/dinov2_vitb14_pretrain.pth"):
        load_dinov2(tmp_path / "encoder.pth")


@needs_torch
@pytest.mark.parametrize("name", ["vits14", "vitb14", "vitl14", "vitg14", "vitb14_reg"])
def test_infers_published_configs(name):
    """Full-size state dicts on the meta device (shapes only): sizes, heads, FFN, registers."""
    expected = dinov2.dinov2_config(name)
    reg = expected.num_register_tokens
    with torch.device("meta"):
        model = ref.DinoVisionTransformer(
            img_size=518,
            embed_dim=expected.embed_dim,
            depth=expected.depth,
            num_heads=expected.num_heads,
            ffn_layer="swiglufused" if expected.ffn == "swiglu" else "mlp",
            num_register_tokens=reg,
            interpolate_antialias=bool(reg),
            interpolate_offset=0.0 if reg else 0.1,
        )
    sd = model.state_dict()
    assert infer_dinov2_config(sd) == expected
    assert expected.mlp_hidden == {"vitg14": 4096}.get(name, 4 * expected.embed_dim)
    # Our module has exactly the converter's tensors (the stored table aside) at full size.
    module = nnx.eval_shape(lambda: dinov2.DinoV2(expected, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))
    theirs = sum(v.numel() for k, v in sd.items() if k not in ("pos_embed", "mask_token"))
    assert ours == theirs + (1 + 16 * 16) * expected.embed_dim

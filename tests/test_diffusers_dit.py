"""Our DiT against diffusers' DiTTransformer2DModel, through the diffusers-folder converter.

Every parameter is re-randomised on the PyTorch side (the zero-initialised adaLN and output layers
and all biases included), so a wrong layout anywhere changes the output. diffusers gives each block
its own timestep/label embedder; ours shares one, so the random copies are tied to block 0's first.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest
from flax import nnx

from dit_jax.interop.diffusers_dit import (
    convert_diffusers_dit,
    load_diffusers_dit,
    model_config_from_diffusers,
    read_diffusers_dit,
)
from dit_jax.interop.torch_checkpoint import CheckpointFormatError
from dit_jax.models import DiT, layout
from dit_jax.models.layers import sincos_pos_embed_2d

torch = parity.optional("torch")
diffusers = parity.optional("diffusers")
safetensors_torch = parity.optional("safetensors.torch")
needs_torch = parity.requires("torch", "diffusers", "safetensors.torch")

T_B = np.array([0.0, 17.5, 999.0, 500.25], np.float32)
# The outputs' float32 error is dominated by the timestep sinusoids at t ~ 1000 (float32 t * freq),
# where our frequencies (exp rounded once) and PyTorch's float32 exp differ in the last bit for a
# few of them: max |ours - ref64| / max |torch32 - ref64| measured up to 1.7 over 124 random weights
# and timesteps (AMD EPYC), hence 2.5 instead of tests/parity.py's 2.
MULTIPLE = 2.5

# diffusers DiTTransformer2DModel kwargs (num_embeds_ada_norm = number of classes).
CONFIGS = {
    "p2_d1_sigma": dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=1,
        num_attention_heads=2, attention_head_dim=16, num_embeds_ada_norm=10,
    ),
    "p4_d2_eps_c3": dict(
        sample_size=16, patch_size=4, in_channels=3, num_layers=2,
        num_attention_heads=4, attention_head_dim=8, num_embeds_ada_norm=7,
    ),
    "p2_d3_sigma_1head_img16": dict(
        sample_size=16, patch_size=2, in_channels=4, out_channels=8, num_layers=3,
        num_attention_heads=1, attention_head_dim=32, num_embeds_ada_norm=5,
    ),
    "p2_d2_no_attention_bias_eps1e-6": dict(
        sample_size=8, patch_size=2, in_channels=1, out_channels=2, num_layers=2,
        num_attention_heads=3, attention_head_dim=16, num_embeds_ada_norm=10,
        attention_bias=False, norm_eps=1e-6,
    ),
}  # fmt: skip


def randomize(model, seed: int = 0) -> None:
    """Every parameter ~ N(0, 1/fan_in) (biases: std 0.1), then every block's embedder := block 0's."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            fan_in = int(np.prod(param.shape[1:])) if param.ndim > 1 else 100
            param.copy_(torch.randn(param.shape, generator=gen) * fan_in**-0.5)
        tie_embedders(model)


def tie_embedders(model) -> None:
    first = model.transformer_blocks[0].norm1.emb
    with torch.no_grad():
        for block in model.transformer_blocks[1:]:
            for mine, theirs in zip(block.norm1.emb.parameters(), first.parameters(), strict=True):
                mine.copy_(theirs)


def torch_dit(name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**{**CONFIGS[name], **overrides}).eval()
    randomize(model, seed)
    return model


def inputs(model, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    c, size, classes = model.config.in_channels, model.config.sample_size, model.config.num_embeds_ada_norm
    x_BCHW = np.random.default_rng(seed).standard_normal((len(T_B), c, size, size), np.float32)
    y_B = np.array([0, 3 % classes, classes, classes - 1])  # `classes` is the null (CFG) class
    return x_BCHW, y_B


def torch_out(model, x_BCHW: np.ndarray, y_B: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' output in float32, and in float64 from a float64 copy of the model."""

    def run(module, dtype):
        x, t = torch.from_numpy(x_BCHW).to(dtype), torch.from_numpy(T_B).to(dtype)
        with torch.no_grad():
            return module(x, t, torch.from_numpy(y_B)).sample.numpy()

    return run(model, torch.float32), run(parity.float64(model), torch.float64)


def jax_out(model_or_params, x_BCHW: np.ndarray, y_B, cfg=None) -> np.ndarray:
    """Output (NCHW) of a loaded nnx DiT, or of (params, cfg) through a jitted merge."""
    if cfg is None:
        graphdef, state = nnx.split(model_or_params)
    else:
        graphdef = nnx.split(nnx.eval_shape(lambda: DiT(cfg, "xla", rngs=nnx.Rngs(0))))[0]
        state = model_or_params
    fn = jax.jit(lambda state, x, t, y: nnx.merge(graphdef, state)(x, t, y))
    y = None if y_B is None else jnp.asarray(y_B)
    return np.asarray(fn(state, jnp.asarray(x_BCHW.transpose(0, 2, 3, 1)), jnp.asarray(T_B), y)).transpose(
        0, 3, 1, 2
    )


@needs_torch
@pytest.mark.parametrize("scan", [False, True], ids=["per_block", "scanned"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers_dit(name, scan):
    model = torch_dit(name)
    x_BCHW, y_B = inputs(model)
    ref32, ref64 = torch_out(model, x_BCHW, y_B)
    cfg, params = convert_diffusers_dit(model.state_dict(), dict(model.config))  # torch tensors accepted
    cfg = dataclasses.replace(cfg, scan_blocks=scan)
    params = layout.for_model(params, cfg)
    assert np.abs(ref64).mean() > 0.1  # not a comparison of near-zero outputs
    parity.assert_parity(name, jax_out(params, x_BCHW, y_B, cfg), ref32, ref64, multiple=MULTIPLE)


@needs_torch
def test_inferred_config():
    model = diffusers.DiTTransformer2DModel(**CONFIGS["p2_d2_no_attention_bias_eps1e-6"])
    cfg = model_config_from_diffusers(dict(model.config))
    assert (cfg.image_size, cfg.patch_size, cfg.in_channels, cfg.out_channels) == (8, 2, 1, 2)
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.mlp_ratio) == (48, 2, 3, 4.0)
    assert (cfg.num_classes, cfg.learn_sigma, cfg.class_dropout) == (10, True, 0.1)
    assert (cfg.timestep_freq_shift, cfg.mlp_norm_eps) == (1, 1e-6)
    # The published DiT-XL/2 256 config (legacy class name, as on the Hugging Face hub).
    xl = model_config_from_diffusers(
        {
            "_class_name": "Transformer2DModel",
            "activation_fn": "gelu-approximate",
            "attention_bias": True,
            "attention_head_dim": 72,
            "cross_attention_dim": None,
            "in_channels": 4,
            "norm_elementwise_affine": False,
            "norm_type": "ada_norm_zero",
            "num_attention_heads": 16,
            "num_embeds_ada_norm": 1000,
            "num_layers": 28,
            "num_vector_embeds": None,
            "out_channels": 8,
            "patch_size": 2,
            "sample_size": 32,
        }
    )
    assert (xl.hidden_size, xl.depth, xl.num_heads, xl.image_size, xl.num_classes) == (1152, 28, 16, 32, 1000)
    assert xl.learn_sigma and xl.mlp_norm_eps == 1e-5


@needs_torch
@pytest.mark.parametrize("size,patch,width", [(8, 2, 32), (16, 4, 48), (32, 2, 64)])
def test_diffusers_pos_embed_is_our_fixed_table(size, patch, width):
    """What diffusers computes for DiTTransformer2DModel (a non-persistent buffer) is our table."""
    model = diffusers.DiTTransformer2DModel(
        sample_size=size, patch_size=patch, num_attention_heads=2, attention_head_dim=width // 2, num_layers=1
    )
    theirs = model.pos_embed.pos_embed[0].numpy()
    assert "pos_embed.pos_embed" not in model.state_dict()
    np.testing.assert_allclose(theirs, sincos_pos_embed_2d(width, size // patch), rtol=0, atol=1e-6)


@needs_torch
def test_unconditional_folds_null_row_into_timestep_bias():
    """num_embeds_ada_norm=0: one (null) label row, always looked up with label 0."""
    model = torch_dit("p2_d1_sigma", num_embeds_ada_norm=0)
    cfg, params = convert_diffusers_dit(model.state_dict(), dict(model.config))
    assert cfg.num_classes == 0 and "y_embedder" not in params
    x_BCHW = np.random.default_rng(0).standard_normal((len(T_B), 4, 8, 8), np.float32)
    ref32, ref64 = torch_out(model, x_BCHW, np.zeros(len(T_B), np.int64))
    parity.assert_parity("unconditional", jax_out(params, x_BCHW, None, cfg), ref32, ref64, multiple=MULTIPLE)


# --- folders ----------------------------------------------------------------------------------------


@needs_torch
def test_load_saved_folder(tmp_path):
    model = torch_dit("p2_d3_sigma_1head_img16", seed=1)
    model.save_pretrained(tmp_path)  # config.json + diffusion_pytorch_model.safetensors
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_diffusers_dit(tmp_path, attention_impl="xla")
    assert isinstance(loaded, DiT)
    assert loaded.cfg == model_config_from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    x_BCHW, y_B = inputs(model, seed=1)
    ref32, ref64 = torch_out(model, x_BCHW, y_B)
    parity.assert_parity("folder", jax_out(loaded, x_BCHW, y_B), ref32, ref64, multiple=MULTIPLE)
    # The same through read_diffusers_dit (what `dit-jax convert` writes a workdir from).
    cfg, params = read_diffusers_dit(tmp_path)
    assert cfg == loaded.cfg
    same = jax.tree.map(np.array_equal, params, nnx.to_pure_dict(nnx.state(loaded, nnx.Param)))
    assert jax.tree.all(same)


@needs_torch
def test_pipeline_folder_legacy_class_and_bf16_weights(tmp_path):
    """A pipeline folder (transformer/), the hub's legacy Transformer2DModel config, bf16 safetensors."""
    model = torch_dit("p2_d1_sigma", seed=2)
    sub = tmp_path / "transformer"
    model.save_config(sub)
    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    safetensors_torch.save_file(bf16, str(sub / "diffusion_pytorch_model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in bf16.items()})  # the reference gets the same rounding
    config = json.loads((sub / "config.json").read_text())
    config.update(_class_name="Transformer2DModel", cross_attention_dim=None, num_vector_embeds=None)
    (sub / "config.json").write_text(json.dumps(config))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    loaded = load_diffusers_dit(tmp_path, attention_impl="xla")
    assert loaded.final.proj.kernel[...].dtype == jnp.float32
    x_BCHW, y_B = inputs(model)
    ref32, ref64 = torch_out(model, x_BCHW, y_B)
    parity.assert_parity(
        "bf16 pipeline folder", jax_out(loaded, x_BCHW, y_B), ref32, ref64, multiple=MULTIPLE
    )

    # A single weights file with an explicit config.
    single = load_diffusers_dit(sub / "diffusion_pytorch_model.safetensors", config=config)
    assert single.cfg == loaded.cfg


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffusers DiT checkpoint not found"):
        load_diffusers_dit(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["p2_d1_sigma"]))
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors"):
        load_diffusers_dit(tmp_path)


# --- errors -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    model = torch_dit("p4_d2_eps_c3")
    return {k: v.numpy() for k, v in model.state_dict().items()}, dict(model.config)


@needs_torch
def test_missing_and_unexpected_keys_are_named(small):
    sd, config = small
    sd = dict(sd)
    del sd["transformer_blocks.1.attn1.to_k.bias"]
    sd["transformer_blocks.1.norm3.weight"] = np.ones(32, np.float32)
    with pytest.raises(
        CheckpointFormatError, match=r"missing keys: transformer_blocks\.1\.attn1\.to_k\.bias"
    ) as e:
        convert_diffusers_dit(sd, config)
    assert "unexpected keys: transformer_blocks.1.norm3.weight" in str(e.value)
    assert "\n" not in str(e.value)


@needs_torch
def test_shape_mismatch_is_named(small):
    sd, config = small
    sd = dict(sd, proj_out_2=None)
    del sd["proj_out_2"]
    sd["proj_out_2.weight"] = np.zeros((96, 32), np.float32)
    message = "proj_out_2.weight: checkpoint shape (96, 32), expected (48, 32)"
    with pytest.raises(CheckpointFormatError, match=re.escape(message)):
        convert_diffusers_dit(sd, config)


@needs_torch
def test_differing_block_embedder_is_refused(small):
    sd, config = small
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.weight"
    # Float noise is tolerated ...
    convert_diffusers_dit(dict(sd, **{key: sd[key] * (1 + 1e-7)}), config)
    # ... a different embedder is not.
    bad = dict(sd, **{key: sd[key] + 0.01})
    with pytest.raises(CheckpointFormatError, match=re.escape(key) + r" \(max abs diff 0\.01\)") as e:
        convert_diffusers_dit(bad, config)
    assert "shares one embedder" in str(e.value)
    table = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    with pytest.raises(CheckpointFormatError, match=re.escape(table)):
        convert_diffusers_dit(dict(sd, **{table: -sd[table]}), config)


DELETE = object()  # an override that removes the key


@needs_torch
@pytest.mark.parametrize(
    "override,message",
    [
        (dict(norm_type="ada_norm"), "norm_type 'ada_norm' is not supported"),
        (dict(norm_type="ada_norm_single"), "norm_type 'ada_norm_single' is not supported"),
        (dict(sample_size=[16, 8]), r"sample_size \[16, 8\] is not supported; only square"),
        (dict(out_channels=5), "out_channels=5 with in_channels=3 is not supported"),
        (dict(activation_fn="gelu"), "activation_fn 'gelu' is not supported"),
        (dict(norm_elementwise_affine=True), "norm_elementwise_affine=True is not supported"),
        (dict(num_embeds_ada_norm=None), "num_embeds_ada_norm is null"),
        (dict(_class_name="UNet2DModel"), "_class_name 'UNet2DModel' is not a DiT"),
        (dict(_class_name="Transformer2DModel", cross_attention_dim=64), "cross_attention_dim=64"),
        (dict(_class_name="Transformer2DModel", interpolation_scale=2), "interpolation_scale=2"),
        (
            dict(_class_name="Transformer2DModel", norm_type=DELETE),
            "Transformer2DModel config without norm_type",
        ),
        (dict(patch_size=3), "config key 'model.patch_size': patch size 3 does not divide"),
    ],
)
def test_unsupported_configs_are_refused(small, override, message):
    sd, config = small
    config = {k: v for k, v in {**config, **override}.items() if v is not DELETE}
    with pytest.raises(CheckpointFormatError, match=message) as e:
        convert_diffusers_dit(sd, config)
    assert str(e.value).startswith("diffusers DiT config: ") and "\n" not in str(e.value)


@needs_torch
def test_loader_names_the_file(tmp_path):
    model = torch_dit("p2_d1_sigma")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "norm_type": "ada_norm"}))
    with pytest.raises(
        CheckpointFormatError, match=r"diffusion_pytorch_model\.safetensors.*norm_type 'ada_norm'"
    ):
        load_diffusers_dit(tmp_path)

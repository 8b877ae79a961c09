"""The NNX SD-VAE port against diffusers' AutoencoderKL (random weights, tiny configs, CPU, float32)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest

from dit_jax.interop.diffusers_vae import convert_diffusers_vae, load_diffusers_vae
from dit_jax.interop.torch_checkpoint import CheckpointFormatError
from dit_jax.models.vae import VAEConfig

torch = parity.optional("torch")
diffusers = parity.optional("diffusers")
safetensors_torch = parity.optional("safetensors.torch")
needs_torch = parity.requires("torch", "diffusers", "safetensors.torch")

CONFIGS = {
    "2_levels_groups8": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
    "3_levels_groups32_no_quant": dict(
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        latent_channels=3,
    ),
}


def _torch_vae(kw: dict, seed: int = 0):
    n = len(kw["block_out_channels"])
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        sample_size=16,
        **kw,
    )
    # Non-trivial norms (defaults are ones/zeros) so a swapped scale/bias would show.
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return vae.eval()


def _nchw(x: jax.Array) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


def reference_runs(vae, x_NCHW: np.ndarray, z_NCHW: np.ndarray) -> tuple[dict, dict]:
    """diffusers' encoder (mean, std of x) and decoder (of z), in float32 and from a float64 copy."""

    def run(module, dtype):
        with torch.no_grad():
            dist = module.encode(torch.from_numpy(x_NCHW).to(dtype)).latent_dist
            decoded = module.decode(torch.from_numpy(z_NCHW).to(dtype)).sample
        return {"mean": dist.mean.numpy(), "std": dist.std.numpy(), "decode": decoded.numpy()}

    return run(vae, torch.float32), run(parity.float64(vae), torch.float64)


@needs_torch
@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_decode_match_diffusers(name: str, tmp_path) -> None:
    kw = CONFIGS[name]
    ref = _torch_vae(kw)
    ref.save_pretrained(tmp_path)
    vae = load_diffusers_vae(tmp_path)
    assert vae.scaling_factor == pytest.approx(0.18215)

    x_NCHW = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    num_levels = len(kw["block_out_channels"])
    latent_shape = (2, ref.config.latent_channels, 16 >> (num_levels - 1), 16 >> (num_levels - 1))
    z_NCHW = np.random.default_rng(1).standard_normal(latent_shape).astype(np.float32)
    ref32, ref64 = reference_runs(ref, x_NCHW, z_NCHW)
    mean, std = jax.jit(lambda x: tuple(vae.encode(x)))(jnp.asarray(x_NCHW.transpose(0, 2, 3, 1)))
    out = jax.jit(vae.decode)(jnp.asarray(z_NCHW.transpose(0, 2, 3, 1)))
    ours = {"mean": _nchw(mean), "std": _nchw(std), "decode": _nchw(out)}
    parity.assert_parity(name, ours, ref32, ref64)


@needs_torch
def test_single_file_and_legacy_attention_names(tmp_path) -> None:
    kw = CONFIGS["2_levels_groups8"]
    ref = _torch_vae(kw, seed=1)
    sd = {}
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for key, value in ref.state_dict().items():
        for new, old in legacy.items():
            key = key.replace(f".{new}.", f".{old}.")
        sd[key] = value.contiguous()
    weights = tmp_path / "vae.safetensors"
    safetensors_torch.save_file(sd, str(weights))
    config = dict(ref.config)
    vae = load_diffusers_vae(weights, config=config)

    z_NCHW = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)

    def decode(module, dtype):
        with torch.no_grad():
            return module.decode(torch.from_numpy(z_NCHW).to(dtype)).sample.numpy()

    ref32, ref64 = decode(ref, torch.float32), decode(parity.float64(ref), torch.float64)
    got = _nchw(vae.decode(jnp.asarray(z_NCHW.transpose(0, 2, 3, 1))))
    parity.assert_parity("single file decode", got, ref32, ref64)


@needs_torch
def test_missing_key_and_shape_mismatch_are_named(tmp_path) -> None:
    kw = CONFIGS["2_levels_groups8"]
    ref = _torch_vae(kw)
    cfg = VAEConfig.from_diffusers(dict(ref.config))
    sd = dict(ref.state_dict())

    missing = dict(sd)
    del missing["encoder.down_blocks.0.resnets.0.conv1.weight"]
    missing["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointFormatError) as err:
        convert_diffusers_vae(missing, cfg)
    msg = str(err.value)
    assert "missing keys: encoder.down_blocks.0.resnets.0.conv1.weight" in msg
    assert "unexpected keys: encoder.extra.weight" in msg

    bad = dict(sd)
    bad["decoder.conv_out.bias"] = torch.zeros(5)
    with pytest.raises(CheckpointFormatError, match=r"decoder\.conv_out\.bias.*\(5,\).*expected \(3,\)"):
        convert_diffusers_vae(bad, cfg)

    # Through the loader: a saved folder whose weights lack a key.
    ref.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = safetensors_torch.load_file(str(weights))
    del state["decoder.mid_block.attentions.0.to_k.bias"]
    safetensors_torch.save_file(state, str(weights))
    with pytest.raises(
        CheckpointFormatError, match=r"missing keys: decoder\.mid_block\.attentions\.0\.to_k\.bias"
    ):
        load_diffusers_vae(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "AutoencoderKL"


def test_logical_axes_and_bf16_compute() -> None:
    from flax import nnx

    from dit_jax.models.vae import AutoencoderKL

    cfg = VAEConfig(**CONFIGS["2_levels_groups8"])
    vae = AutoencoderKL(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    for path, param in nnx.iter_graph(vae):
        if isinstance(param, nnx.Param):
            axes = param.get_metadata().get("logical_axes")
            assert axes is not None and len(axes) == param[...].ndim, path
            assert param[...].dtype == jnp.float32, path
    x = jnp.zeros((1, 16, 16, 3), jnp.bfloat16)
    mean, std = vae.encode(x)
    assert mean.shape == (1, 8, 8, 4) and mean.dtype == jnp.bfloat16
    assert vae.decode(mean).shape == (1, 16, 16, 3)

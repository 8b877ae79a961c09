"""The NNX SD-VAE port against diffusers' AutoencoderKL (random weights, tiny configs, CPU, float32)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from dit_jax.interop.diffusers_vae import convert_diffusers_vae, load_diffusers_vae  # noqa: E402
from dit_jax.interop.torch_checkpoint import CheckpointFormatError  # noqa: E402
from dit_jax.models.vae import VAEConfig  # noqa: E402

ATOL = 1e-5

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


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_decode_match_diffusers(name: str, tmp_path) -> None:
    kw = CONFIGS[name]
    ref = _torch_vae(kw)
    ref.save_pretrained(tmp_path)
    vae = load_diffusers_vae(tmp_path)
    assert vae.scaling_factor == pytest.approx(0.18215)

    x_NCHW = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(x_NCHW)).latent_dist
        z_NCHW = np.random.default_rng(1).standard_normal(dist.mean.shape).astype(np.float32)
        out_NCHW = ref.decode(torch.from_numpy(z_NCHW)).sample.numpy()
    mean, std = jax.jit(lambda x: tuple(vae.encode(x)))(jnp.asarray(x_NCHW.transpose(0, 2, 3, 1)))
    out = jax.jit(vae.decode)(jnp.asarray(z_NCHW.transpose(0, 2, 3, 1)))

    diffs = {
        "mean": np.max(np.abs(_nchw(mean) - dist.mean.numpy())),
        "std": np.max(np.abs(_nchw(std) - dist.std.numpy())),
        "decode": np.max(np.abs(_nchw(out) - out_NCHW)),
    }
    print(name, diffs)
    assert all(d <= ATOL for d in diffs.values()), diffs


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
    with torch.no_grad():
        want = ref.decode(torch.from_numpy(z_NCHW)).sample.numpy()
    got = _nchw(vae.decode(jnp.asarray(z_NCHW.transpose(0, 2, 3, 1))))
    assert np.max(np.abs(got - want)) <= ATOL


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

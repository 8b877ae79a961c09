"""Typed, validated experiment configuration.

Configs are written as `ml_collections.ConfigDict` (see configs/) and converted once, at the edge,
into the frozen dataclasses below. Library code only ever sees these dataclasses. Every validation
error is a `ConfigError` whose message names the offending key.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots", "offload")

# DiT variant table (Peebles & Xie, Table 1): name -> (depth, hidden_size, num_heads).
DIT_VARIANTS = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)


def dit_variant(name: str) -> dict:
    """Model fields of a published DiT variant, e.g. "XL/2" -> depth 28, width 1152, 16 heads, patch 2."""
    size, _, patch = name.partition("/")
    if size not in DIT_VARIANTS or not patch.isdigit() or int(patch) not in PATCH_SIZES:
        known = ", ".join(f"{s}/{p}" for s in DIT_VARIANTS for p in PATCH_SIZES)
        raise ConfigError(f"config key 'model.variant': unknown variant {name!r}; expected one of {known}")
    depth, hidden, heads = DIT_VARIANTS[size]
    return dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch))


class ConfigError(ValueError):
    """A user error in the experiment configuration; the message names the key."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _check_choice(value: Any, key: str, choices: tuple) -> None:
    _check(value in choices, key, f"got {value!r}, expected one of {', '.join(map(repr, choices))}")


@dataclasses.dataclass(frozen=True)
class Model:
    """DiT backbone (Peebles & Xie), with the options of SiT, REPA and LightningDiT.

    `dit_variant("XL/2")` gives the published sizes."""

    image_size: int = 32
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout: float = 0.1
    learn_sigma: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Blocks: scan_blocks stores the blocks' parameters stacked (a leading "layers" axis) and applies
    #   them with one lax.scan, so that compile time does not grow with depth; None = on for
    #   depth >= 8. With MoE every k-th block, a scan step is a group of k blocks. Weights in the
    #   per-block layout (published checkpoints, older runs) convert on load (models.layout).
    # remat: what the backward pass keeps of each block's forward: "none" (everything), "full"
    #   (only the block inputs; recompute the rest), "save_dots" (also the matmul outputs, the
    #   experts' grouped matmuls and the attention kernel's output and LSE), "offload" (the same
    #   outputs moved to host memory; backends with a pinned_host memory). None = "save_dots" for
    #   scanned blocks (a scan keeps every residual as a stacked loop output, where per-block XLA
    #   would fuse the elementwise ones away), else "none"; see `remat_policy`.
    scan_blocks: bool | None = None
    remat: str | None = None
    # Mixture of experts (DiT-MoE, models.moe): num_experts > 0 replaces the MLP of every
    #   moe_every-th block (blocks k-1, 2k-1, ...) by experts_per_token-of-num_experts routed experts
    #   plus shared_experts always-on experts; moe_capacity: expert capacity factor (0 = dropless);
    #   the train loss adds moe_balance_weight x the load-balance loss and moe_z_loss_weight x the
    #   router z-loss, averaged over MoE blocks.
    num_experts: int = 0
    experts_per_token: int = 2
    shared_experts: int = 0
    moe_every: int = 1
    moe_capacity: float = 0.0
    moe_balance_weight: float = 0.01
    moe_z_loss_weight: float = 0.0
    # Conventions of other implementations, for loading their weights exactly:
    # timestep_freq_shift: sinusoid frequencies exp(-ln(10^4) i / (half - shift)); 0 = DiT/ADM,
    #   1 = diffusers' DiTTransformer2DModel (Timesteps(downscale_freq_shift=1)).
    # mlp_norm_eps: epsilon of the LayerNorm before the MLP; 1e-6 = DiT, 1e-5 = diffusers.
    timestep_freq_shift: int = 0
    mlp_norm_eps: float = 1e-6
    # Architecture options of SiT / REPA / LightningDiT (defaults: the plain DiT):
    # mlp: "gelu" (DiT's fc1-GELU(tanh)-fc2, hidden int(D mlp_ratio)) or "swiglu" (LightningDiT:
    #   silu(x W1) * (x W2) W3, hidden int(2/3 int(D mlp_ratio))).
    # norm: "layernorm" (DiT: affine-free LayerNorm, eps 1e-6) or "rmsnorm" (LightningDiT: RMSNorm
    #   with a learned scale, eps 1e-6) for the two block norms and the final norm.
    # qk_norm: normalise queries and keys per head before attention: an affine LayerNorm (eps 1e-5,
    #   timm's qk_norm, as REPA's SiT) under norm="layernorm", an RMSNorm with scale under "rmsnorm".
    # rope: 2-D rotary embedding of q and k on the patch grid (LightningDiT's EVA-02
    #   VisionRotaryEmbeddingFast: first half of each head rotated by the row, second by the column),
    #   on top of the fixed sin-cos position table; needs head_dim % 4 == 0.
    # repa_depth: REPA's encoder_depth, the number of blocks after which the hidden states go through
    #   the projector (Linear-SiLU-Linear-SiLU-Linear, widths repa_projector_dim and
    #   repa_feature_dim) for the alignment loss; 0 = no projector.
    mlp: str = "gelu"
    norm: str = "layernorm"
    qk_norm: bool = False
    rope: bool = False
    repa_depth: int = 0
    repa_projector_dim: int = 2048
    repa_feature_dim: int = 768
    # μP (models.mup; Yang et al., Tensor Programs V; Zheng et al., "Scaling Diffusion Transformers
    #   Efficiently via μP"): parametrization "sp" (standard, DiT's) or "mup". Under "mup" the model is
    #   parametrised relative to its base model, this config at hidden_size=mup_base_width (same
    #   num_heads, so head_dim grows with width): hidden (matrix-like) weights get AdamW learning
    #   rates x base/width and init std x sqrt(base/width), readouts (final projection, MoE router,
    #   REPA projector input) an output multiplier base/width, attention logits sqrt(d_base) / d
    #   instead of 1 / sqrt(d). At hidden_size == mup_base_width, "mup" is "sp"; tune there, then
    #   scale hidden_size with the same optimizer settings.
    parametrization: str = "sp"
    mup_base_width: int = 128

    def __post_init__(self):
        for key in ("image_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads"):
            _check(getattr(self, key) > 0, f"model.{key}", "must be positive")
        _check(
            self.image_size % self.patch_size == 0,
            "model.patch_size",
            f"patch size {self.patch_size} does not divide image size {self.image_size}; "
            "choose a patch size that divides it",
        )
        _check(
            self.hidden_size % self.num_heads == 0,
            "model.num_heads",
            f"{self.num_heads} heads do not divide hidden size {self.hidden_size}",
        )
        _check(self.num_classes >= 0, "model.num_classes", "must be >= 0 (0 = unconditional)")
        _check(0.0 <= self.class_dropout < 1.0, "model.class_dropout", "must be in [0, 1)")
        _check(self.timestep_freq_shift in (0, 1), "model.timestep_freq_shift", "must be 0 or 1")
        _check(self.mlp_norm_eps > 0, "model.mlp_norm_eps", "must be positive")
        _check_choice(self.dtype, "model.dtype", DTYPES)
        _check_choice(self.param_dtype, "model.param_dtype", DTYPES)
        _check_choice(self.mlp, "model.mlp", ("gelu", "swiglu"))
        _check_choice(self.norm, "model.norm", ("layernorm", "rmsnorm"))
        _check(self.mlp_ratio > 0, "model.mlp_ratio", "must be positive")
        _check(self.mlp_hidden_size > 0, "model.mlp_ratio", f"gives an empty MLP ({self.mlp_hidden_size})")
        head_dim = self.hidden_size // self.num_heads
        _check(
            not self.rope or head_dim % 4 == 0,
            "model.rope",
            f"2-D RoPE needs a head dimension divisible by 4, got {head_dim} "
            f"(hidden_size {self.hidden_size} / num_heads {self.num_heads})",
        )
        _check(
            0 <= self.repa_depth <= self.depth,
            "model.repa_depth",
            f"must be in [0, depth={self.depth}] (0 = no REPA projector), got {self.repa_depth}",
        )
        for key in ("repa_projector_dim", "repa_feature_dim"):
            _check(getattr(self, key) > 0, f"model.{key}", "must be positive")
        if self.remat is not None:
            _check_choice(self.remat, "model.remat", REMAT_POLICIES)
        self._check_moe()
        self._check_mup()
        if self.scan_blocks:
            p = self.block_period
            _check(
                self.depth % p == 0 and self.repa_depth % p == 0,
                "model.scan_blocks",
                f"scanning groups of {p} blocks (MoE every {p}) needs depth ({self.depth}) and "
                f"repa_depth ({self.repa_depth}) divisible by {p}; set model.scan_blocks=False",
            )

    def _check_moe(self) -> None:
        _check(self.num_experts >= 0, "model.num_experts", "must be >= 0 (0 = dense MLPs)")
        if not self.num_experts:
            return
        _check(
            1 <= self.experts_per_token <= self.num_experts,
            "model.experts_per_token",
            f"must be in [1, num_experts={self.num_experts}], got {self.experts_per_token}",
        )
        _check(self.shared_experts >= 0, "model.shared_experts", "must be >= 0")
        _check(
            1 <= self.moe_every <= self.depth,
            "model.moe_every",
            f"must be in [1, depth={self.depth}], got {self.moe_every}",
        )
        _check(self.moe_capacity >= 0, "model.moe_capacity", "must be >= 0 (0 = dropless)")
        for key in ("moe_balance_weight", "moe_z_loss_weight"):
            _check(getattr(self, key) >= 0, f"model.{key}", "must be >= 0")

    def _check_mup(self) -> None:
        _check_choice(self.parametrization, "model.parametrization", ("sp", "mup"))
        _check(self.mup_base_width > 0, "model.mup_base_width", "must be positive")
        if self.parametrization != "mup" or self.mup_base_width == self.hidden_size:
            return
        base, heads = self.mup_base_width, self.num_heads
        _check(
            base % heads == 0,
            "model.mup_base_width",
            f"the μP base model (hidden_size={base}, num_heads={heads}) needs a base width divisible by "
            f"num_heads, e.g. {heads * max(1, base // heads)}",
        )
        try:
            dataclasses.replace(self, hidden_size=self.mup_base_width, parametrization="sp")
        except ConfigError as e:
            raise ConfigError(
                f"config key 'model.mup_base_width': the μP base model is invalid: {e}"
            ) from None

    def is_moe_block(self, i: int) -> bool:
        """Whether block i (0-based) has experts: every moe_every-th block, the last of each group."""
        return self.num_experts > 0 and (i + 1) % self.moe_every == 0

    @property
    def block_period(self) -> int:
        """Blocks per scan step: the repeat length of the block pattern (moe_every with MoE, else 1)."""
        return self.moe_every if self.num_experts else 1

    @property
    def scanned(self) -> bool:
        """Whether the blocks are stacked and scanned (scan_blocks, or by default depth >= 8 where the
        block pattern allows it)."""
        if self.scan_blocks is not None:
            return self.scan_blocks
        p = self.block_period
        return self.depth >= 8 and self.depth % p == 0 and self.repa_depth % p == 0

    @property
    def remat_policy(self) -> str:
        """The remat policy in force: `remat`, or by default "save_dots" when scanned, else "none"."""
        if self.remat is not None:
            return self.remat
        return "save_dots" if self.scanned else "none"

    @property
    def mlp_hidden_size(self) -> int:
        """Width of the MLP's hidden layer (each of the two SwiGLU branches for mlp="swiglu")."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        return int(2 / 3 * hidden) if self.mlp == "swiglu" else hidden

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class Attention:
    """Attention implementation and mask (see pallas_kernels.attention / pallas_kernels.masks).

    mask: "full", or "neighborhood:K" / "neighborhood:KH,KW" — each patch token attends to the
    tokens within a KH×KW window (odd sizes) around it on the patch grid (Neighborhood2D).
    """

    impl: str = "auto"
    mask: str = "full"
    context_impl: str = "ring"  # with mesh.context > 1: "ring" (K/V passed around) or "all_to_all"

    def __post_init__(self):
        _check_choice(self.impl, "attention.impl", ("auto", "xla", "dense", "chunked", "cudnn", "pallas"))
        _check_choice(self.context_impl, "attention.context_impl", ("ring", "all_to_all"))
        self.window()

    def window(self) -> tuple[int, int] | None:
        """(KH, KW) of a neighbourhood mask, None for full attention."""
        if self.mask == "full":
            return None
        kind, _, sizes = self.mask.partition(":")
        parts = sizes.split(",")
        _check(
            kind == "neighborhood" and 1 <= len(parts) <= 2 and all(p.strip().isdigit() for p in parts),
            "attention.mask",
            f"got {self.mask!r}; expected 'full', 'neighborhood:K' or 'neighborhood:KH,KW'",
        )
        window = tuple(int(p) for p in parts) * (3 - len(parts))
        _check(all(w % 2 == 1 for w in window), "attention.mask", f"window sizes must be odd, got {window}")
        return window


@dataclasses.dataclass(frozen=True)
class Objective:
    """Training objective.

    kind="flow": rectified flow, x_t = (1 - t) x0 + t eps, target v = eps - x0, t in [0, 1]
      (t = 0 is data). `t_sampling` "uniform" or "logit_normal" (SD3), then the SD3 shift
      t' = shift t / (1 + (shift - 1) t).
    kind="ddpm": epsilon prediction with DiT's linear beta schedule over `num_timesteps` steps;
      with model.learn_sigma the variational bound term of ADM's hybrid loss is added.

    How a flow network sees time (to train or load models of other code bases):
    `time_scale`: the timestep embedder receives time_scale * t (1000 here; 1 for SiT, REPA and
      LightningDiT). `time_direction`: "data_to_noise" (t = 0 is data, the network predicts
      noise - data; REPA) or "noise_to_data" (the network sees 1 - t, so 1 is data, and predicts
      data - noise; SiT, LightningDiT). `velocity_cosine_weight`: LightningDiT's velocity direction
      loss, weight * (1 - cos(v_pred, v)) over channels, averaged over pixels, added to the MSE.
    """

    kind: str = "flow"
    t_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    time_scale: float = 1000.0
    time_direction: str = "data_to_noise"
    velocity_cosine_weight: float = 0.0

    def __post_init__(self):
        _check_choice(self.kind, "objective.kind", ("flow", "ddpm"))
        _check(self.time_scale > 0, "objective.time_scale", "must be positive")
        _check_choice(self.time_direction, "objective.time_direction", ("data_to_noise", "noise_to_data"))
        _check(self.velocity_cosine_weight >= 0, "objective.velocity_cosine_weight", "must be >= 0")
        _check(
            self.kind == "flow"
            or (self.time_direction == "data_to_noise" and self.velocity_cosine_weight == 0),
            "objective.time_direction",
            "time_direction and velocity_cosine_weight apply to kind='flow' only",
        )
        _check_choice(self.t_sampling, "objective.t_sampling", ("uniform", "logit_normal"))
        _check(self.shift > 0, "objective.shift", "must be positive")
        _check(self.logit_std > 0, "objective.logit_std", "must be positive")
        _check(self.num_timesteps > 1, "objective.num_timesteps", "must be > 1")
        _check(
            0 < self.beta_start < self.beta_end < 1,
            "objective.beta_start",
            "need 0 < beta_start < beta_end < 1",
        )


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Sampling. `kind`: euler / heun (flow), ddpm / ddim (ddpm objective).

    `cfg_scale` 1.0 disables classifier-free guidance. Guidance applies only while the
    noise level t (fraction of the way from data to noise, in [0, 1]) lies in
    [guidance_low, guidance_high].
    """

    kind: str = "euler"
    num_steps: int = 50
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    ddim_eta: float = 0.0

    def __post_init__(self):
        _check_choice(self.kind, "sampler.kind", ("euler", "heun", "ddpm", "ddim"))
        _check(self.num_steps > 0, "sampler.num_steps", "must be positive")
        _check(self.cfg_scale >= 0, "sampler.cfg_scale", "must be >= 0")
        _check(
            0 <= self.guidance_low <= self.guidance_high <= 1,
            "sampler.guidance_low",
            "need 0 <= guidance_low <= guidance_high <= 1",
        )


# Names of dit_jax.parallel.rules.PRESETS (kept here so that configs validate without importing jax).
MESH_RULES = ("ddp", "fsdp", "fsdp_tp", "fsdp_tp_cp", "fsdp_tp_ep", "fsdp_tp_cp_ep")


@dataclasses.dataclass(frozen=True)
class Mesh:
    """Device mesh over the axes (data, fsdp, expert, context, tensor); -1 on one of them means "all
    remaining devices". The batch is split over dcn_data × data × fsdp × expert, the token sequence
    over context. dcn_data: data parallelism across TPU slices / groups of processes over the slow
    network (the outer factor of the data axis; see dit_jax.parallel.mesh). rules: the weight-sharding
    preset (dit_jax.parallel.rules.PRESETS)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1
    expert: int = 1
    dcn_data: int = 1
    rules: str = "fsdp"

    def __post_init__(self):
        sizes = {f"mesh.{a}": getattr(self, a) for a in ("data", "fsdp", "expert", "context", "tensor")}
        for key, value in sizes.items():
            _check(value == -1 or value >= 1, key, f"got {value}; use a positive size or -1")
        auto = [key for key, value in sizes.items() if value == -1]
        _check(len(auto) <= 1, auto[-1] if auto else "mesh", f"at most one mesh axis may be -1, got {auto}")
        _check(self.dcn_data >= 1, "mesh.dcn_data", f"got {self.dcn_data}; use a positive size")
        _check_choice(self.rules, "mesh.rules", MESH_RULES)


@dataclasses.dataclass(frozen=True)
class Optim:
    lr: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    # Warm-up: the decay at step n is min(ema_decay, (1 + n) / (10 + n)), so the EMA is not
    # dominated by the initial weights in short runs. Off = a constant decay, as in DiT.
    ema_warmup: bool = True

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", "must be positive")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check_choice(self.schedule, "optim.schedule", ("constant", "cosine"))
        _check(0 <= self.ema_decay < 1, "optim.ema_decay", "must be in [0, 1)")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")


@dataclasses.dataclass(frozen=True)
class Data:
    """Training data.

    source: "digits" (scikit-learn handwritten digits, TFDS/ArrayRecord), "image_folder"
    (`path` = folder of class sub-folders), "synthetic" (random, same element spec), or "latents"
    (`path` = a data set written by `dit-jax encode`).
    Elements are {"x": float32 [H, W, C] in [-1, 1], "y": int32}; for "latents", x is a VAE latent
    sample times the VAE's scaling factor, and image_size / channels are the latent's size and
    channels. Where the latents data set stores flipped latents, plain or flipped is drawn at
    random; hflip=True demands them. `vae`: the diffusers VAE that decodes samples of a latents
    run ("" = the one recorded in the data set). `with_images`: latents batches also hold "image",
    the clean uint8 image stored by `dit-jax encode --store_images` (REPA's encoder input).
    """

    source: str = "synthetic"
    path: str = ""
    data_dir: str = ""
    image_size: int = 32
    channels: int = 4
    num_classes: int = 1000
    num_workers: int = 0
    hflip: bool = False
    vae: str = ""
    with_images: bool = False

    def __post_init__(self):
        _check_choice(self.source, "data.source", ("digits", "image_folder", "synthetic", "latents"))
        _check(
            self.source != "image_folder" or bool(self.path),
            "data.path",
            "data.source='image_folder' needs data.path, a folder with one sub-folder per class",
        )
        _check(
            self.source != "latents" or bool(self.path),
            "data.path",
            "data.source='latents' needs data.path, a folder written by `dit-jax encode`",
        )
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(
            not self.with_images or self.source == "latents",
            "data.with_images",
            "only for data.source='latents' (batches then also hold the clean uint8 'image' stored by "
            "`dit-jax encode --store_images`); a pixel source's x is the image itself",
        )


@dataclasses.dataclass(frozen=True)
class Eval:
    """Evaluation every `eval_every` steps and by `dit-jax eval`.

    Digits runs get the proxy metrics (class_accuracy, fd_classifier, precision, recall,
    memorisation, copy_fraction); other data sets FID against `reference` (an ADM reference
    batch) with the FID Inception weights at `inception_weights` ("" = the default location).
    `best_metric` ("" = none) keeps the best checkpoint by that metric in workdir/best.
    """

    num_samples: int = 500
    batch_size: int = 256
    reference: str = ""
    inception_weights: str = ""
    best_metric: str = ""

    def __post_init__(self):
        _check(self.num_samples > 0, "eval.num_samples", "must be positive")
        _check(self.batch_size > 0, "eval.batch_size", "must be positive")


@dataclasses.dataclass(frozen=True)
class Repa:
    """REPA representation alignment (dit_jax.train.repa): `weight` (REPA's proj_coeff, 0.5 in the
    paper; 0 = off) times the alignment loss between the model's projector output after
    model.repa_depth blocks and the frozen `encoder`'s patch features of the clean image.

    encoder: "dinov2" (weights: the torch-hub file at `encoder_weights`, images resized to
    `encoder_image_size`) or "digits_classifier" (the project's digits classifier).
    """

    weight: float = 0.0
    encoder: str = "dinov2"
    encoder_weights: str = ""
    encoder_image_size: int = 224

    def __post_init__(self):
        _check(self.weight >= 0, "repa.weight", "must be >= 0 (0 disables REPA)")
        _check_choice(self.encoder, "repa.encoder", ("dinov2", "digits_classifier"))
        _check(self.encoder_image_size > 0, "repa.encoder_image_size", "must be positive")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    total_steps: int = 1000
    batch_size: int = 64
    log_every: int = 10
    checkpoint_every: int = 500
    sample_every: int = 0
    eval_every: int = 0
    keep_checkpoints: int = 3
    grid_samples_per_class: int = 8
    model: Model = Model()
    attention: Attention = Attention()
    objective: Objective = Objective()
    sampler: Sampler = Sampler()
    mesh: Mesh = Mesh()
    optim: Optim = Optim()
    data: Data = Data()
    eval: Eval = Eval()
    repa: Repa = Repa()

    def __post_init__(self):
        _check(self.total_steps > 0, "total_steps", "must be positive")
        _check(self.batch_size > 0, "batch_size", "must be positive")
        for key in ("log_every", "checkpoint_every", "sample_every", "eval_every"):
            _check(getattr(self, key) >= 0, key, "must be >= 0 (0 disables)")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        _check(
            self.sampler.kind in (("euler", "heun") if self.objective.kind == "flow" else ("ddpm", "ddim")),
            "sampler.kind",
            f"sampler {self.sampler.kind!r} does not fit objective {self.objective.kind!r}; "
            "use euler/heun for flow and ddpm/ddim for ddpm",
        )
        if self.objective.kind == "ddpm":
            _check(
                self.sampler.num_steps <= self.objective.num_timesteps,
                "sampler.num_steps",
                f"{self.sampler.num_steps} steps exceed the "
                f"{self.objective.num_timesteps} training timesteps",
            )
        m, d = self.model, self.data
        _check(
            self.repa.weight == 0 or m.repa_depth > 0,
            "model.repa_depth",
            "repa.weight > 0 needs the REPA projector: set model.repa_depth to REPA's encoder depth",
        )
        window = self.attention.window()
        grid = m.image_size // m.patch_size
        _check(
            window is None or max(window) <= 2 * grid - 1,
            "attention.mask",
            f"window {window} is wider than the {grid}×{grid} patch grid needs (max {2 * grid - 1})",
        )
        context = self.mesh.context
        _check(
            context < 2 or m.num_patches % context == 0,
            "mesh.context",
            f"the {m.num_patches} patch tokens do not split into {context} equal parts; choose a "
            "mesh.context that divides the token count",
        )
        _check(
            context < 2 or self.attention.context_impl != "all_to_all" or m.num_heads % context == 0,
            "attention.context_impl",
            f"all_to_all needs model.num_heads ({m.num_heads}) divisible by mesh.context ({context}); "
            "use attention.context_impl=ring",
        )
        expert = self.mesh.expert
        _check(
            expert < 2 or m.num_experts % expert == 0,
            "model.num_experts",
            f"{m.num_experts} experts do not split over mesh.expert={expert} devices; choose a "
            "number of experts divisible by mesh.expert (or mesh.expert=1)",
        )
        for key in ("image_size", "num_classes"):
            _check(
                getattr(m, key) == getattr(d, key),
                f"data.{key}",
                f"data.{key}={getattr(d, key)} but model.{key}={getattr(m, key)}; make them agree",
            )
        _check(
            m.in_channels == d.channels,
            "data.channels",
            f"data.channels={d.channels} but model.in_channels={m.in_channels}; make them agree",
        )


def _build(cls: type, values: Any, prefix: str):
    """Builds dataclass `cls` from a mapping, naming unknown keys and wrong types."""
    if dataclasses.is_dataclass(values):
        return values
    if not hasattr(values, "items"):
        raise ConfigError(f"config key '{prefix.rstrip('.')}': expected a group of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = prefix + key
        if key not in fields:
            raise ConfigError(f"unknown config key '{name}'; known keys here: {', '.join(sorted(fields))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, name + ".")
            continue
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        allowed = typing.get_args(hint) or (hint,)  # `bool | None` allows either
        if not isinstance(value, allowed) or (hint is int and isinstance(value, bool)):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
            raise ConfigError(f"config key '{name}': expected {names}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


# Top-level keys of earlier versions that no longer mean anything: `from_dict` drops them, so an
# older workdir's config.json still loads (and resumes: they are not part of the config compared).
RETIRED_KEYS = ("stop_on_nonfinite",)  # a non-finite loss always stops training


# Values of earlier versions with a new spelling: (group, key) -> {old value: new value}.
# model.remat was a bool (True = recompute each block in the backward pass).
RENAMED_VALUES = {("model", "remat"): {True: "full", False: "none"}}


def from_dict(values: Any) -> Config:
    """Converts a ConfigDict / nested dict into a validated `Config` (dropping RETIRED_KEYS and
    translating RENAMED_VALUES)."""
    if hasattr(values, "to_dict"):
        values = values.to_dict()
    if hasattr(values, "items"):
        values = {k: v for k, v in values.items() if k not in RETIRED_KEYS}
        for (group, key), renames in RENAMED_VALUES.items():
            if not hasattr(values.get(group), "items") or key not in values[group]:
                continue
            old = values[group][key]
            for before, after in renames.items():
                if type(old) is type(before) and old == before:
                    values[group] = {**values[group], key: after}
    return _build(Config, values, "")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


# Keys that may differ when `dit-jax train` resumes a workdir: they change neither the structure of
# the checkpointed train state and data-iterator state nor what is trained (model, objective, data,
# seed, optimizer form). "group.*" names a whole group. Not here, for example: optim.grad_clip (0 vs
# > 0 changes the optimizer state's tree), data.num_workers (0 vs > 0 changes the data iterator's
# state), model.param_dtype (restoring would silently cast), seed and data.path (other data).
RESUMABLE_KEYS = (
    "total_steps",
    "log_every",
    "checkpoint_every",
    "sample_every",
    "eval_every",
    "keep_checkpoints",
    "grid_samples_per_class",
    "batch_size",  # the data stream continues at the same batch index, at the new size
    "mesh.*",  # checkpoints restore onto any mesh
    "attention.impl",
    "attention.context_impl",
    "model.remat",
    "model.scan_blocks",  # checkpoints convert between the per-block and the stacked layout
    "model.dtype",  # compute precision only: parameters stay in model.param_dtype
    "sampler.*",
    "eval.*",
    "data.data_dir",
    "data.vae",
    "optim.lr",
    "optim.warmup_steps",
    "optim.schedule",
)


class _Missing:
    def __repr__(self) -> str:
        return "<unset>"


MISSING = _Missing()  # the value `diff` reports for a key that one side lacks


def is_resumable(key: str) -> bool:
    """Whether dotted config key `key` may change on resume (see RESUMABLE_KEYS)."""
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUMABLE_KEYS)


def diff(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs between two config dicts
    (as `to_dict` gives), in key order; a key that one side lacks has the value MISSING there."""

    def flat(tree: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = value
        return out

    a, b = flat(old), flat(new)
    keys = dict.fromkeys([*a, *b])
    return [(k, a.get(k, MISSING), b.get(k, MISSING)) for k in keys if a.get(k, MISSING) != b.get(k, MISSING)]

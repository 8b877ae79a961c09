"""Self-contained PyTorch transcriptions of LightningDiT (hustvl/LightningDiT, models/lightningdit.py with
models/rmsnorm.py, models/swiglu_ffn.py, models/pos_embed.py) and REPA's SiT (sihyun-yu/REPA,
models/sit.py), for numerical tests only: independent of dit_jax.

The pieces shared verbatim with the official DiT (timestep/label embedders, timm PatchEmbed and
Mlp, the MAE sin-cos table) come from torch_dit_reference. Parameter and buffer names match the
original checkpoints (blocks.0.mlp.w12.weight, feat_rope.freqs_cos, projectors.0.0.weight, ...).
Images are NCHW, as in the originals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_dit_reference as dit_ref
from torch import nn

modulate = dit_ref.modulate


class RMSNorm(nn.Module):
    """Llama's RMSNorm: x / sqrt(mean(x^2) + eps) in float32, times a learned weight (init 1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # x.float() in Llama: at least float32
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """EVA's rotate_half on interleaved pairs: '... (d r) -> ... d r', (x1, x2) -> (-x2, x1)."""
    x = x.reshape(*x.shape[:-1], -1, 2)
    x1, x2 = x.unbind(dim=-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class VisionRotaryEmbeddingFast(nn.Module):
    """EVA-02's 2-D RoPE ('lang' frequencies), einops replaced by plain torch ops."""

    def __init__(self, dim: int, pt_seq_len: int = 16, ft_seq_len: int | None = None, theta: float = 10000):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
        if ft_seq_len is None:
            ft_seq_len = pt_seq_len
        t = torch.arange(ft_seq_len) / ft_seq_len * pt_seq_len
        freqs = torch.einsum("..., f -> ... f", t, freqs)
        freqs = freqs.repeat_interleave(2, dim=-1)  # repeat '... n -> ... (n r)', r=2
        n = freqs.shape[0]
        # broadcat((freqs[:, None, :], freqs[None, :, :]), dim=-1)
        freqs = torch.cat([freqs[:, None, :].expand(n, n, -1), freqs[None, :, :].expand(n, n, -1)], dim=-1)
        self.register_buffer("freqs_cos", freqs.cos().view(-1, freqs.shape[-1]))
        self.register_buffer("freqs_sin", freqs.sin().view(-1, freqs.shape[-1]))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.freqs_cos + rotate_half(t) * self.freqs_sin


class SwiGLUFFN(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features)
        self.w3 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class Attention(nn.Module):
    """LightningDiT's attention (= timm's with qk_norm when use_rmsnorm is False), optional RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, use_rmsnorm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        norm_layer = RMSNorm if use_rmsnorm else nn.LayerNorm
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: VisionRotaryEmbeddingFast | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, head_dim]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class LightningDiTBlock(nn.Module):
    def __init__(
        self, hidden_size, num_heads, mlp_ratio=4.0, use_qknorm=False, use_swiglu=False, use_rmsnorm=False
    ):
        super().__init__()
        if use_rmsnorm:
            self.norm1, self.norm2 = RMSNorm(hidden_size), RMSNorm(hidden_size)
        else:
            self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=use_qknorm, use_rmsnorm=use_rmsnorm)
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        if use_swiglu:
            self.mlp = SwiGLUFFN(hidden_size, int(2 / 3 * mlp_hidden_dim))
        else:
            self.mlp = dit_ref.Mlp(hidden_size, mlp_hidden_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, feat_rope=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=1
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(
            modulate(self.norm1(x), shift_msa, scale_msa), rope=feat_rope
        )
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels, use_rmsnorm=False):
        super().__init__()
        if use_rmsnorm:
            self.norm_final = RMSNorm(hidden_size)
        else:
            self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def _fixed_pos_embed(num_patches: int, hidden_size: int) -> nn.Parameter:
    pos = dit_ref.get_2d_sincos_pos_embed(hidden_size, int(num_patches**0.5))
    return nn.Parameter(torch.from_numpy(pos).float().unsqueeze(0), requires_grad=False)


def _unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    h = w = int(x.shape[1] ** 0.5)
    x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(shape=(x.shape[0], c, h * p, h * p))


class LightningDiT(nn.Module):
    """LightningDiT (wo_shift=False). `forward` returns all output channels (the original drops the
    sigma half when learn_sigma; compare before that)."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=32,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=False,
        use_qknorm=False,
        use_swiglu=False,
        use_rope=False,
        use_rmsnorm=False,
    ):
        super().__init__()
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.x_embedder = dit_ref.PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = dit_ref.TimestepEmbedder(hidden_size)
        self.y_embedder = dit_ref.LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = _fixed_pos_embed(self.x_embedder.num_patches, hidden_size)
        if use_rope:
            half_head_dim = hidden_size // num_heads // 2
            self.feat_rope = VisionRotaryEmbeddingFast(dim=half_head_dim, pt_seq_len=input_size // patch_size)
        else:
            self.feat_rope = None
        self.blocks = nn.ModuleList(
            [
                LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm)
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm=use_rmsnorm)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c, self.feat_rope)
        return _unpatchify(self.final_layer(x, c), self.patch_size, self.out_channels)


def build_mlp(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


class REPASiT(nn.Module):
    """REPA's SiT: DiT blocks (timm attention with optional qk_norm), no learned sigma, and projectors
    of the hidden states after `encoder_depth` blocks. Returns (x, zs)."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        encoder_depth=8,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        z_dims=(768,),
        projector_dim=2048,
        qk_norm=False,
    ):
        super().__init__()
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.encoder_depth = encoder_depth
        self.x_embedder = dit_ref.PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = dit_ref.TimestepEmbedder(hidden_size)
        self.y_embedder = dit_ref.LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = _fixed_pos_embed(self.x_embedder.num_patches, hidden_size)
        self.blocks = nn.ModuleList(
            [LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm=qk_norm) for _ in range(depth)]
        )
        self.projectors = nn.ModuleList([build_mlp(hidden_size, projector_dim, z) for z in z_dims])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        n, length, d = x.shape
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        zs = None
        for i, block in enumerate(self.blocks):
            x = block(x, c)
            if (i + 1) == self.encoder_depth:
                zs = [projector(x.reshape(-1, d)).reshape(n, length, -1) for projector in self.projectors]
        x = self.final_layer(x, c)
        return _unpatchify(x, self.patch_size, self.out_channels), zs

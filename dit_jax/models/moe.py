"""DiT-MoE's mixture-of-experts feed-forward layer (Fei et al. 2024, "Scaling Diffusion Transformers
to 16 Billion Parameters"; reference code github.com/feizc/DiT-MoE, `MoEGate` / `SparseMoeBlock`).

Routing, per token x (float32, the router matmul at HIGHEST precision):

    logits = x W_r   (W_r: [D, E], no bias)      p = softmax(logits)      (g, e) = top_k(p, k)
    y = sum_j g_j MLP_{e_j}(x) + SharedMLP(x)

The top-k gates are *not* renormalised to sum to 1: the reference sets `norm_topk_prob = False`.
Each expert is the dense block's MLP ("gelu": fc1, GELU tanh, fc2; "swiglu": layers.SwiGLU), with
biases. The `shared_experts` experts every token goes through are one dense MLP of width
shared_experts * mlp_hidden (DeepSeekMoE's fused shared experts; the reference's SharedMLP is one
SwiGLU of width 2 * D, i.e. 2 * mlp_hidden / mlp_ratio).

Statistics over all tokens of the (global) batch, T tokens and T k assignments:

    expert_load_i = #{assignments to expert i} / (T k)           (f_i; before capacity dropping)
    balance_loss  = E sum_i f_i P_i,  P_i = mean over tokens of p_i     (1 when uniform; unweighted,
                    the reference multiplies it by alpha = 0.01; f is not differentiable)
    z_loss        = mean over tokens of logsumexp(logits)^2            (ST-MoE)

Capacity (capacity_factor > 0): the group is one example (its L tokens, also when mesh.context
splits the sequence). Each expert takes at most C = ceil(capacity_factor L k / E) assignments per
group, in priority order slot-major as GShard/Switch: every token's first choice (in token order)
before any second choice. An assignment over capacity contributes 0; `dropped_fraction` counts them.

Layout: expert weights are stacked [E, ...] with logical axes ("expert", "embed", "mlp") etc. The
assignments are sorted by expert and each expert's rows go through `jax.lax.ragged_dot` (native
grouped matmul on TPU, Triton / XLA on GPU; on CPU JAX lowers it to a masked dense matmul, E times
the FLOPs, which is fine at CPU sizes). Nothing of size [tokens, E, D] is built.

On a mesh the layer runs under `jax.shard_map` (as attention does): tokens split as the activation
rules split them (batch over data/fsdp/expert, sequence over context), expert weights' leading dim
over `expert` and the MLP dim over `tensor`. Expert parallelism: each device all-gathers the tokens
(and their routing) of its `expert` group, runs its E / expert local experts over the assignments
that chose them, and a psum_scatter over `expert` (then a psum over `tensor`) returns each token's
sum to its device. With static shapes a dropless all-to-all would need buffers sized for the worst
case anyway (every assignment to one device), so the all-gather moves no more bytes. The local row
buffer holds expert * T_local * min(k, E_local) rows (dropless) or expert * B_local * E_local * C
(with capacity). Results equal the unsharded layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from dit_jax.models.layers import Dense, Mlp, SwiGLU
from dit_jax.parallel.rules import ACTIVATION_RULES, spec_for

MLPS = ("gelu", "swiglu")
# Per-expert Xavier-uniform over [D, F] (the leading expert dim is a batch dim); the router as
# PyTorch's default (kaiming_uniform(a=sqrt(5)): U(-1/sqrt(D), 1/sqrt(D))), as the reference's MoEGate.
_expert_init = jax.nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
_router_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class _Axes:
    """Mesh axes inside shard_map: `tokens` split the tokens (statistics are psum'd over them);
    `context` splits each example's sequence; `expert` the experts; `tensor` the MLP features."""

    tokens: tuple[str, ...] = ()
    context: tuple[str, ...] = ()
    expert: str | None = None
    tensor: str | None = None


def _names(spec_entry) -> tuple[str, ...]:
    return () if spec_entry is None else (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


class MoE(nnx.Module):
    """Top-k routed experts plus shared experts; returns (y_BLD, aux) (see the module docstring)."""

    def __init__(
        self,
        hidden: int,
        mlp_hidden: int,
        *,
        num_experts: int,
        experts_per_token: int,
        shared_experts: int = 0,
        capacity_factor: float = 0.0,
        mlp: str = "gelu",
        router_mult: float | None = None,
        rngs: nnx.Rngs,
        dtype,
        param_dtype,
    ):
        """`router_mult`: a multiplier on the router logits (μP's readout multiplier, models.mup)."""
        if mlp not in MLPS:
            raise ValueError(f"mlp must be one of {MLPS}, got {mlp!r}")
        if not 1 <= experts_per_token <= num_experts:
            raise ValueError(f"experts_per_token must be in [1, {num_experts}], got {experts_per_token}")
        self.k = experts_per_token
        self.capacity_factor = float(capacity_factor)
        self.mlp = mlp
        self.dtype = dtype
        self.router_mult = router_mult
        e, d, f = num_experts, hidden, mlp_hidden
        self.router = Dense(
            d, e, use_bias=False, dtype=jnp.float32, param_dtype=param_dtype, kernel_init=_router_init,
            precision=jax.lax.Precision.HIGHEST, kernel_metadata={"logical_axes": ("embed", None)},
            rngs=rngs,
        )  # fmt: skip
        if mlp == "gelu":
            w_in, in_axes = _expert_init(rngs.params(), (e, d, f), param_dtype), ("expert", "embed", "mlp")
        else:  # SwiGLU's fused [D, 2, F] input weight per expert, Xavier over [D, 2F] as layers.SwiGLU
            w_in = _expert_init(rngs.params(), (e, d, 2 * f), param_dtype).reshape(e, d, 2, f)
            in_axes = ("expert", "embed", None, "mlp")
        self.w_in = nnx.Param(w_in, logical_axes=in_axes)
        # b_in: w_in without its embed dim ([E, F] or [E, 2, F]).
        b_in = jnp.zeros((e, *w_in.shape[2:]), param_dtype)
        self.b_in = nnx.Param(b_in, logical_axes=(in_axes[0], *in_axes[2:]))
        w_out = _expert_init(rngs.params(), (e, f, d), param_dtype)
        self.w_out = nnx.Param(w_out, logical_axes=("expert", "mlp", "embed"))
        self.b_out = nnx.Param(jnp.zeros((e, d), param_dtype), logical_axes=("expert", "embed"))
        shared_cls = SwiGLU if mlp == "swiglu" else Mlp
        self.shared = (
            shared_cls(d, shared_experts * f, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            if shared_experts
            else None
        )

    def __call__(self, x_BLD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """aux: balance_loss, z_loss (f32 scalars), expert_load (f32 [E], sums to 1), dropped_fraction."""
        dtype = self.dtype or x_BLD.dtype
        b, length, _ = x_BLD.shape
        e, f = self.w_out.shape[:2]
        router = self.router.kernel[...]
        if self.router_mult is not None:  # x (W c) = (x c) W: μP's multiplier on the readout's input
            router = router * self.router_mult
        experts = {n: getattr(self, n)[...].astype(dtype) for n in ("w_in", "b_in", "w_out", "b_out")}
        run = functools.partial(
            _routed, k=self.k, capacity_factor=self.capacity_factor, mlp=self.mlp, dtype=dtype
        )
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1 or mesh.manual_axes:
            y_BLD, aux = run(x_BLD, router, experts, axes=_Axes())
        else:
            shape = dict(mesh.shape)
            batch = _names(spec_for(("act_batch",), (b,), ACTIVATION_RULES, shape)[0])
            context = _names(spec_for(("act_seq",), (length,), ACTIVATION_RULES, shape)[0])
            (expert,) = _names(spec_for(("act_expert",), (e,), ACTIVATION_RULES, shape)[0]) or (None,)
            (tensor,) = _names(spec_for(("act_mlp",), (f,), ACTIVATION_RULES, shape)[0]) or (None,)
            if expert not in batch:  # the batch does not split over `expert`: experts stay whole
                expert = None
            axes = _Axes(batch + context, context, expert, tensor)
            x_spec = P(batch or None, context or None, None)
            lead = (expert, *[None] * (experts["w_in"].ndim - 2))
            w_specs = {
                "w_in": P(*lead, tensor), "b_in": P(*lead[:-1], tensor),
                "w_out": P(expert, tensor, None), "b_out": P(expert, None),
            }  # fmt: skip
            y_BLD, aux = jax.shard_map(
                functools.partial(run, axes=axes),
                mesh=mesh,
                in_specs=(x_spec, P(), w_specs),
                out_specs=(x_spec, P()),
            )(x_BLD, router, experts)
        if self.shared is not None:
            y_BLD = y_BLD + self.shared(x_BLD).astype(y_BLD.dtype)
        return y_BLD, aux


def _positions(idx_BLK: jax.Array, num_experts: int, context: tuple[str, ...]) -> jax.Array:
    """Each assignment's place in its expert's queue within its example: slot-major, then token order
    (over the whole sequence when `context` splits it)."""
    onehot = jax.nn.one_hot(idx_BLK, num_experts, dtype=jnp.int32).transpose(0, 2, 1, 3)  # [B, K, L, E]
    within = jnp.cumsum(onehot, axis=2) - onehot  # earlier tokens of the same slot on this shard
    counts_BKE = onehot.sum(2)
    before = 0
    if context:  # assignments of the same slot on earlier shards of the sequence
        every = jax.lax.all_gather(counts_BKE, context)  # [S, B, K, E]
        earlier = jnp.arange(every.shape[0]) < jax.lax.axis_index(context)
        before = jnp.sum(every * earlier[:, None, None, None], axis=0)
        counts_BKE = every.sum(0)
    offset_BKE = jnp.cumsum(counts_BKE, axis=1) - counts_BKE + before  # all earlier slots + shards
    return jnp.sum((within + offset_BKE[:, :, None]) * onehot, axis=-1).transpose(0, 2, 1)


def _routed(x_BLD, router_DE, experts, *, k, capacity_factor, mlp, dtype, axes: _Axes):
    """The routed experts on this device's tokens (the whole layer when `axes` is empty)."""
    b, length, d = x_BLD.shape
    e = router_DE.shape[-1]
    psum = (lambda v: jax.lax.psum(v, axes.tokens)) if axes.tokens else (lambda v: v)
    n_tokens = b * length * (jax.lax.axis_size(axes.tokens) if axes.tokens else 1)

    x_TD = x_BLD.reshape(b * length, d)
    logits_TE = jnp.dot(x_TD.astype(jnp.float32), router_DE.astype(jnp.float32), precision="highest")
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    gate_TK, idx_TK = jax.lax.top_k(probs_TE, k)  # descending: slot 0 is each token's first choice
    load_E = psum(jnp.bincount(idx_TK.reshape(-1), length=e).astype(jnp.float32)) / (n_tokens * k)
    aux = {
        "balance_loss": e * jnp.sum(load_E * psum(probs_TE.sum(0)) / n_tokens),
        "z_loss": psum(jnp.sum(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1)))) / n_tokens,
        "expert_load": load_E,
        "dropped_fraction": jnp.zeros((), jnp.float32),
    }
    keep_TK = jnp.ones(idx_TK.shape, bool)
    rows_per_group = None
    if capacity_factor > 0:
        seq = length * (jax.lax.axis_size(axes.context) if axes.context else 1)
        capacity = math.ceil(capacity_factor * seq * k / e)
        keep_TK = (_positions(idx_TK.reshape(b, length, k), e, axes.context) < capacity).reshape(-1, k)
        aux["dropped_fraction"] = psum(jnp.sum(~keep_TK).astype(jnp.float32)) / (n_tokens * k)
        rows_per_group = capacity

    # Expert parallelism: this device's experts see every token of its `expert` group.
    e_local, first, ep = e, 0, 1
    if axes.expert:
        gather = functools.partial(jax.lax.all_gather, axis_name=axes.expert, tiled=True)
        x_TD, gate_TK, idx_TK, keep_TK = map(gather, (x_TD, gate_TK, idx_TK, keep_TK))
        ep = jax.lax.axis_size(axes.expert)
        e_local = e // ep
        first = jax.lax.axis_index(axes.expert) * e_local
    local_TK = idx_TK - first
    valid_TK = keep_TK & (local_TK >= 0) & (local_TK < e_local)
    key_A = jnp.where(valid_TK, local_TK, e_local).reshape(-1)  # not computed here: sorted last
    rows = x_TD.shape[0] * min(k, e_local)
    if rows_per_group is not None:
        rows = min(rows, ep * b * e_local * rows_per_group)
    order_R = jnp.argsort(key_A, stable=True)[:rows]  # by local expert, then token, then slot
    sizes_G = jnp.bincount(key_A, length=e_local + 1)[:e_local]
    row_valid_R = key_A[order_R] < e_local
    row_expert_R = jnp.minimum(key_A[order_R], e_local - 1)
    tok_R = order_R // k
    # Rows past the last group are masked on the way in and out: a grouped-matmul kernel may leave
    # them unwritten, and their gradient must not reach x.
    xs_RD = jnp.where(row_valid_R[:, None], x_TD[tok_R].astype(dtype), 0)
    bias_out = experts["b_out"]
    if axes.tensor:  # the psum over `tensor` adds the partial products; the bias goes in once
        bias_out = bias_out * (jax.lax.axis_index(axes.tensor) == 0).astype(dtype)
    y_RD = _expert_mlps(xs_RD, sizes_G, row_expert_R, {**experts, "b_out": bias_out}, mlp)
    gate_R = gate_TK.reshape(-1)[order_R]
    contrib_RD = jnp.where(row_valid_R[:, None], y_RD.astype(jnp.float32) * gate_R[:, None], 0)
    # Gates and the sum over a token's k rows in float32; the collectives move the compute dtype.
    y_TD = jnp.zeros(x_TD.shape, jnp.float32).at[tok_R].add(contrib_RD).astype(dtype)
    if axes.expert:
        y_TD = jax.lax.psum_scatter(y_TD, axes.expert, scatter_dimension=0, tiled=True)
    if axes.tensor:
        y_TD = jax.lax.psum(y_TD, axes.tensor)
    return y_TD.reshape(b, length, d), aux


# The experts' grouped-matmul outputs, named for remat policies: `ragged_dot` is not a dot_general,
# so jax.checkpoint_policies.dots_with_no_batch_dims_saveable alone would recompute them.
EXPERT_MATMULS = ("moe_expert_in", "moe_expert_out")


def _expert_mlps(xs_RD, sizes_G, expert_R, p, mlp: str) -> jax.Array:
    """Each row through its expert's MLP; rows sorted by expert, `sizes_G` rows per expert."""
    g, d = p["w_in"].shape[:2]
    h = checkpoint_name(jax.lax.ragged_dot(xs_RD, p["w_in"].reshape(g, d, -1), sizes_G), EXPERT_MATMULS[0])
    h = h + p["b_in"].reshape(g, -1)[expert_R]
    if mlp == "gelu":
        h = jax.nn.gelu(h, approximate=True)
    else:
        h = h.reshape(h.shape[0], 2, -1)
        h = jax.nn.silu(h[:, 0]) * h[:, 1]
    out = checkpoint_name(jax.lax.ragged_dot(h, p["w_out"], sizes_G), EXPERT_MATMULS[1])
    return out + p["b_out"][expert_R]

"""Remat policies on real kernels: under `model.remat=save_dots` (the scanned default) the backward
pass of a scanned DiT reuses the attention kernel's saved output and LSE instead of running the
forward kernel again, and the experts' saved grouped-matmul outputs instead of running those again;
so does `offload`, which keeps them in host memory; `full` recomputes both. Counted in the lowered
train step (StableHLO, nothing compiled) for TPU v5p (Mosaic) and H100 (Mosaic GPU forward)."""

import re

import jax
import pytest

from dit_jax import config_files
from dit_jax import plan as plan_lib
from dit_jax.parallel import mesh as mesh_lib
from dit_jax.train.step import build_train_step

# target -> (devices, the forward kernel's calls in the lowered program: the Mosaic TPU kernel by
# name; on sm_90 the Mosaic GPU forward, the only Mosaic GPU call, beside the Triton backward)
TARGETS = {
    "tpu:v5p:2x2x1": (4, r"\bflash_fwd_tpu\b"),
    "gpu:h100:1x8": (8, r"custom_call @mosaic_gpu(?:_v2)?\b"),
}
REMATS = ("none", "save_dots", "offload", "full")


def lowered_step(target, devices: int, remat: str, *overrides: str) -> str:
    cfg = config_files.load(
        "dit:variant=S/2",
        ["--config.model.depth=4", "--config.model.scan_blocks=True", f"--config.model.remat={remat}",
         "--config.model.dtype=bfloat16", "--config.attention.impl=pallas", "--config.mesh.data=1",
         f"--config.mesh.fsdp={devices}", f"--config.batch_size={2 * devices}", *overrides],
    )  # fmt: skip
    mesh = plan_lib.check(cfg, target)
    built = build_train_step(cfg, mesh)
    state = plan_lib.abstract_state(cfg, built)
    batch = plan_lib.abstract_batch(cfg, mesh_lib.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        return built.step_fn.lower(state, batch, None).as_text()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_save_dots_keeps_the_attention_kernel_outputs(name, aot_target):
    target = aot_target(name)
    devices, pattern = TARGETS[name]
    calls = {r: len(re.findall(pattern, lowered_step(target, devices, r))) for r in REMATS}
    assert calls["none"] >= 1
    assert calls["save_dots"] == calls["offload"] == calls["none"], calls  # the forward loop's call only
    assert calls["full"] > calls["none"], calls  # the backward loop runs it again


def test_save_dots_keeps_the_expert_matmul_outputs(aot_target):
    """DiT-MoE (4 experts in every 2nd block): `ragged_dot` is not a dot_general, so without their
    names (models.moe.EXPERT_MATMULS) save_dots would recompute the experts' matmuls."""
    target = aot_target("tpu:v5p:2x2x1")
    moe = ("--config.model.num_experts=4", "--config.model.moe_every=2")
    calls = {r: lowered_step(target, 4, r, *moe).count("ragged_dot") for r in REMATS}
    assert calls["none"] >= 2
    assert calls["save_dots"] == calls["offload"] == calls["none"], calls
    assert calls["full"] > calls["none"], calls

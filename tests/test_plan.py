"""`dit-jax plan` on fake CPU devices: the CLI's JSON, the library's figures against real shards, the
FSDP state of DiT-XL/2, and bad input (one line, exit code 2). TPU / GPU targets: tests/aot."""

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys

import jax
import pytest

from dit_jax import config as config_lib
from dit_jax import flops, plan
from dit_jax.cli import main
from dit_jax.config_files import apply_overrides, load_config_file
from dit_jax.parallel import targets
from dit_jax.train import state as state_lib
from dit_jax.train.step import build_train_step

TINY = "configs/dit.py:variant=S/2,smoke"  # 2 blocks of width 32 on 8x8x4 inputs
TINY_ARGS = ["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.batch_size=16"]
XL = "configs/dit.py:variant=XL/2"
JSON_KEYS = {"target", "num_devices", "state_bytes_total", "state_bytes_per_device", "temp_bytes_per_device",
             "device_memory_bytes", "fits", "flops_per_step", "custom_calls", "compile_s"}  # fmt: skip


def load(spec: str, *overrides: str) -> config_lib.Config:
    return config_lib.from_dict(apply_overrides(load_config_file(spec), list(overrides)))


def run_main(capsys, *argv: str) -> tuple[int, list[str]]:
    code = main(["plan", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One `dit-jax plan --json --dump_hlo` of the tiny config on cpu:8 (in process: 8 devices exist)."""
    hlo = tmp_path_factory.mktemp("plan") / "step.hlo"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["plan", f"--config={TINY}", "--target=cpu:8", "--json", f"--dump_hlo={hlo}", *TINY_ARGS])
    return code, out.getvalue().strip().splitlines(), hlo


def test_cli_prints_table_then_json(cli_run):
    code, lines, hlo = cli_run
    assert code == 0
    report = json.loads(lines[-1])
    assert JSON_KEYS <= set(report)
    assert report["target"] == "cpu:8" and report["num_devices"] == 8
    assert report["mesh"] == {"data": 1, "fsdp": 8, "expert": 1, "context": 1, "tensor": 1}
    assert report["device_memory_bytes"] is None and report["fits"] is None  # CPU: no device memory
    assert report["compile_s"] > 0 and isinstance(report["custom_calls"], list)
    assert any(line.startswith("total / device") and "no device memory" in line for line in lines)
    text = hlo.read_text()
    assert text.startswith("HloModule jit_train_step") and "num_partitions=8" in text


def test_library_figures_match_real_shards(cli_run):
    """The per-device bytes computed from the shardings are those of the state the trainer
    initialises; the compiler's argument / alias bytes are that state (+ the batch; donated)."""
    cfg = load(TINY, *TINY_ARGS)
    target = targets.get("cpu:8")
    report = plan.plan(cfg, target)
    from_cli = json.loads(cli_run[1][-1])
    for key in ("state_bytes_per_device", "state_bytes_total", "temp_bytes_per_device", "custom_calls"):
        assert report.to_dict()[key] == from_cli[key]

    built = build_train_step(cfg, plan.check(cfg, target))
    state = state_lib.init_state(cfg, built.spec, built.tx, built.shardings)
    on_device0 = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))
    assert report.params_bytes_per_device == on_device0(state.params) == report.ema_bytes_per_device
    assert report.opt_state_bytes_per_device == on_device0(state.opt_state)
    assert report.state_bytes_per_device == on_device0(state)
    assert report.state_bytes_total == sum(x.nbytes for x in jax.tree.leaves(state))
    assert report.num_params == sum(x.size for x in jax.tree.leaves(state.params))
    per_device_batch = 16 // 8 * (8 * 8 * 4 * 4 + 4)  # x float32 [2, 8, 8, 4] and y int32 [2]
    assert report.batch_bytes_per_device == per_device_batch
    assert report.argument_bytes_per_device == report.state_bytes_per_device + per_device_batch
    assert report.alias_bytes_per_device == report.state_bytes_per_device
    total = report.argument_bytes_per_device + report.output_bytes_per_device - report.alias_bytes_per_device
    assert report.total_bytes_per_device == total + report.temp_bytes_per_device
    # The compiler counts one device's program; over 8 devices it is the model's matmuls + the rest.
    assert 1.0 <= report.flops_per_step / report.model_flops_per_step < 3.0


def test_kernel_calls_are_read_from_the_hlo():
    """Custom-call targets and the kernels behind them, from lines as the TPU / GPU compilers print them."""
    scope = "jit(train_step)/jvp()/shard_map"
    hlo = "\n".join(
        [
            f'%flash_fwd_tpu.28 = (bf16[2,16,256]) custom-call(%a), custom_call_target="tpu_custom_call", '
            f'metadata={{op_name="{scope}/flash_fwd_tpu/pallas_call" stack_frame_id=329}}',
            f'%pallas_call.4 = bf16[2,256,16] custom-call(%a), custom_call_target="__gpu$xla.gpu.triton", '
            f'metadata={{op_name="{scope}/flash_dq_gpu/pallas_call"}}',
            f'%mpmd_map.196 = (bf16[2,256,16,128]) custom-call(%a), custom_call_target="mosaic_gpu_v2", '
            f'metadata={{op_name="{scope}/flash_fwd_mgpu/mpmd_map"}}',
            '%b = f32[8] custom-call(%x), custom_call_target="AllocateBuffer", metadata={op_name="f/x/y"}',
        ]
    )
    assert plan.custom_calls(hlo) == (
        "AllocateBuffer",
        "__gpu$xla.gpu.triton",
        "mosaic_gpu_v2",
        "tpu_custom_call",
    )
    assert plan.kernel_names(hlo) == ("flash_dq_gpu", "flash_fwd_mgpu", "flash_fwd_tpu")


def test_analytic_flops_of_dit_xl2():
    """DiT-XL/2: 118.6 GFLOPs per forward in the paper's table (multiply-adds), 2 FLOPs each here."""
    cfg = load(XL)
    assert flops.dit_forward_flops(cfg) == pytest.approx(2 * 118.6e9, rel=0.005)
    assert flops.train_flops(dataclasses.replace(cfg, batch_size=256)) == 3 * 256 * flops.dit_forward_flops(
        cfg
    )


def test_fsdp8_state_of_dit_xl2_is_split_eight_ways():
    """Acceptance check of the plan: with 8-way FSDP, DiT-XL/2's state per device <= 1.05 x total / 8
    (computed from the shardings; nothing compiled or allocated)."""
    target = targets.get("cpu:8")
    cfg = load(XL, "--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.model.dtype=bfloat16")
    sizes = plan.state_bytes(cfg, plan.check(cfg, target))
    assert sizes.num_params == pytest.approx(675e6, rel=0.001)  # DiT-XL/2: 675M parameters
    assert 0 < sizes.total - 16 * sizes.num_params <= 16  # f32 params, EMA, Adam mu, nu; int32 counters
    assert sizes.per_device <= 1.05 * sizes.total / 8
    ddp = load(XL, "--config.mesh.data=8", "--config.mesh.fsdp=1")
    assert plan.state_bytes(ddp, plan.check(ddp, target)).per_device > sizes.total * 0.99  # replicated


def test_mesh_minus_one_takes_the_target_devices():
    cfg = load(TINY, "--config.mesh.data=-1", "--config.mesh.fsdp=2", "--config.batch_size=8")
    mesh = plan.check(cfg, targets.get("cpu:4"))
    assert dict(mesh.shape) == dict(data=2, fsdp=2, expert=1, context=1, tensor=1) and mesh.devices.size == 4


def test_cpu_target_creates_its_devices(tmp_path):
    """A fresh `dit-jax plan --target=cpu:N` process makes N CPU devices itself (no XLA_FLAGS)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    args = [sys.executable, "-m", "dit_jax", "plan", f"--config={TINY}", "--target=cpu:2", "--json"]
    proc = subprocess.run(
        [*args, "--config.batch_size=2"], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["num_devices"] == 2
    assert report["mesh"] == {"data": 2, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1}


@pytest.mark.parametrize(
    "target, extra, message",
    [
        ("tpu:v9:2x2", [], "known targets: cpu:N, tpu:"),
        ("gpu:h100:8", [], "should be <hosts>x<gpus per host>"),
        ("cpu:8", ["--config.mesh.fsdp=16", "--config.mesh.data=1"], "needs 16 devices but 8 are available"),
        ("cpu:8", ["--config.batch_size=12"], "not divisible by the data-parallel size 8"),
        ("cpu:8", ["--config.model.depht=2"], "unknown config key 'model.depht'"),
        ("cpu:8", ["--config.repa.weight=0.5", "--config.model.repa_depth=1"], "--config.repa.weight=0"),
    ],
)
def test_bad_input_is_one_line(capsys, target, extra, message):
    code, err = run_main(capsys, f"--config={TINY}", f"--target={target}", *extra)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("dit-jax plan: error:") and message in err[0], err


@pytest.mark.parametrize(
    "target, module", [("tpu:v5p:2x2x1", "libtpu"), ("gpu:h100:1x8", "jax_plugins.xla_cuda12")]
)
def test_missing_aot_environment_says_make_install_aot(capsys, monkeypatch, target, module):
    """Without libtpu / the CUDA plugin (the base install), TPU and GPU targets name `make install-aot`."""
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError, as when absent
    code, err = run_main(capsys, f"--config={TINY}", f"--target={target}")
    assert code == 2 and len(err) == 1 and "make install-aot" in err[0], err


SCALE_OUT = {
    "context_ring": ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.context=2",
                     "--config.mesh.rules=fsdp_tp_cp", "--config.attention.context_impl=ring"],
    "moe_expert_parallel": ["--config.mesh.data=2", "--config.mesh.expert=4",
                            "--config.mesh.rules=fsdp_tp_ep", "--config.model.num_experts=8",
                            "--config.model.experts_per_token=2"],
    "scan_remat_dcn": ["--config.mesh.dcn_data=2", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                       "--config.model.scan_blocks=True", "--config.model.remat=save_dots"],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SCALE_OUT))
def test_plan_covers_context_expert_scan_remat_and_multi_slice(name):
    """Each scale-out option plans on cpu:8: the mesh it asks for, the analytic FLOPs of dit_jax.flops
    (experts counted as active ones; the compiler's count adds recomputation and the optimizer)."""
    cfg = load(TINY, "--config.batch_size=16", *SCALE_OUT[name])
    report = plan.plan(cfg, targets.get("cpu:8"))
    want = {"context_ring": {"data": 2, "fsdp": 2, "context": 2},
            "moe_expert_parallel": {"data": 2, "expert": 4},
            "scan_remat_dcn": {"data": 4, "fsdp": 2}}[name]  # fmt: skip
    assert {k: v for k, v in report.mesh.items() if v > 1} == want
    assert report.model_flops_per_step == flops.train_flops(cfg)
    assert report.temp_bytes_per_device > 0 and report.compile_error is None
    if not cfg.model.scanned:  # XLA's cost analysis counts a loop body once (scan: one group)
        assert report.flops_per_step >= report.model_flops_per_step  # + recomputation, optimizer, ...


def test_remat_shrinks_the_planned_temporaries():
    sizes = {}
    for remat in ("none", "full", "None"):  # None: depth 8 scans, and scanned blocks save dots
        cfg = load(TINY, *TINY_ARGS, "--config.model.depth=8", f"--config.model.remat={remat}")
        report = plan.plan(cfg, targets.get("cpu:8"))
        sizes[remat] = report.temp_bytes_per_device
        assert report.blocks == f"8 scanned, remat {'save_dots' if remat == 'None' else remat}"
    assert sizes["full"] < 0.7 * sizes["none"]
    assert sizes["full"] < sizes["None"] < sizes["none"]

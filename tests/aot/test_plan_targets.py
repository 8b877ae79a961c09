"""`dit-jax plan` of the full DiT-XL/2 train step (bf16, fsdp preset, attention.impl=pallas, 2 images
per device) for a TPU v5p slice and one 8×H100 host, compiled deviceless on this CPU machine.

Each target is compiled once, by the CLI in a subprocess (an architecture mismatch in the GPU
compiler aborts the process instead of raising); under xdist the workers share that one compile
through files in pytest's common temporary directory, guarded by a lock.
"""

import fcntl
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PER_DEVICE_BATCH = 2
# Per-block (unscanned) blocks, so that the compiled program holds every block's kernel calls and
# XLA's FLOP count covers the whole step (it counts a scan's body once); the scanned default is
# planned on pods in benchmarks/aot_plans.py (README "Planning a run").
XL_ARGS = ("--config=configs/dit.py:variant=XL/2", "--config.model.dtype=bfloat16",
           "--config.mesh.rules=fsdp", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
           "--config.attention.impl=pallas", "--config.model.scan_blocks=False")  # fmt: skip
# target -> (devices, custom-call targets of its Pallas kernels: Mosaic TPU; Triton or Mosaic GPU)
TARGETS = {
    "tpu:v5p:2x2x1": (4, {"tpu_custom_call"}),
    "gpu:h100:1x8": (8, {"__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2"}),
}
XL_DEPTH, XL_SEQ, XL_HEADS = 28, 256, 16  # DiT-XL/2 on 32x32 latents: 28 blocks, 256 tokens, 16 heads


def run_plan(*args: str, timeout: int = 1800, returncode: int = 0, stderr: list | None = None) -> dict:
    """`python -m dit_jax plan ... --json` in a subprocess; its JSON line (stderr's lines appended to
    `stderr`). A plan that does not fit ends with exit code 2."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    cmd = [sys.executable, "-m", "dit_jax", "plan", "--json", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    assert proc.returncode == returncode, f"{' '.join(cmd)}\n{proc.stderr[-3000:]}"
    if stderr is not None:
        stderr.extend(proc.stderr.strip().splitlines())
    return json.loads(proc.stdout.strip().splitlines()[-1])


def full_batch_qkv_gathers(hlo: str, batch: int, seq: int, heads: int) -> list[str]:
    """Result shapes of all-gathers (sync or async) that hold the whole global batch of q, k or v:
    leading dimension `batch`, and the sequence and head counts among the others (any layout:
    [B, L, H, K], [B, H, L, K] with padded K, or fused [B, L, 3, H, K])."""
    found = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+all-gather(?:-start)?\(", line)
        if not m:
            continue
        for shape in re.findall(r"\w+\[([\d,]+)\]", m.group(1)):
            dims = [int(d) for d in shape.split(",")]
            if len(dims) >= 3 and dims[0] == batch and seq in dims[1:] and heads in dims[1:]:
                found.append(shape)
    return found


@pytest.fixture(scope="module", params=sorted(TARGETS))
def xl_plan(request, tmp_path_factory):
    """(target, devices, plan JSON, compiled HLO) of DiT-XL/2 at 2 images per device."""
    target = request.param
    devices = TARGETS[target][0]
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's directory, common to all its xdist workers
    stem = shared / f"plan_xl2_{target.replace(':', '_')}"
    with open(f"{stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(f"{stem}.json"):
            batch = f"--config.batch_size={PER_DEVICE_BATCH * devices}"
            report = run_plan(f"--target={target}", *XL_ARGS, batch, f"--dump_hlo={stem}.hlo")
            with open(f"{stem}.json", "w") as f:
                json.dump(report, f)
    with open(f"{stem}.json") as f, open(f"{stem}.hlo") as g:
        return target, devices, json.load(f), g.read()


def test_compiles_with_the_kernel_in_every_block(xl_plan):
    target, devices, report, hlo = xl_plan
    assert report["target"] == target and report["num_devices"] == devices
    assert report["mesh"] == {"data": 1, "fsdp": devices, "expert": 1, "context": 1, "tensor": 1}
    kernel_calls = TARGETS[target][1] & set(report["custom_calls"])
    assert kernel_calls, f"no Pallas kernel call among {report['custom_calls']}: a fallback ran"
    calls = sum(hlo.count(f'custom_call_target="{name}"') for name in kernel_calls)
    assert calls >= 2 * XL_DEPTH  # forward and backward attention of every block
    assert report["kernels"] and report["compile_s"] > 0


def test_no_all_gather_of_the_global_batch_of_qkv(xl_plan):
    target, devices, _, hlo = xl_plan
    assert "all-gather" in hlo  # FSDP gathers weights, so the parser has something to look at
    assert full_batch_qkv_gathers(hlo, PER_DEVICE_BATCH * devices, XL_SEQ, XL_HEADS) == []


def test_fits_the_chip_memory(xl_plan):
    target, _, report, _ = xl_plan
    assert report["device_memory_bytes"] > 16 * 2**30
    assert report["temp_bytes_per_device"] > 0
    assert 0 < report["total_bytes_per_device"] < report["device_memory_bytes"] and report["fits"] is True
    assert (
        report["total_bytes_per_device"] >= report["state_bytes_per_device"] + report["temp_bytes_per_device"]
    )


def test_fsdp_state_is_split_over_the_devices(xl_plan):
    _, devices, report, _ = xl_plan
    assert report["state_bytes_total"] > 10e9  # 675M parameters: f32 params, EMA and two Adam moments
    assert report["state_bytes_per_device"] <= 1.05 * report["state_bytes_total"] / devices


def test_flops(xl_plan):
    target, _, report, _ = xl_plan
    assert report["model_flops_per_step"] == pytest.approx(3 * 2 * 118.6e9 * report["batch_size"], rel=0.01)
    if target.startswith("gpu"):
        assert report["flops_per_step"] is None  # XLA:GPU has no cost analysis
    else:
        assert 0.8 < report["flops_per_step"] / report["model_flops_per_step"] < 1.5


def test_the_parser_finds_a_full_batch_gather():
    """The all-gather of the issue (q of the whole batch of 64 on every GPU) is what the parser finds."""
    hlo = (
        "  %all-gather.7 = bf16[64,256,6,64]{3,2,1,0} all-gather(bf16[8,256,6,64]{3,2,1,0} %p)\n"
        "  %ags = ((bf16[1,16,256,128]), bf16[8,16,256,128]) all-gather-start(bf16[1,16,256,128] %q)\n"
        "  %all-gather.8 = bf16[1152,4608]{1,0} all-gather(bf16[144,4608]{1,0} %w), dimensions={0}\n"
    )
    assert full_batch_qkv_gathers(hlo, 64, 256, 6) == ["64,256,6,64"]
    assert full_batch_qkv_gathers(hlo, 8, 256, 16) == ["8,16,256,128"]


def test_a_step_over_the_chip_memory_does_not_fit():
    """TPU v5e (16 GiB): one XL-wide block at 2048 images per chip; the TPU compiler itself refuses."""
    stderr = []
    args = ("--target=tpu:v5e:2x2", *XL_ARGS, "--config.model.depth=1", "--config.batch_size=8192")
    report = run_plan(*args, timeout=600, returncode=2, stderr=stderr)
    assert report["fits"] is False and report["device_memory_bytes"] == 16 * 2**30
    assert "HBM" in report["compile_error"] and report["temp_bytes_per_device"] is None
    assert stderr[-1].startswith("dit-jax plan: error: the train step does not fit tpu:v5e:2x2: the compiler")
    assert "per device: " in stderr[-1] and "optimizer state" in stderr[-1]

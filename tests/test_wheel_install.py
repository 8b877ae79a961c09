"""What a Colab user gets: the built wheel in a fresh venv, used from a directory outside the
checkout — the notebooks' install cell, the packaged configs, and the three notebooks end to end."""

import json
import os
import subprocess
import sys
import venv

import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXECUTE = """
import json, sys
import nbformat
from nbclient import NotebookClient

path, parameters, cwd, out = sys.argv[1:]
nb = nbformat.read(path, as_version=4)
(cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
cell.source += "\\n" + parameters
NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": cwd}}).execute()
nbformat.write(nb, out)
"""


def run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, **kwargs)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def execute_notebook(python, name, parameters, cwd, env) -> list[dict]:
    out = os.path.join(cwd, f"{name}.out.ipynb")
    run(
        [python, "-c", EXECUTE, os.path.join(REPO, "notebooks", name), parameters, cwd, out], cwd=cwd, env=env
    )
    with open(out) as f:
        cells = json.load(f)["cells"]
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o["output_type"] == "error"]
    return outputs


def test_wheel_in_a_fresh_venv_runs_the_notebooks_and_the_cli(tmp_path, data_dir, tiny_vae_dir):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from test_diffusers_dit import tie_embedders

    dist, outside = tmp_path / "dist", tmp_path / "elsewhere"
    outside.mkdir()
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), REPO])
    (wheel,) = dist.glob("dit_jax-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    # Only the notebook runner: the quickstart notebook's first cell must install dit_jax itself.
    env = dict(os.environ, PIP_CONSTRAINT=os.path.join(REPO, "constraints.txt"), PYTHONPATH="")
    env.pop("XLA_FLAGS", None)  # one CPU device, as on a laptop or a CPU Colab
    run([python, "-m", "pip", "install", "-q", "nbclient", "nbformat", "ipykernel"], env=env)
    find = "import importlib.util as u, sys; print(u.find_spec(sys.argv[1]))"
    assert run([python, "-c", find, "dit_jax"], cwd=outside, env=env).stdout.strip() == "None"

    params = (
        f'DIT_JAX = "{wheel}"\nCONFIG = "quickstart:smoke"\nWORKDIR = "nb"\nNUM_SAMPLES = 20\n'
        f'OVERRIDES = ["--config.total_steps=4", "--config.data.data_dir=\'{data_dir}\'"]\n'
    )
    outputs = execute_notebook(python, "quickstart.ipynb", params, str(outside), env)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    location = run(
        [python, "-c", "import dit_jax; print(dit_jax.__file__)"], cwd=outside, env=env
    ).stdout.strip()
    assert location.startswith(str(env_dir)), location  # the installed wheel, not the checkout

    # The scaling study: 3 widths of a few steps, then the frontier, the fit, its plot and table.
    root = outside / "sweep"
    params = (
        f'DIT_JAX = "{wheel}"\nCONFIG = "scaling:smoke"\nWIDTHS = [16, 24, 32]\nSTEPS = [6]\nROOT = "sweep"\n'
        f'OVERRIDES = ["--config.log_every=1", "--config.data.data_dir=\'{data_dir}\'"]\n'
    )
    outputs = execute_notebook(python, "scaling_study.ipynb", params, str(outside), env)
    printed = "".join("".join(o.get("text", "")) for o in outputs)  # a str or a list of lines in the file
    assert "CpuDevice(id=0)" in printed and "CpuDevice(id=1)" not in printed
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1  # the fit
    (table,) = ["".join(o["data"]["text/markdown"]) for o in outputs if "text/markdown" in o.get("data", {})]
    assert "| b |" in table and table.count("| model.hidden_size=") == 3
    assert len([d for d in os.listdir(root) if (root / d / "checkpoints").is_dir()]) == 3
    assert (root / "scaling" / "scaling_loss.json").exists()

    dit_jax = str(env_dir / "bin" / "dit-jax")
    train = [dit_jax, "train", "--config=quickstart:smoke", "--workdir=cli", "--config.total_steps=2",
             f"--config.data.data_dir='{data_dir}'"]  # fmt: skip
    run(train, cwd=outside, env=env)
    run([dit_jax, "sample", "--workdir=cli", "--num_samples=4", "--output=s.npz"], cwd=outside, env=env)
    assert (outside / "s.npz").exists()

    # A diffusers DiT in safetensors: the base install converts it without PyTorch.
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    )  # fmt: skip
    tie_embedders(model)  # diffusers keeps one embedder per block; published weights share one
    model.save_pretrained(tmp_path / "dit", safe_serialization=True)
    params = (
        f'FAMILY = "diffusers"\nCHECKPOINT = "{tmp_path / "dit"}"\nVAE = "{tiny_vae_dir}"\n'
        'WORKDIR = "pretrained"\nCLASSES = [0, 3]\nPER_CLASS = 2\nNUM_STEPS = 3\n'
    )
    outputs = execute_notebook(python, "sample_pretrained.ipynb", params, str(outside), env)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
    assert run([python, "-c", find, "torch"], cwd=outside, env=env).stdout.strip() == "None"

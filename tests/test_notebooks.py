"""Notebooks run top to bottom (with their parameters cell shrunk to seconds)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow


def run_notebook(path: str, parameters: str, cwd: str) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    cell.source += "\n" + parameters
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": cwd}}).execute()
    return nb


def test_quickstart_notebook(tmp_path, data_dir):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    params = (
        f'CONFIG = "quickstart:smoke"\nWORKDIR = "{tmp_path / "nb"}"\nNUM_SAMPLES = 20\n'
        f'OVERRIDES = ["--config.total_steps=6", "--config.data.data_dir=\'{data_dir}\'"]\n'
    )
    nb = run_notebook(os.path.join(repo, "notebooks", "quickstart.ipynb"), params, repo)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # loss curve + sample grid
    assert os.path.exists(tmp_path / "nb" / "checkpoints")


def test_sample_pretrained_notebook(tmp_path, tiny_vae_dir):
    """The notebook on a tiny random official-format DiT (8x8x4 latents) and a tiny SD-VAE layout."""
    torch = pytest.importorskip("torch")
    import torch_dit_reference as dit_ref

    torch.manual_seed(0)
    model = dit_ref.DiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10
    )
    checkpoint = tmp_path / "dit.pt"
    torch.save(model.state_dict(), checkpoint)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    params = (
        f'CHECKPOINT = "{checkpoint}"\nVAE = "{tiny_vae_dir}"\nWORKDIR = "{tmp_path / "nb"}"\n'
        "NUM_HEADS = 2\nCLASSES = [0, 3, 7]\nPER_CLASS = 2\nNUM_STEPS = 3\n"
    )
    nb = run_notebook(os.path.join(repo, "notebooks", "sample_pretrained.ipynb"), params, repo)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1
    assert os.path.exists(tmp_path / "nb" / "checkpoints")


def test_scaling_study_notebook(tmp_path, data_dir, monkeypatch):
    """3 widths of a few steps each, then the frontier, the fit, its plot and table. On one CPU device,
    as on a CPU Colab (8 fake devices would double the compile time of every run)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))  # the kernel inherits the environment
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    root = tmp_path / "sweep"
    params = (
        f'CONFIG = "scaling:smoke"\nWIDTHS = [16, 24, 32]\nSTEPS = [6]\nROOT = "{root}"\n'
        f'OVERRIDES = ["--config.log_every=1", "--config.data.data_dir=\'{data_dir}\'"]\n'
    )
    nb = run_notebook(os.path.join(repo, "notebooks", "scaling_study.ipynb"), params, repo)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    printed = "".join(o.get("text", "") for o in outputs)
    assert "CpuDevice(id=0)" in printed and "CpuDevice(id=1)" not in printed
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1  # the fit
    (table,) = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert "| b |" in table and table.count("| model.hidden_size=") == 3
    assert len([d for d in os.listdir(root) if (root / d / "checkpoints").is_dir()]) == 3
    assert (root / "scaling" / "scaling_loss.json").exists()

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

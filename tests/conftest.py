"""Test set-up: 8 fake CPU devices, so sharding is exercised on any machine."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny programs (train, resume, sample): share compilations across
# tests and xdist workers through JAX's persistent cache in a temp directory (entries are keyed
# by program and JAX version).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "dit_jax_test_compile_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def benchmark_module():
    """`benchmark_module("mup_transfer")` -> benchmarks/mup_transfer.py as a module (benchmarks are
    scripts, not a package; nothing is added to sys.path)."""

    def load(name: str):
        path = pathlib.Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """One prepared-datasets directory for the whole session (digits prepare in < 1 s)."""
    return str(tmp_path_factory.mktemp("datasets"))


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> str:
    """A tiny random diffusers AutoencoderKL (3 -> 4 latent channels, downsampling 8), saved with
    save_pretrained: the SD-VAE's layout at a size that compiles in seconds."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    path = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        mid_block_add_attention=False,  # fewer ops to compile
        sample_size=32,
    )
    vae.eval().save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_config(data_dir):
    """A seconds-long digits config (configs/quickstart.py:smoke) with dataclass overrides:
    tiny_config(total_steps=8, model=dict(depth=1))."""
    from dit_jax import config as config_lib
    from dit_jax.config_files import load_config_file

    def make(**overrides):
        cfg = config_lib.from_dict(load_config_file("configs/quickstart.py:smoke"))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
        for key, value in overrides.items():
            if isinstance(value, dict):
                value = dataclasses.replace(getattr(cfg, key), **value)
            cfg = dataclasses.replace(cfg, **{key: value})
        return cfg

    return make


def pytest_collection_modifyitems(config, items):
    """Start the long end-to-end tests first, so that under xdist they overlap the short ones
    instead of running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session, exitstatus):
    """`make test` sets DIT_JAX_FORBID_SKIPS=1: there every extra is installed, so a skipped test is
    a test that silently stopped running, and the run fails (skip reasons are printed by -rs)."""
    if os.environ.get("DIT_JAX_FORBID_SKIPS") != "1" or hasattr(session.config, "workerinput"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and session.exitstatus == 0:
        reporter.write_line(f"DIT_JAX_FORBID_SKIPS=1: {len(skipped)} test(s) skipped; see the reasons above")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

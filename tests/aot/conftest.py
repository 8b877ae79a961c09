"""Shared fixtures of the ahead-of-time tests: named targets, their meshes, GPU compiles in a child.

Run them in `.venv-aot` (`make test-aot`); elsewhere every test that asks for a TPU or GPU target
is skipped with the reason (`make install-aot`).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import gpu_compile
import jax
import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # xdist workers each load libtpu
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)  # not for GPU children either (see below)
# The persistent cache stores deviceless executables but cannot load them back ("PjRtCompiler must
# be constructed with a Client"): it would only cost time and disk.
jax.config.update("jax_enable_compilation_cache", False)


@functools.cache
def _get(name: str):
    from dit_jax.parallel import targets

    return targets.get(name)


def get_target(name: str):
    """The `dit_jax.parallel.targets` Target `name`; skips the test where this environment lacks it."""
    from dit_jax.parallel import targets

    try:
        return _get(name)
    except targets.TargetError as e:
        pytest.skip(str(e).splitlines()[0])


@pytest.fixture(scope="session")
def aot_target():
    """`aot_target("tpu:v5e:2x2")` -> Target (skips when libtpu / the CUDA plugin is missing)."""
    return get_target


@pytest.fixture(scope="session")
def aot_mesh():
    """`aot_mesh(name, shape, axis_names)` -> a mesh over the target's devices."""

    def make(name: str, shape: tuple[int, ...], axis_names: tuple[str, ...]):
        return get_target(name).mesh(shape, axis_names)

    return make


@pytest.fixture(scope="session")
def gpu_child():
    """`gpu_child("module:function", payload)` -> JSON result, computed in a child process.

    For anything that compiles for a GPU target (an architecture mismatch aborts the process).
    Skips when the CUDA plugin is missing; raises `gpu_compile.ChildFailed` if the child dies.
    """
    try:
        found = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins package at all
        found = False
    if not found:
        pytest.skip("the CUDA plugin (jax-cuda12-plugin) is missing: run `make install-aot`")

    def run(function: str, payload, timeout: float = 600, env: dict[str, str] | None = None):
        return gpu_compile.run(function, payload, timeout, env)

    return run

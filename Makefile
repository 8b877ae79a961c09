# dit_jax — every command in the README goes through these targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# 8 fake CPU devices, so sharded code paths run on any machine.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
WORKDIR ?= runs/quickstart
# A Python 3.12 that really runs (a bare pyenv shim fails when 3.12 is not the active version).
PY312 ?= $(shell for p in "$$(command -v python3.12)" \
    "$$(PYENV_VERSION=$$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -n 1) pyenv which python3.12 2>/dev/null)"; \
    do [ -n "$$p" ] && "$$p" --version >/dev/null 2>&1 && { echo "$$p"; break; }; done)

AOT_VENV ?= .venv-aot
# Deviceless TPU / GPU compilation: CPU platform only, libtpu may be loaded by several test workers.
AOT_ENV := JAX_PLATFORMS=cpu ALLOW_MULTIPLE_LIBTPU_LOAD=1 TPU_SKIP_MDS_QUERY=1

.PHONY: install install-dev install-aot quickstart test test-aot lint format bench tensorboard test-py312 clean print-py312

# The base environment (pinned). Re-runs only when the dependency files change.
install: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e .
	touch $@

# Test tooling + the optional PyTorch reference (torch, diffusers).
install-dev: $(VENV)/.installed-dev
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -c constraints.txt -e ".[dev,torch,notebooks]"
	touch $@

quickstart: install
	$(BIN)/dit-jax train --config=configs/quickstart.py --workdir=$(WORKDIR)
	$(BIN)/dit-jax sample --workdir=$(WORKDIR) --num_samples=500 \
	    --output=$(WORKDIR)/samples.npz --grid=$(WORKDIR)/samples.png

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(TEST_ENV) DIT_JAX_FORBID_SKIPS=1 $(BIN)/python -m pytest -q -rs -n 2 --dist worksteal --durations=15 \
	    --ignore=tests/aot

# Smoke subset on Python 3.12 with the newest JAX/Flax (what Colab and the GPU images run).
test-py312:
	@if [ -z "$(PY312)" ]; then echo "python3.12 not found; skipping"; exit 0; fi; \
	test -x .venv312/bin/python || $(PY312) -m venv .venv312; \
	.venv312/bin/python -m pip install -q --upgrade pip && \
	.venv312/bin/python -m pip install -q --upgrade -e ".[dev]" jax flax && \
	$(TEST_ENV) .venv312/bin/python -m pytest -q -n 2 -m "not slow" tests/test_config.py tests/test_model.py \
	    tests/test_diffusion.py tests/test_train.py tests/test_cli.py tests/test_recipes.py tests/test_attention_api.py

# The ahead-of-time environment: Python 3.12, JAX 0.12 + libtpu + the CUDA 12 plugin (constraints-aot.txt).
install-aot: $(AOT_VENV)/.installed
$(AOT_VENV)/.installed: setup.cfg pyproject.toml constraints-aot.txt
	@if [ -z "$(PY312)" ]; then echo "install-aot needs Python 3.12 (python3.12 or pyenv); none found" >&2; exit 2; fi
	test -x $(AOT_VENV)/bin/python || $(PY312) -m venv $(AOT_VENV)
	$(AOT_VENV)/bin/python -m pip install -q --upgrade pip
	$(AOT_VENV)/bin/python -m pip install -q -c constraints-aot.txt -e ".[dev,aot]"
	touch $@

# Compile kernels and sharded train steps for TPU v5e/v5p and H100 on this CPU (tests/aot).
test-aot: install-aot
	$(AOT_ENV) $(AOT_VENV)/bin/python -m pytest -q -rs -n 2 --dist worksteal --durations=10 tests/aot

# TensorBoard on the runs/ folder (the `tensorboard` extra, installed on first use).
tensorboard: install
	$(PIP) install -q -c constraints.txt -e ".[tensorboard]"
	$(BIN)/tensorboard --logdir runs

bench: install-dev
	$(BIN)/python benchmarks/train_step.py --config=configs/dit.py:variant=S/2 --batch_size=8 --steps=20 --json

clean:
	rm -rf $(VENV) .venv312 $(AOT_VENV) runs

print-py312:
	@echo $(PY312)

#!/usr/bin/env bash
# The GPU benchmark suite (see benchmarks/gpu_suite.py): kernels vs cuDNN and the KERNELS.md targets,
# and the DiT-XL/2 bf16 train-step MFU at the largest batch `dit-jax plan` says fits. <= 8 minutes.
#
#   bash benchmarks/gpu_suite.sh                   # on an H100/H200: writes benchmarks/results/gpu_suite_<gpu>_<date>.json
#   bash benchmarks/gpu_suite.sh --dry_run         # on CPU (tiny shapes; what CI tests)
#   bash benchmarks/gpu_suite.sh --out FILE [...]  # any other flags go to gpu_suite.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
out=""
for arg in "$@"; do case "$arg" in --out=*|--out) out=set;; esac; done
if [ -z "$out" ]; then
  gpu=$("$PYTHON" -c 'import jax; print(jax.devices()[0].device_kind.split()[1 if " " in jax.devices()[0].device_kind else 0].lower())' 2>/dev/null || echo unknown)
  set -- --out "benchmarks/results/gpu_suite_${gpu}_$(date -u +%Y-%m-%d).json" "$@"
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_suite.py "$@"

"""One recorded benchmark result: its figures plus what is needed to reproduce them (date, JAX
version, CPU count, the exact command), written as one JSON file under benchmarks/results/."""

from __future__ import annotations

import datetime
import json
import os
import sys

import jax


def record(benchmark: str, out: str, **figures) -> dict:
    """The result of `benchmark` with its provenance; written to `out` (if given) and returned."""
    result = {
        "benchmark": benchmark,
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
        "cpu_count": os.cpu_count(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        **figures,
    }
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}")
    return result

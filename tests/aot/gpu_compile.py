"""Run `module:function(payload)` in a child Python process and return its JSON result.

Compiling a GPU kernel for the wrong architecture aborts the whole process (an LLVM fatal error,
not an exception), so the AOT tests compile GPU programs in a child: an abort becomes a
`ChildFailed` for one test instead of killing pytest. Batch many compiles into one call: each child
pays the start-up of JAX and the CUDA plugin (a few seconds).

Usage: `run("kernel_cases:compile_cases", [case, ...])`; `module` is imported with this folder
(tests/aot) and the repository root on sys.path.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MARKER = "@@gpu_compile-result@@"


class ChildFailed(RuntimeError):
    """The child process died (abort, crash, timeout) or printed no result."""


def run(function: str, payload, timeout: float = 600, env: dict[str, str] | None = None):
    """`function(payload)` ("module:attr") evaluated in a fresh process; its JSON result.

    `env`: extra environment variables for the child (e.g. XLA_FLAGS).
    """
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
        **(env or {}),
    }
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE / "gpu_compile.py"), function], input=json.dumps(payload),
            capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise ChildFailed(f"{function} did not finish within {timeout} s") from e
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        raise ChildFailed(f"{function} exited with {proc.returncode}; stderr ends:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(MARKER) :])


def main(function: str) -> None:
    module, _, attr = function.partition(":")
    result = getattr(importlib.import_module(module), attr)(json.loads(sys.stdin.read()))
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])

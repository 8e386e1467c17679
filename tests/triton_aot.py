"""Ahead-of-time compilation of Triton kernels for Hopper on a machine without a GPU.

Triton's front end, its LLVM back end and ptxas need no GPU, so CI can compile every kernel for
``sm_90a`` exactly as a GPU run would, catching what the CPU interpreter cannot (tensor-core
shape and dtype rules, layout conversions, shared-memory size) and reading register and spill
counts from ``ptxas -v``.

Kernels defined under ``TRITON_INTERPRET=1`` are interpreter objects that cannot be compiled, so
the tests call :func:`compile_cases_in_subprocess`, which imports the kernels afresh in a process
without the interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

# The compile helper lives in profiles/static/aot.py (shared with `python -m profiles.static`);
# this file also runs as a script in a fresh process, where the repository root is not on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from profiles.static.aot import KernelStats, compile_for_hopper  # noqa: E402

__all__ = ["KernelStats", "compile_for_hopper", "compile_cases_in_subprocess"]


def compile_cases_in_subprocess(cases: dict[str, tuple]) -> dict[str, dict]:
    """Compile named cases ``name -> (module, kernel, pointer_types, constexprs, num_warps
    [, num_stages [, aligned]])`` and return each one's :class:`KernelStats` as a dict."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__)], input=json.dumps(cases),
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"AOT compilation failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


def _main() -> None:
    import importlib
    cases = json.loads(sys.stdin.read())
    results = {}
    for name, (module, kernel, pointers, constexprs, num_warps, *rest) in cases.items():
        fn = getattr(importlib.import_module(module), kernel)
        num_stages = rest[0] if rest else 3
        aligned = tuple(rest[1]) if len(rest) > 1 else ()
        results[name] = compile_for_hopper(fn, pointers, constexprs, num_warps, num_stages, aligned).__dict__
    print(json.dumps(results))


if __name__ == "__main__":
    _main()

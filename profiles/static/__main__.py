"""python -m profiles.static [--quick | --case NAME ...] [--out DIR] [--no-cuda] [--jobs N]

A static roofline on a CPU: compiles every kernel the package launches at M1's shapes for
sm_90a (Triton ahead of time, the CUDA sources through nvcc) and writes report.md and
report.json (default: profiles/static/). See profiles/static/__init__.py for what is a fact of
the compiled program and what is an estimate.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent


def _compile(spec_json: str) -> dict:
    import importlib

    from .aot import compile_kernel
    from .read import sass_summary, ttgir_dots
    module, kernel, ptrs, constexprs, warps, stages, aligned = json.loads(spec_json)
    fn = getattr(importlib.import_module(module), kernel)
    c = compile_kernel(fn, ptrs, constexprs, warps, stages, tuple(aligned))
    return {**c.stats.__dict__, "num_warps": warps, "num_stages": stages, **sass_summary(c.sass),
            "dots": ttgir_dots(c.ttgir)}


def _git_commit() -> str:
    root = OUT.parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiles.static", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small case (MoE I=1152, T=4096, bf16), no CUDA")
    ap.add_argument("--case", action="append", default=[], help="case name (repeatable); see --list")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-cuda", action="store_true")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET"):
        # Kernels defined under the interpreter cannot be compiled: start afresh without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "profiles.static", *(argv or sys.argv[1:])], env=env,
                              cwd=OUT.parents[1]).returncode

    from . import cases as C
    from .report import build, write

    t0 = time.time()
    cases = C.all_cases()
    if a.list:
        print("\n".join(c.name for c in cases))
        return 0
    wanted = set(a.case) | ({C.QUICK} if a.quick else set())
    if wanted:
        unknown = wanted - {c.name for c in cases}
        if unknown:
            ap.error(f"unknown case(s) {sorted(unknown)}; see --list")
        cases = [c for c in cases if c.name in wanted]
    specs = sorted({json.dumps(launch.compile) for c in cases for launch in c.launches})
    print(f"compiling {len(specs)} Triton kernels for sm_90a ({a.jobs} jobs)...", file=sys.stderr)
    with concurrent.futures.ProcessPoolExecutor(max(1, a.jobs)) as pool:
        compiled = dict(zip(specs, pool.map(_compile, specs)))
    cuda = []
    if not (a.no_cuda or a.quick or a.case):
        from .cuda import compile_cuda
        print("compiling csrc/ with nvcc...", file=sys.stderr)
        cuda = compile_cuda()
    report = build(cases, compiled, cuda, commit=_git_commit(), seconds=time.time() - t0)
    write(report, a.out)
    print(f"wrote {a.out / 'report.md'} and report.json in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

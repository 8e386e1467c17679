"""What run_ncu.py and run_nsys.py share: arguments, the case command, tool checks, running."""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "profiles" / "out"


def parse_args(prog: str, doc: str, argv=None, iters: int = 1):
    ap = argparse.ArgumentParser(prog=prog, description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("op", choices=("lightning", "moe", "head", "model"))
    ap.add_argument("kind")
    ap.add_argument("--param", action="append", default=[], metavar="K=V")
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report directory (default {DEFAULT_OUT})")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return ap.parse_args(argv)


def case_command(a) -> list[str]:
    cmd = [sys.executable, "-m", "profiles.case", a.op, a.kind, "--impl", a.impl,
           "--iters", str(a.iters), "--tp", str(a.tp)]
    for p in a.param:
        cmd += ["--param", p]
    return cmd


def report_name(a, tool: str) -> str:
    parts = [a.op, a.kind, a.impl] + [p.replace("=", "") for p in a.param]
    return "_".join("".join(c if c.isalnum() or c in "-." else "-" for c in s) for s in parts) + f".{tool}"


def show(cmds: list[list[str]]) -> str:
    return "\n".join("  " + shlex.join(c) for c in cmds)


def why_not_profiling(tool: str) -> str | None:
    if shutil.which(tool) is None:
        return f"{tool} is not on PATH (install Nsight {'Compute' if tool == 'ncu' else 'Systems'})"
    try:
        import torch
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
    except ImportError:
        return "torch is not importable"
    return None


def run(tool: str, cmds: list[list[str]], a) -> int:
    """Run the profile and summary commands, or say clearly why not (exit 0 either way)."""
    if a.dry_run:
        print(f"dry run: would run\n{show(cmds)}")
        return 0
    why = why_not_profiling(tool)
    if why:
        print(f"not profiling: {why}. On a GPU machine this runs:\n{show(cmds)}")
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    for cmd in cmds:
        print("+ " + shlex.join(cmd), flush=True)
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        sys.stdout.write(out.stdout[-4000:])
        if out.returncode != 0:
            sys.stderr.write(out.stderr[-4000:])
            print(f"{tool} failed (exit {out.returncode}); see above. Nothing else was run.")
            return out.returncode
    return 0

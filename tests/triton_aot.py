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
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)


@dataclass
class KernelStats:
    registers: int
    spill_bytes: int       # spill stores, bytes per thread
    shared_bytes: int
    # int32 products of a program id with a stride argument in the TTIR (`arith.muli ... : i32`
    # naming a stride_*): each one can wrap past 2^31 at M1's long-sequence strides.
    i32_stride_products: int = 0


def compile_for_hopper(fn, pointer_types: dict[str, str], constexprs: dict, num_warps: int = 4,
                       num_stages: int = 3, aligned: tuple[str, ...] = ()) -> KernelStats:
    """Compile ``fn`` for sm_90a; scalar arguments not named are i32. Returns ptxas statistics.

    ``aligned`` names the arguments Triton's JIT would mark divisible by 16 at run time
    (16-byte-aligned pointers, sizes and strides that are multiples of 16). Without those
    hints loads are not vectorized or pipelined and ptxas reports spills a real launch lacks.
    """
    names = fn.arg_names
    unknown = set(pointer_types) | set(constexprs) | set(aligned)
    unknown -= set(names)
    if unknown:
        raise ValueError(f"{fn.__name__} has no arguments {sorted(unknown)}")
    signature = {n: pointer_types.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    kernel = triton.compile(src, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})
    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
                             capture_output=True, text=True, check=True)
    regs = re.search(r"Used (\d+) registers", out.stderr)
    spills = re.search(r"(\d+) bytes spill stores", out.stderr)
    i32_products = len(re.findall(r"arith\.muli %(?:h|b|g|n|iv|seq|row)(?:_\d+)?, %stride_\w+ : i32\b",
                                  kernel.asm["ttir"]))
    return KernelStats(int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0,
                       kernel.metadata.shared, i32_products)


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

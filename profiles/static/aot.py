"""Ahead-of-time compilation of Triton kernels for Hopper (sm_90a) on a machine without a GPU.

Triton's front end, its LLVM back end and ptxas need no GPU, so a CPU can compile every kernel
exactly as a GPU run would and read what only the compiler knows: registers and spills
(``ptxas -v``), shared memory, the TTGIR (layouts, ``tt.dot`` shapes) and the SASS of the cubin
Triton built (``cuobjdump -sass``: which MMA instructions, TMA or cp.async).

Kernels defined under ``TRITON_INTERPRET=1`` are interpreter objects that cannot be compiled:
callers run this in a process without the interpreter (``tests/triton_aot.py`` and
``python -m profiles.static`` do).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

HOPPER_CC = 90


@dataclass
class KernelStats:
    registers: int
    spill_bytes: int       # spill stores, bytes per thread
    shared_bytes: int
    # int32 products of a program id with a stride argument in the TTIR (`arith.muli ... : i32`
    # naming a stride_*): each one can wrap past 2^31 at M1's long-sequence strides.
    i32_stride_products: int = 0


@dataclass
class Compiled:
    """One kernel compiled for sm_90a: ptxas statistics plus the texts a static read needs."""
    stats: KernelStats
    num_warps: int
    num_stages: int
    ptxas_log: str
    ttgir: str
    sass: str = field(repr=False)


def _tool(name: str) -> str:
    """A CUDA binary tool: Triton's bundled copy first (the one its ptxas matches), else CUDA_HOME."""
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.isfile(bundled):
        return bundled
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name)
    raise FileNotFoundError(name)


def sass_of_cubin(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout


def compile_kernel(fn, pointer_types: dict[str, str], constexprs: dict, num_warps: int = 4,
                   num_stages: int = 3, aligned: tuple[str, ...] = (), sass: bool = True) -> Compiled:
    """Compile ``fn`` for sm_90a; scalar arguments not named are i32.

    ``aligned`` names the arguments Triton's JIT would mark divisible by 16 at run time
    (16-byte-aligned pointers, sizes and strides that are multiples of 16). Without those
    hints loads are not vectorized or pipelined and ptxas reports spills a real launch lacks.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    names = fn.arg_names
    unknown = set(pointer_types) | set(constexprs) | set(aligned)
    unknown -= set(names)
    if unknown:
        raise ValueError(f"{fn.__name__} has no arguments {sorted(unknown)}")
    signature = {n: pointer_types.get(n, "constexpr" if n in constexprs else "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", HOPPER_CC, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptxas = get_ptxas(HOPPER_CC).path
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
    stats = KernelStats(int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0,
                        kernel.metadata.shared, i32_products)
    return Compiled(stats, num_warps, num_stages, out.stderr, kernel.asm["ttgir"],
                    sass_of_cubin(kernel.asm["cubin"]) if sass else "")


def compile_for_hopper(fn, pointer_types: dict[str, str], constexprs: dict, num_warps: int = 4,
                       num_stages: int = 3, aligned: tuple[str, ...] = ()) -> KernelStats:
    """ptxas statistics of ``fn`` compiled for sm_90a (see :func:`compile_kernel`)."""
    return compile_kernel(fn, pointer_types, constexprs, num_warps, num_stages, aligned, sass=False).stats

"""The CUDA kernels of csrc/ through nvcc for sm_90a: ptxas statistics and SASS per kernel."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .read import ctas_per_sm, sass_summary

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
NVCC_FLAGS = ["-std=c++20", "-O3", "--use_fast_math", "-lineinfo", "-gencode=arch=compute_90a,code=sm_90a"]  # setup.py


def nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def nvcc_version() -> str:
    exe = nvcc()
    if not exe:
        return "not found"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release [\d.]+, (V[\d.]+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


def _prefill_smem(dmax: int, bv: int) -> int:
    """PrefillLayout<DMAX, BV>::BYTES of csrc/lightning/lightning_prefill.cu (dynamic shared memory)."""
    chunk = 64
    floats = 2 * chunk * (dmax + 4) + chunk * (bv + 8) + chunk * (chunk + 4) + dmax * (bv + 8) + 68
    return floats * 4


def _demangle(names: list[str]) -> dict[str, str]:
    exe = shutil.which("c++filt") or shutil.which("cu++filt")
    if not exe:
        return {n: n for n in names}
    out = subprocess.run([exe], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


# Which instantiations M1 (bf16, D = Dv = 128, H = 64) launches: prefill <bf16, 128, 64>; decode
# with VEC 4 and TPR 4 at B = 1 (64 heads × 4 slices < 2 × 132), TPR 32 at B ≥ 64.
M1_USE = {
    ("lightning_prefill_kernel", "__nv_bfloat16, 128, 64"): "prefill, all T",
    ("lightning_decode_kernel", "__nv_bfloat16, 4, 4"): "decode B=1",
    ("lightning_decode_kernel", "__nv_bfloat16, 4, 32"): "decode B=64, 256",
}


def compile_cuda() -> list[dict]:
    exe = nvcc()
    if exe is None:
        return []
    from .aot import _tool
    rows = []
    for src in sorted(CSRC.rglob("*.cu")):
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            out = subprocess.run([exe, *NVCC_FLAGS, "-Xptxas", "-v", f"-I{CSRC}", "-cubin", str(src), "-o", cubin],
                                 capture_output=True, text=True, timeout=900)
            if out.returncode:
                rows.append({"file": str(src.relative_to(ROOT)), "error": out.stderr[-2000:]})
                continue
            sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
        stats, current = {}, None
        for line in out.stderr.splitlines():
            if m := re.search(r"Compiling entry function '([^']+)'", line):
                current = m.group(1)
                stats[current] = {"registers": -1, "spill_bytes": 0, "stack_bytes": 0, "static_shared_bytes": 0}
            elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)):
                stats[current]["stack_bytes"] = int(m.group(1))
                stats[current]["spill_bytes"] = int(m.group(2))
            elif current and (m := re.search(r"Used (\d+) registers", line)):
                stats[current]["registers"] = int(m.group(1))
                if s := re.search(r"(\d+) bytes smem", line):
                    stats[current]["static_shared_bytes"] = int(s.group(1))
        bodies = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S))
        names = _demangle(list(stats))
        for mangled, st in stats.items():
            pretty = names[mangled]
            m = re.search(r"(\w+)<(.*?)>\(", pretty)
            kernel, targs = (m.group(1), m.group(2)) if m else (pretty, "")
            targs = re.sub(r"\(int\)", "", targs).strip()
            use = M1_USE.get((kernel, targs))
            if use is None and "bfloat16" not in targs:
                continue  # fp32/fp16 instantiations: not launched by M1 (bf16)
            threads = 256  # kPrefillThreads, kDecodeThreads
            smem = st["static_shared_bytes"]
            if kernel == "lightning_prefill_kernel":
                dmax, bv = (int(x) for x in targs.split(",")[1:3])
                smem += _prefill_smem(dmax, bv)
            summ = sass_summary(bodies.get(mangled, ""))
            rows.append({"file": str(src.relative_to(ROOT)), "kernel": f"{kernel}<{targs}>", "m1_use": use or "-",
                         **st, "shared_bytes": smem, "threads": threads,
                         **ctas_per_sm(st["registers"], smem, threads), **summ})
    return rows

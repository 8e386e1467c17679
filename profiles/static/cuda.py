"""The CUDA kernels of csrc/ through nvcc for sm_90a: ptxas statistics and SASS per kernel."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .read import ctas_per_sm, sass_instructions, sass_summary

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


def nvcc_version(exe: str | None = None) -> str:
    exe = exe or nvcc()
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


def _prefill_bf16_smem(dmax: int, bv: int, high: bool = False) -> int:
    """Bf16PrefillLayout<DMAX, BV, HIGH>::BYTES: two bf16 stages of q, k, v; P, the bf16 state
    (HIGH: a second P and state tile, the lo halves), decays."""
    chunk = 64
    stage = 2 * chunk * (dmax + 8) + chunk * (bv + 8)
    tiles = chunk * (chunk + 8) + dmax * (bv + 8)
    return (2 * stage + tiles * (2 if high else 1)) * 2 + 68 * 4


def prefill_bf16_issued_over_counted(d: int = 128, dv: int = 128, chunk: int = 64, high: bool = False,
                                     dmax: int = 128, bv: int = 128) -> float:
    """Tensor work the bf16 prefill issues per full chunk and head over the counted 4C²D + 4CD·Dv
    (2C²D + 2C²Dv + 2CD·Dv + 2CD·Dv: Q K^T, P V, Q S, K^T V). It issues Q K^T and P V on the
    16×16 tiles on or below the diagonal (rows [16r, 16r+16) take r+1 of C/16 column tiles),
    Q K^T once per value tile (⌈Dv/BV⌉ CTAs per head: one at M1's D = Dv = BV = 128), Q S once
    and K^T V twice (the decayed keys' bf16 pair); ``high`` issues P V and Q S twice too (the
    scores' and the state's pairs). The k-extent over D is the instantiation's DMAX (the k-steps
    past D multiply zeros; none at D = DMAX)."""
    tiles = chunk // 16
    causal = sum(r + 1 for r in range(tiles)) / tiles ** 2      # 10/16 at C = 64
    pair = 2 if high else 1
    value_tiles = -(-dv // bv)
    issued = (causal * (value_tiles * 2 * chunk * chunk * dmax + pair * 2 * chunk * chunk * dv)
              + pair * 2 * chunk * dmax * dv + 4 * chunk * dmax * dv)
    counted = 4 * chunk * chunk * d + 2 * chunk * d * dv + 2 * chunk * d * dv
    return issued / counted


def chunk_loop_summary(sass: str) -> dict:
    """SASS of the widest backward branch (the chunk loop of the prefill kernels): instructions,
    HMMA, LDSM, LDGSTS, local-memory accesses (LDL/STL: spills) and instructions per HMMA. A
    backward branch that overlaps that span only in part is code the compiler moved out of line
    and branches back from (FlashAttention-2's K-tile copy under `if (n_block > n_block_min)`
    sits just above its loop), so its span is merged in; a loop nested inside changes nothing.
    In the bf16 cp.async instantiations the loop body is straight-line code (the k-loops are
    unrolled, the tile copies too), so these static counts are what the warp with the full
    causal row tile executes per chunk. The same function counts the FA2 yardstick (yardstick.py)."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", ln)]
    addrs = [int(re.match(r"\s*/\*([0-9a-f]+)\*/", ln).group(1), 16) for ln in lines]
    ops = sass_instructions("\n".join(lines))
    loops = []
    for ln, addr in zip(lines, addrs):
        m = re.search(r"\bBRA\b[^;]*?0x([0-9a-f]+)", ln)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    if not loops:
        return {}
    lo, hi = max(loops, key=lambda span: span[1] - span[0])
    merged = True
    while merged:
        merged = False
        for a, b in loops:
            if a <= hi and b >= lo and (a < lo or b > hi):
                lo, hi, merged = min(lo, a), max(hi, b), True
    body = [op for op, a in zip(ops, addrs) if lo <= a <= hi]
    hmma = sum(op.startswith("HMMA") for op in body)
    return {"loop_instructions": len(body), "loop_hmma": hmma,
            "loop_ldsm": sum(op.startswith("LDSM") for op in body),
            "loop_ldgsts": sum(op.startswith("LDGSTS") for op in body),
            "loop_local": sum(op.startswith(("LDL", "STL")) for op in body),
            "loop_instructions_per_mma": round(len(body) / hmma, 2) if hmma else None}


def ptxas_stats(stderr: str) -> dict[str, dict]:
    """`ptxas -v` per entry function (mangled name): registers, stack and spill bytes, static smem."""
    stats, current = {}, None
    for line in stderr.splitlines():
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
    return stats


def sass_functions(sass: str) -> dict[str, str]:
    """`cuobjdump -sass` text split per function: mangled name -> its SASS."""
    return dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S))


def demangle(names: list[str]) -> dict[str, str]:
    exe = shutil.which("c++filt") or shutil.which("cu++filt")
    if not exe:
        return {n: n for n in names}
    out = subprocess.run([exe], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


# Which instantiations M1 (bf16, D = Dv = 128) launches: the bf16 prefill <DMAX 128, BV 128, cp.async,
# PASS, HIGH> — PASS 0 one CTA per (sequence, head, value tile) walking the sequence, 1 and 2 the
# segment split's local-state and output passes (a long sequence at few heads: TP = 8 has 8),
# HIGH the precision="high" build — with the split's table and scan kernels; decode with VEC 4 and
# TPR 4 at B = 1 (64 heads × 4 slices < 2 × 132), TPR 32 at B ≥ 64.
M1_USE = {
    ("lightning_prefill_bf16_kernel", "128, 128, true, 0, false"): "prefill, one segment per sequence",
    ("lightning_prefill_bf16_kernel", "128, 128, true, 2, false"): "prefill split: output pass",
    ("lightning_prefill_bf16_kernel", "128, 128, true, 1, false"): "prefill split: local pass",
    ("lightning_prefill_bf16_kernel", "128, 128, true, 0, true"): "prefill, precision=high",
    ("lightning_prefill_bf16_kernel", "128, 128, true, 2, true"): "prefill split: output pass, high",
    ("lightning_prefill_segments_kernel", ""): "prefill split: segment table",
    ("lightning_prefill_scan_kernel", ""): "prefill split: scan",
    ("lightning_decode_kernel", "__nv_bfloat16, 4, 4"): "decode B=1",
    ("lightning_decode_kernel", "__nv_bfloat16, 4, 32"): "decode B=64, 256",
}


def launch_bounds(elf: str) -> dict[str, int]:
    """Threads per block each kernel was compiled for (`__launch_bounds__`, EIATTR_MAX_THREADS in
    `cuobjdump -elf`), by mangled name; every csrc/ kernel declares one."""
    out = {}
    for name, info in re.findall(r"^\.nv\.info\.(\S+)\n(.*?)(?=^\.\S|\Z)", elf, re.S | re.M):
        if m := re.search(r"EIATTR_MAX_THREADS\s*\n\s*Format:\s*\S+\s*\n\s*Value:\s*((?:0x[0-9a-f]+\s*)+)", info):
            dims = [int(x, 16) for x in m.group(1).split()]
            out[name] = dims[0] * (dims[1] if len(dims) > 1 else 1) * (dims[2] if len(dims) > 2 else 1)
    return out


def kernel_name(pretty: str) -> tuple[str, str]:
    """(kernel, template arguments) of a demangled signature; '' for a kernel that is no template
    (or a name c++filt could not demangle: then the whole name)."""
    if m := re.search(r"(\w+)<(.*?)>\(", pretty):
        return m.group(1), re.sub(r"\(int\)", "", m.group(2)).strip()
    if m := re.search(r"(\w+)\(", pretty):
        return m.group(1), ""
    return pretty, ""


def kernel_row(file: str, pretty: str, st: dict, body: str, threads: int | None) -> dict | None:
    """One row of the CUDA table, or None for an fp32/fp16 instantiation (M1 runs bf16). Kernels
    this module has no model for (new instantiations, new kernels) are listed with their ptxas
    and SASS facts only; their dynamic shared memory is not known here (smem = static only)."""
    kernel, targs = kernel_name(pretty)
    use = M1_USE.get((kernel, targs))
    if use is None and "bfloat16" not in targs and re.search(r"\b(float|double|__half|half)\b", targs):
        return None  # fp32/fp16 instantiations: not launched by M1 (bf16)
    threads = threads or 256  # no launch bound in the cubin: kPrefillThreads, kDecodeThreads
    smem = st["static_shared_bytes"]
    extra: dict = {}
    ints = [int(x) for x in re.findall(r"(?<![\w.])-?\d+(?![\w.])", targs)]
    if kernel == "lightning_prefill_kernel" and len(ints) >= 2:
        smem += _prefill_smem(ints[0], ints[1])  # <T, DMAX, BV>
    elif kernel == "lightning_prefill_bf16_kernel" and len(ints) >= 2:
        smem += _prefill_bf16_smem(ints[0], ints[1], targs.replace(" ", "").endswith(",true"))  # <.., HIGH>
        extra = chunk_loop_summary(body)
        args = [x.strip() for x in targs.split(",")]  # DMAX, BV, ASYNC, PASS, HIGH
        if use and len(args) == 5 and args[3] != "1":  # the local pass's K^T V is not in the count
            extra["issued_over_counted_model"] = round(
                prefill_bf16_issued_over_counted(high=args[4] == "true", dmax=ints[0], bv=ints[1]), 3)
    if extra.get("loop_instructions_per_mma"):
        extra["loop_per_mma_over_fa2"] = per_mma_over_fa2(extra["loop_instructions_per_mma"])
    return {"file": file, "kernel": f"{kernel}<{targs}>" if targs else kernel, "m1_use": use or "-",
            **st, "shared_bytes": smem, "threads": threads,
            **ctas_per_sm(st["registers"], smem, threads), **sass_summary(body), **extra}


def per_mma_over_fa2(per_mma: float, yardstick: dict | None = None) -> float | None:
    """Our instructions per HMMA ÷ those of the FA2 yardstick's reference loop (yardstick.json)."""
    from .yardstick import load, reference
    ref = reference(yardstick if yardstick is not None else load())
    return round(per_mma / ref["loop_instructions_per_mma"], 2) if ref else None


def compile_cuda() -> list[dict]:
    exe = nvcc()
    if exe is None:
        return []
    from .aot import _tool
    rows = []
    for src in sorted(CSRC.rglob("*.cu")):
        file = str(src.relative_to(ROOT))
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            out = subprocess.run([exe, *NVCC_FLAGS, "-Xptxas", "-v", f"-I{CSRC}", "-cubin", str(src), "-o", cubin],
                                 capture_output=True, text=True, timeout=900)
            if out.returncode:
                rows.append({"file": file, "error": out.stderr[-2000:]})
                continue
            sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
            elf = subprocess.run([_tool("cuobjdump"), "-elf", cubin], capture_output=True, text=True).stdout
        stats = ptxas_stats(out.stderr)
        bodies, bounds = sass_functions(sass), launch_bounds(elf)
        names = demangle(list(stats))
        for mangled, st in stats.items():
            row = kernel_row(file, names[mangled], st, bodies.get(mangled, ""), bounds.get(mangled))
            if row is not None:
                rows.append(row)
    return rows

"""Reading a compiled kernel: MMA instructions and memory paths in SASS, dots and layouts in
TTGIR, and the occupancy an H100 SM allows. Pure text processing; no compiler needed."""
from __future__ import annotations

import re
from collections import Counter

# H100 SXM / H200 streaming multiprocessor (CUDA occupancy rules for compute capability 9.0).
SM_REGS = 65536
SM_SMEM = 228 * 1024          # per SM; a CTA may use up to 227 KiB, and 1 KiB per CTA is reserved
SM_SMEM_RESERVED_PER_CTA = 1024
SM_THREADS = 2048
SM_CTAS = 32
REG_ALLOC_UNIT = 256          # registers are allocated per warp in units of 256
H100_SMS = 132

_HGMMA = re.compile(r"\bHGMMA\.(\d+)x(\d+)x(\d+)\.\w+")
# HMMA.16816 = m16 n8 k16, HMMA.1688 = m16 n8 k8, IMMA.16832 = m16 n8 k32
_HMMA = re.compile(r"\b[HI]MMA\.(16)(8)(\d+)\.\w+")


def ctas_per_sm(registers: int, shared_bytes: int, threads: int) -> dict:
    """Resident CTAs per SM and which resource limits it."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {
        "registers": (SM_REGS // regs_per_warp) // warps,
        "shared": SM_SMEM // (shared_bytes + SM_SMEM_RESERVED_PER_CTA),
        "threads": SM_THREADS // threads,
        "cta_slots": SM_CTAS,
    }
    n = min(limits.values())
    return {"ctas_per_sm": n, "limited_by": min(limits, key=limits.get)}


def sass_instructions(sass: str) -> list[str]:
    """Opcodes (with modifiers) of the SASS text, one per instruction."""
    out = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)", line)
        if m:
            out.append(m.group(1))
    return out


def sass_summary(sass: str) -> dict:
    """MMA instructions (static count and multiply-adds per warp group / warp), TMA and cp.async."""
    ops = sass_instructions(sass)
    hgmma = Counter()
    hmma = Counter()
    macs_wg = 0   # HGMMA: one instruction = one warp group's m×n×k
    macs_warp = 0  # HMMA / IMMA: one instruction = one warp's m×n×k
    for op in ops:
        if m := _HGMMA.match(op):
            hgmma[op] += 1
            macs_wg += int(m.group(1)) * int(m.group(2)) * int(m.group(3))
        elif m := _HMMA.match(op):
            hmma[op] += 1
            macs_warp += int(m.group(1)) * int(m.group(2)) * int(m.group(3))
    kinds = []
    if hgmma:
        kinds.append("HGMMA (wgmma)")
    if hmma:
        kinds.append("HMMA (mma.sync)")
    tma = sum(1 for op in ops if op.startswith(("UTMALDG", "UTMASTG", "UBLKCP", "UTMAPF")))
    ldgsts = sum(1 for op in ops if op.startswith("LDGSTS"))
    return {
        "instructions": len(ops),
        "mma_kind": " + ".join(kinds) or "none",
        "hgmma": dict(hgmma),
        "hmma": dict(hmma),
        "hgmma_static": sum(hgmma.values()),
        "hmma_static": sum(hmma.values()),
        "macs_per_warpgroup_static": macs_wg,
        "macs_per_warp_static": macs_warp,
        "tma_instructions": tma,
        "ldgsts_instructions": ldgsts,
        "memory_path": ("TMA" if tma else "cp.async (LDGSTS)" if ldgsts else "LDG/STG"),
        "ldg": sum(1 for op in ops if op.startswith("LDG.")),
        "stg": sum(1 for op in ops if op.startswith("STG.")),
    }


_LAYOUT = re.compile(r"^(#mma\d*) = #ttg\.nvidia_mma<\{versionMajor = (\d), versionMinor = \d+, "
                     r"warpsPerCTA = \[(\d+), (\d+)\].*?instrShape = \[(\d+), (\d+)(?:, (\d+))?\]", re.M)
_DOT = re.compile(r"= (?:ttng\.warp_group_dot|tt\.dot) .*?: (?:!ttg\.memdesc|tensor)<(\d+)x(\d+)x\w+[^>]*>.*?"
                  r"-> tensor<(\d+)x(\d+)xf32, (#mma\d*)>")


def ttgir_dots(ttgir: str) -> list[dict]:
    """Each dot of the TTGIR: its M, N, K and how many times the hardware computes it.

    A Hopper (v3) layout covers ``warpsPerCTA[0] × 16`` rows and ``warpsPerCTA[1] × instrN``
    columns; when that is more than the tile (``warpsPerCTA = [8, 1]`` on a 64-row tile), the
    warp groups replicate the product: ``dup`` = coverage ÷ tile, per dimension. The same
    rule holds for v2 (mma.sync, 16 × 8 per warp).
    """
    layouts = {}
    for m in _LAYOUT.finditer(ttgir):
        name, ver, wm, wn, _im, inn, _ik = m.groups()
        layouts[name] = (int(ver), int(wm), int(wn), int(inn))
    dots = []
    for m in _DOT.finditer(ttgir):
        am, ak, cm, cn, lay = int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5)
        ver, wm, wn, inn = layouts.get(lay, (0, 1, 1, 8))
        rows = wm * 16
        cols = wn * (inn if ver == 3 else 8)
        dup = max(1, rows // cm) * max(1, cols // cn)
        dots.append({"M": cm, "N": cn, "K": ak, "layout": f"v{ver} warpsPerCTA=[{wm},{wn}]", "dup": dup,
                     "macs": cm * cn * ak, "issued_macs": cm * cn * ak * dup})
        assert am == cm, (am, cm)
    return dots

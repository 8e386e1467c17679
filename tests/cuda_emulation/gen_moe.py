"""Generate host-compilable copies of the CUDA MoE kernels (csrc/moe/) for the CPU emulation.

The same rules as ``gen.py`` (whose helpers this reuses), applied to ``csrc/moe``:

1. ``moe_common.cuh``: the inline-asm bodies in ``ASM_BODIES`` (``cp.async`` with commit/wait,
   ``ldmatrix .x4``, ``mma.sync m16n8k16`` bf16 and f16) become calls into ``emu_runtime.h``,
   written from the PTX ISA independently of the kernels. Each body must contain the exact
   instruction the emulation implements, or generation fails; no ``asm`` may remain anywhere.
2. ``moe_*.cu``: the include of ``moe_common.cuh`` points at the generated copy; everything from
   the line ``// ==== host code below`` on (launchers, C API) is dropped, and the file must
   have that line; every ``__global__`` kernel NaN-fills its static ``__shared__`` arrays right
   after declaring them (``emu_poison_shared``), so a read of never-written shared memory shows.

``MUTATIONS`` are deliberate bugs, each of which the emulation test must catch.

Usage: python tests/cuda_emulation/gen_moe.py OUT_DIR [--csrc DIR] [--mutation NAME]
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CSRC = HERE.parents[1] / "csrc"

_spec = importlib.util.spec_from_file_location("mm1_cuda_emulation_gen_shared", HERE / "gen.py")
_gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gen)
GeneratorError = _gen.GeneratorError

ASM_BODIES = {
    "cp_async_16": ("cp.async.cg.shared.global [%0], [%1], 16, %2;", "emu_cp_async16(smem_dst, gmem_src, src_bytes);"),
    "cp_async_commit": ("cp.async.commit_group;", "emu_cp_async_commit();"),
    "cp_async_wait": ("cp.async.wait_group %0;", "emu_cp_async_wait(N);"),
    "ldmatrix_x4": ("ldmatrix.sync.aligned.m8n8.x4.shared.b16", "emu_ldsm_x4(r, smem_row, false);"),
    "mma_bf16_16816": ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", "emu_mma_m16n8k16(c, a, b, true);"),
    "mma_f16_16816": ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "emu_mma_m16n8k16(c, a, b, false);"),
}
COMMON_SRC = "moe/moe_common.cuh"
COMMON_OUT = "moe_common_emu.h"
COMMON_INCLUDE = '#include "moe/moe_common.cuh"'
HOST_MARKER = "// ==== host code below"
# generated file -> (source under csrc, the __global__ kernels it must define)
KERNELS = {
    "moe_route_emu.h": ("moe/moe_route.cu", ("moe_route_kernel",)),
    "moe_align_emu.h": ("moe/moe_align.cu", ("moe_count_kernel", "moe_offsets_kernel", "moe_scatter_kernel",
                                             "moe_combine_kernel")),
    "moe_gemm_emu.h": ("moe/moe_gemm.cu", ("moe_gemm_kernel",)),
}

# name -> (generated file, exact text that must occur once, replacement)
MUTATIONS = {
    # Ties go to the higher expert index.
    "route_tie_high": ("moe_route_emu.h", "if (ov > bv || (ov == bv && oi < bi)) {",
                       "if (ov > bv || (ov == bv && oi > bi)) {"),
    # Renormalization forgets the sum (divides by the first winner only).
    "route_renorm": ("moe_route_emu.h", "wsum += bv;", "if (j == 0) wsum += bv;"),
    # Within an expert, entries are ranked by a strict-less scan that also counts the entry itself.
    "align_rank": ("moe_align_emu.h", "for (int j = 0; j < tid; ++j) rank += s_expert[j] == e;",
                   "for (int j = 0; j <= tid; ++j) rank += s_expert[j] == e;"),
    # Chunk offsets ignore earlier chunks (wrong across chunk boundaries only).
    "align_chunk_offset": ("moe_align_emu.h", "a.chunk_offsets[c * E + e] = count;",
                           "a.chunk_offsets[c * E + e] = 0;"),
    # The padding of each expert's group is dropped (tiles would mix experts).
    "align_no_padding": ("moe_align_emu.h", "const int padded = (count + kBlockM - 1) / kBlockM * kBlockM;",
                         "const int padded = count;"),
    # The combine sums the slots in reverse order (bitwise different: order matters in fp32).
    "combine_order": ("moe_align_emu.h", "for (int j = 0; j < top_k; ++j) {",
                      "for (int j = top_k - 1; j >= 0; --j) {"),
    # A non-local expert's slot adds its (unwritten) row instead of exactly zero.
    "combine_nonlocal": ("moe_align_emu.h", "(e == -1 ? 0.f : __int_as_float(0x7fc00000))",
                         "(e == -1 ? rows[entry * hidden + c] : __int_as_float(0x7fc00000))"),
    # The pipeline computes on a stage before its copies landed.
    "gemm_wait": ("moe_gemm_emu.h", "cp_async_wait<kStages - 2>();", "cp_async_wait<kStages - 1>();"),
    # A wrong ldmatrix row for the B operand (n tile halves swapped).
    "gemm_b_ldmatrix": ("moe_gemm_emu.h", "(lane / 16) * 8) * B_STRIDE + ks + ((lane / 8) % 2) * 8",
                        "(1 - lane / 16) * 8) * B_STRIDE + ks + ((lane / 8) % 2) * 8"),
    # The up rows of w13 are read from the gate half.
    "gemm_up_rows": ("moe_gemm_emu.h", "const int64_t wrow = (GATE_UP && r >= kBN) ? a.n_out + col : col;",
                     "const int64_t wrow = col;"),
    # The int8 scale of the up half uses the gate channel's scale.
    "gemm_int8_up_scale": ("moe_gemm_emu.h", "u *= scale_e[(a.n_out + col) * a.stride_sn];",
                           "u *= scale_e[col * a.stride_sn];"),
    # The K tail is read past the row (no src-size clamp).
    "gemm_k_tail": ("moe_gemm_emu.h", "const int bytes = (ro >= 0 && kk < K) ? min(8, K - kk) * 2 : 0;",
                    "const int bytes = (ro >= 0 && kk < K) ? 16 : 0;"),
    # The routing weight is not applied in the down epilogue.
    "gemm_route_weight": ("moe_gemm_emu.h", "= v * a.route_w[entry];", "= v;"),
    # The main loop's barrier is dropped: warps read stages other warps' copies have not filled,
    # and copies land in a stage other warps still read (a shared-memory race; ThreadSanitizer).
    "gemm_drop_barrier": ("moe_gemm_emu.h",
                          "    __syncthreads();               // everyone's have; and stage kt-1 is no longer read",
                          "    /* dropped */                  // everyone's have; and stage kt-1 is no longer read"),
}


def _transform(text: str, kernels: tuple, where: str) -> str:
    if text.count(COMMON_INCLUDE) != 1:
        raise GeneratorError(f"{where}: expected one line {COMMON_INCLUDE}; update tests/cuda_emulation/gen_moe.py")
    text = text.replace(COMMON_INCLUDE, f'#include "{COMMON_OUT}"')
    if text.count(HOST_MARKER) != 1:
        raise GeneratorError(f"{where}: expected one line starting {HOST_MARKER!r} separating the kernels from "
                             f"the host code; update tests/cuda_emulation/gen_moe.py")
    text = text[:text.index(HOST_MARKER)]
    if "extern __shared__" in text:
        raise GeneratorError(f"{where}: dynamic shared memory is not emulated by gen_moe.py")
    heads = list(re.finditer(r"__global__[^;{]*\)\s*\{", text))
    found = [[n for n in re.findall(r"\b(\w+)\s*\(", h.group(0)) if n != "__launch_bounds__"][0] for h in heads]
    if sorted(found) != sorted(kernels):
        raise GeneratorError(f"{where}: kernels {found}, expected {list(kernels)}; update KERNELS in "
                             f"tests/cuda_emulation/gen_moe.py")
    spans = [(h.end() - 1, _gen._matching_brace(text, h.end() - 1, where)) for h in heads]
    for open_pos, close in reversed(spans):  # back to front: earlier offsets stay valid
        text = text[:open_pos] + _gen._poison_static_shared(text[open_pos:close + 1], where) + text[close + 1:]
    return text


def generate(out_dir, csrc=DEFAULT_CSRC, mutation: str | None = None) -> dict:
    """Write moe_common_emu.h and one header per kernel file into out_dir; return their paths."""
    out_dir, csrc = Path(out_dir), Path(csrc)
    out_dir.mkdir(parents=True, exist_ok=True)
    where = str(csrc / COMMON_SRC)
    common = (csrc / COMMON_SRC).read_text()
    for func, (instr, body) in ASM_BODIES.items():
        common = _gen._replace_asm_body(common, func, instr, body, where)
    texts = {COMMON_OUT: common}
    for out, (src, kernels) in KERNELS.items():
        texts[out] = _transform((csrc / src).read_text(), kernels, str(csrc / src))
    for out, text in texts.items():
        code = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)
        if re.search(r"\basm\b", code):
            raise GeneratorError(f"{out}: inline asm left after generation (a new asm block the emulation "
                                 f"does not cover); update tests/cuda_emulation/gen_moe.py")
    if mutation:
        if mutation not in MUTATIONS:
            raise GeneratorError(f"unknown mutation {mutation!r}; known: {sorted(MUTATIONS)}")
        out, old, new = MUTATIONS[mutation]
        if texts[out].count(old) != 1:
            raise GeneratorError(f"mutation {mutation!r}: expected its target text once in {out}, found "
                                 f"{texts[out].count(old)}; update MUTATIONS in tests/cuda_emulation/gen_moe.py")
        texts[out] = texts[out].replace(old, new)
    paths = {}
    for out, text in texts.items():
        banner = f"// GENERATED by tests/cuda_emulation/gen_moe.py from {csrc}; do not edit.\n"
        if mutation:
            banner += f"// MUTATION {mutation} applied (deliberately broken).\n"
        (out_dir / out).write_text(banner + text)
        paths[out] = out_dir / out
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--csrc", default=str(DEFAULT_CSRC))
    p.add_argument("--mutation", choices=sorted(MUTATIONS))
    args = p.parse_args(argv)
    try:
        for path in generate(args.out_dir, args.csrc, args.mutation).values():
            print(path)
    except GeneratorError as e:
        print(f"gen_moe.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

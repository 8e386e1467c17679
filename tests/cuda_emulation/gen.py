"""Generate host-compilable copies of the CUDA lightning kernels for the CPU emulation test.

The kernels in ``csrc/lightning/`` are copied unchanged except for these edits, each of which
must find exactly what it expects or the generator raises ``GeneratorError`` (never a silent
test of stale or partially transformed code):

1. ``lightning_common.cuh``: the inline-asm bodies listed in ``ASM_BODIES`` (``cvt.rna.tf32``,
   ``mma.sync`` m16n8k8 TF32 and m16n8k16 bf16, ``ldmatrix`` .x4 and .x4.trans, ``cp.async``
   with commit/wait) become calls into ``emu_runtime.h``, written from the PTX ISA fragment
   layouts independently of the kernel (``cvta.to.shared`` as well: a 32-bit shared address is
   the offset into the host buffer standing in for dynamic shared memory). The instruction
   strings are matched too: if the kernel switches to another MMA shape, rounding mode, operand
   type or copy size, the emulation no longer describes it and generation fails. No ``asm`` may
   remain in any generated file.
2. ``lightning_*.cu``: the include of ``lightning_common.cuh`` points at the generated copy;
   ``extern __shared__ T name[];`` becomes a pointer to the host-side dynamic shared memory;
   after the last static ``__shared__`` declaration of a kernel, every thread calls
   ``emu_poison_shared`` on each of them (NaN-fills them between two block barriers, before any
   kernel statement ran); everything after the last listed ``__global__`` kernel of the file
   (host launch code, C API) is dropped.

If a check fails, update ``ASM_BODIES`` / ``KERNELS`` below (and the emulation in
``emu_runtime.h`` when the instruction changed) together with the kernel.

``MUTATIONS`` are deliberate bugs for checking that the test can fail; select one with
``--mutation NAME`` or the ``MM1_EMU_MUTATION`` environment variable of the pytest module.

Usage: python tests/cuda_emulation/gen.py OUT_DIR [--csrc DIR] [--mutation NAME]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CSRC = ROOT / "csrc"
HINT = ("update tests/cuda_emulation/gen.py (and the emulation in tests/cuda_emulation/emu_runtime.h "
        "if the instruction changed) to match the kernel")


class GeneratorError(RuntimeError):
    pass


# function name -> (required instruction text inside its body, replacement body)
ASM_BODIES = {
    "to_tf32": ("cvt.rna.tf32.f32", "return emu_to_tf32(x);"),
    "mma_tf32": ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", "emu_mma(c, a, b);"),
    "mma_bf16": ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", "emu_mma_m16n8k16(c, a, b, true);"),
    "smem_u32": ("cvta.to.shared.u64", "return emu_smem_u32(p);"),
    "ldsm_x4": ("ldmatrix.sync.aligned.m8n8.x4.shared.b16", "emu_ldsm_x4(r, addr, false);"),
    "ldsm_x4_trans": ("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", "emu_ldsm_x4(r, addr, true);"),
    "cp_async16": ("cp.async.cg.shared.global [%0], [%1], 16, %2;", "emu_cp_async16(dst, src, src_bytes);"),
    "cp_async_commit": ("cp.async.commit_group;", "emu_cp_async_commit();"),
    "cp_async_wait": ("cp.async.wait_group %0;", "emu_cp_async_wait(N);"),
}

# generated file -> (source under csrc, names of the __global__ kernels it defines)
KERNELS = {
    "prefill_emu.h": ("lightning/lightning_prefill.cu",
                      ("lightning_prefill_kernel", "lightning_prefill_bf16_kernel",
                       "lightning_prefill_segments_kernel", "lightning_prefill_scan_kernel")),
    "decode_emu.h": ("lightning/lightning_decode.cu", ("lightning_decode_kernel",)),
}
COMMON_SRC = "lightning/lightning_common.cuh"
COMMON_OUT = "common_emu.h"
COMMON_INCLUDE = '#include "lightning/lightning_common.cuh"'

# name -> (generated file, exact text that must occur once, replacement)
MUTATIONS = {
    # B fragment of P·V reads column g^1 instead of g for b1 (a wrong fragment index).
    "pv_b_fragment": ("prefill_emu.h", "fb.set(1, v_s[(k0 + t + 4) * L::V_STRIDE + n0 + g]);",
                      "fb.set(1, v_s[(k0 + t + 4) * L::V_STRIDE + n0 + (g ^ 1)]);"),
    # The barrier between the last reads of a chunk and the overwrite of S_in is dropped
    # (a shared-memory race; ThreadSanitizer finds it, the numeric checks usually do not).
    "drop_state_barrier": ("prefill_emu.h", "    __syncthreads();     // every read of this chunk's tiles",
                           "    /* dropped */        // every read of this chunk's tiles"),
    # bf16 kernel: the Q·S B operand (the state, ldmatrix.trans) with matrices 1 and 2 swapped
    # (a wrong ldmatrix row address: k rows +8 and n columns +8 exchanged).
    "bf16_ldsm_address": ("prefill_emu.h",
                          "const uint32_t s_b = smem_u32(s_s + (lr + 8 * m1) * L::S_LD + c_base + 8 * m2);",
                          "const uint32_t s_b = smem_u32(s_s + (lr + 8 * m2) * L::S_LD + c_base + 8 * m1);"),
    # bf16 kernel: the cp.async wait before the chunk's barrier is dropped (tiles never land).
    "bf16_drop_cp_async_wait": ("prefill_emu.h", "    cp_async_wait<1>();\n", "    /* dropped */\n"),
    # bf16 kernel: waits for all but the newest TWO groups (chunk c's copies may still be pending).
    "bf16_cp_async_wait_depth": ("prefill_emu.h", "    cp_async_wait<1>();\n", "    cp_async_wait<2>();\n"),
    # bf16 kernel: the lo half of the decayed-key pair is dropped (keys rounded to bf16 once):
    # the state loses the fp32 contract.
    "bf16_state_pair_lo": ("prefill_emu.h",
                           "lo[mi][e] = pack_bf16x2(fmaf(kv.x, d0, -yh.x), fmaf(kv.y, d1, -yh.y));",
                           "lo[mi][e] = 0u;"),
    # bf16 kernel, loop over full chunks: the key decays of the first 16-token step are used for
    # every step (the registers hoisted out of the loop indexed wrongly).
    "bf16_full_chunk_key_decay": ("prefill_emu.h", "kd[e] = FULL ? k_dec[i0 / 16][e]", "kd[e] = FULL ? k_dec[0][e]"),
    # bf16 kernel, loop over full chunks: both output rows of a lane take row g's λ^(j+1).
    "bf16_full_chunk_output_decay": ("prefill_emu.h", "fmaf(o_dec[r >= 2], qs[ni][r], pv[ni][r])",
                                     "fmaf(o_dec[0], qs[ni][r], pv[ni][r])"),
    # Segment split: the scan decays a segment's carried state by λ^(L-1) instead of λ^L.
    "split_scan_decay_power": ("prefill_emu.h", "static_cast<double>(segment_len)));",
                               "static_cast<double>(segment_len - 1)));"),
    # Segment split: each segment's incoming state is the one after it (off by one segment).
    "split_incoming_off_by_one": ("prefill_emu.h", "    *p = S;\n    S = fmaf(S, decay, local);\n",
                                  "    S = fmaf(S, decay, local);\n    *p = S;\n"),
    # Segment split: every segment of the output pass writes the final state, not only the last.
    "split_final_from_non_last": ("prefill_emu.h", "w.out = (last && a.final_state) ?", "w.out = (a.final_state) ?"),
    # Segment split: the table drops each sequence's last partial segment (⌊len/L⌋ segments).
    "split_table_drops_partial": ("prefill_emu.h",
                                  "cnt = max((eos - bos + segment_len - 1) / segment_len, int64_t(1));",
                                  "cnt = max((eos - bos) / segment_len, int64_t(1));"),
    # bf16 kernel, precision "high": the lo product of the state in Q S is dropped (hi alone).
    "bf16_high_drop_lo": ("prefill_emu.h", "                mma_bf16(qs[2 * np], fa, l0);\n",
                          "                /* dropped */\n"),
    # Decode reduction over warps skips the last warp.
    "decode_reduce": ("decode_emu.h", "for (int w = 0; w < kDecodeWarps; ++w) sum += red_s[w][c];",
                      "for (int w = 0; w < kDecodeWarps - 1; ++w) sum += red_s[w][c];"),
}


def _fail(msg: str) -> None:
    raise GeneratorError(f"{msg}; {HINT}")


def _matching_brace(text: str, open_pos: int, where: str) -> int:
    """Index of the '}' closing the '{' at open_pos (skips comments, strings, char literals)."""
    depth, i, n = 0, open_pos, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    _fail(f"{where}: unbalanced braces")
    return -1


def _replace_asm_body(text: str, func: str, instr: str, body: str, where: str) -> str:
    heads = list(re.finditer(r"__device__[^;{}()]*\b" + re.escape(func) + r"\s*\([^;{}]*\)\s*\{", text))
    if len(heads) != 1:
        _fail(f"{where}: expected exactly one definition of device function '{func}' "
              f"(the inline-asm body the emulation replaces), found {len(heads)}")
    open_pos = heads[0].end() - 1
    close = _matching_brace(text, open_pos, where)
    old = text[open_pos + 1:close]
    if "asm" not in old or instr not in old:
        _fail(f"{where}: '{func}' no longer is the inline asm '{instr}' the emulation implements")
    return text[:open_pos + 1] + " " + body + " " + text[close:]


def _poison_static_shared(kernel: str, where: str) -> str:
    """After the last static __shared__ declaration, NaN-fill every static shared array."""
    decls = list(re.finditer(r"^[ \t]*__shared__[^;\n]*;[ \t]*\n", kernel, flags=re.M))
    if not decls:
        return kernel
    names = []
    for d in decls:
        m = re.fullmatch(r"\s*__shared__\s+[\w:<>, ]+?\s+(\w+)\s*(\[[^\]]+\]\s*)+;\s*", d.group(0))
        if not m:
            _fail(f"{where}: unsupported __shared__ declaration {d.group(0).strip()!r}")
        names.append(m.group(1))
    calls = "".join(f"  emu_poison_shared({nm}, sizeof({nm}));  // emulation: NaN-fill\n" for nm in names)
    end = decls[-1].end()
    return kernel[:end] + calls + kernel[end:]


def _transform_kernel_file(text: str, kernels: tuple[str, ...], where: str) -> str:
    if text.count(COMMON_INCLUDE) != 1:
        _fail(f"{where}: expected one line {COMMON_INCLUDE}")
    text = text.replace(COMMON_INCLUDE, f'#include "{COMMON_OUT}"')
    text, n = re.subn(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;",
                      r"\1* \2 = reinterpret_cast<\1*>(emu_dyn_smem);", text)
    if "extern __shared__" in text:
        _fail(f"{where}: unsupported 'extern __shared__' declaration")
    spans = []
    for kernel in kernels:
        heads = list(re.finditer(r"__global__[^;{]*\b" + re.escape(kernel) + r"\s*\([^;{]*\)\s*\{", text))
        if len(heads) != 1:
            _fail(f"{where}: expected exactly one __global__ definition of '{kernel}', found {len(heads)}")
        open_pos = heads[0].end() - 1
        spans.append((open_pos, _matching_brace(text, open_pos, where)))
    spans.sort()
    # Keep everything up to the last kernel's end; host code (launchers, C API) is not emulated.
    # The anonymous namespace and the two named ones the kernels sit in are closed again.
    last_open, last_close = spans[-1]
    opened = re.findall(r"^namespace(?:\s+(\w+))?\s*\{", text[:last_open], flags=re.M)
    closed = len(re.findall(r"^\}\s*//\s*namespace", text[:last_open], flags=re.M))
    depth = len(opened) - closed
    if depth < 0:
        _fail(f"{where}: cannot follow the namespaces around '{kernels[-1]}'")
    text = text[:last_close + 1]
    for open_pos, close in reversed(spans):  # back to front: earlier offsets stay valid
        text = text[:open_pos] + _poison_static_shared(text[open_pos:close + 1], where) + text[close + 1:]
    return text + "\n" + "}  // namespace (closed by gen.py)\n" * depth


def generate(out_dir: Path | str, csrc: Path | str = DEFAULT_CSRC, mutation: str | None = None) -> dict[str, Path]:
    """Write common_emu.h, prefill_emu.h and decode_emu.h into out_dir; return their paths."""
    out_dir, csrc = Path(out_dir), Path(csrc)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts: dict[str, str] = {}
    where = str(csrc / COMMON_SRC)
    common = (csrc / COMMON_SRC).read_text()
    for func, (instr, body) in ASM_BODIES.items():
        common = _replace_asm_body(common, func, instr, body, where)
    texts[COMMON_OUT] = common
    for out, (src, kernels) in KERNELS.items():
        texts[out] = _transform_kernel_file((csrc / src).read_text(), kernels, str(csrc / src))
    for out, text in texts.items():
        code = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)
        if re.search(r"\basm\b", code):
            _fail(f"{out}: inline asm left after generation (a new asm block the emulation does not cover)")
    if mutation:
        if mutation not in MUTATIONS:
            raise GeneratorError(f"unknown mutation {mutation!r}; known: {sorted(MUTATIONS)}")
        out, old, new = MUTATIONS[mutation]
        if texts[out].count(old) != 1:
            raise GeneratorError(f"mutation {mutation!r}: expected its target text once in {out}, found "
                                 f"{texts[out].count(old)}; update MUTATIONS in tests/cuda_emulation/gen.py")
        texts[out] = texts[out].replace(old, new)
    paths = {}
    for out, text in texts.items():
        banner = f"// GENERATED by tests/cuda_emulation/gen.py from {csrc}; do not edit.\n"
        if mutation:
            banner += f"// MUTATION {mutation} applied (deliberately broken).\n"
        (out_dir / out).write_text(banner + text)
        paths[out] = out_dir / out
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--csrc", default=str(DEFAULT_CSRC))
    p.add_argument("--mutation", choices=sorted(MUTATIONS))
    args = p.parse_args(argv)
    try:
        for path in generate(args.out_dir, args.csrc, args.mutation).values():
            print(path)
    except GeneratorError as e:
        print(f"gen.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

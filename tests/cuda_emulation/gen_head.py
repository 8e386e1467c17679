"""Generate host-compilable copies of the CUDA head kernels (csrc/head/) for the CPU emulation.

The sources are copied unchanged except for these edits, each of which must find exactly what
it expects or the generator raises ``GeneratorError`` (never a silent test of stale code):

1. ``head_common.cuh``: the bodies of ``mma_bf16`` / ``mma_f16`` (inline asm
   ``mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}...``) become calls to ``emu_mma_m16n8k16``
   in ``emu_runtime.h``, written from the PTX ISA fragment layouts independently of the kernels.
   The instruction strings are matched: another MMA shape or type stops generation. No
   ``asm`` may remain in a generated file.
2. ``head_*.cu``: the include of ``head_common.cuh`` points at the generated copy; after the
   last static ``__shared__`` declaration of each kernel every thread calls
   ``emu_poison_shared`` on each array (NaN-filled before any kernel statement ran); the host
   code after the marker line ``HOST_MARKER`` (launchers, C API) is dropped and the open
   namespaces are closed.

``MUTATIONS`` are deliberate bugs for checking that the test can fail; select one with
``--mutation NAME`` or the ``MM1_HEAD_EMU_MUTATION`` environment variable of the pytest module.

Usage: python tests/cuda_emulation/gen_head.py OUT_DIR [--csrc DIR] [--mutation NAME]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CSRC = ROOT / "csrc"
HINT = ("update tests/cuda_emulation/gen_head.py (and the emulation in tests/cuda_emulation/emu_runtime.h "
        "if the instruction changed) to match the kernels")
HOST_MARKER = "// ==== host code below: launchers and the C API (not emulated) ===="


class GeneratorError(RuntimeError):
    pass


COMMON_SRC = "head/head_common.cuh"
COMMON_OUT = "head_common_emu.h"
COMMON_INCLUDE = '#include "head/head_common.cuh"'
# function name -> (required instruction text inside its body, replacement body)
ASM_BODIES = {
    "mma_bf16": ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", "emu_mma_m16n8k16(c, a, b, true);"),
    "mma_f16": ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "emu_mma_m16n8k16(c, a, b, false);"),
}
# generated file -> (source under csrc, its __global__ kernels)
KERNELS = {
    "head_forward_emu.h": ("head/head_forward.cu", ("head_stats_kernel", "head_merge_kernel")),
    "head_backward_emu.h": ("head/head_backward.cu", ("head_dlogits_kernel",)),
}

# name -> (generated file, exact text that must occur once, replacement)
MUTATIONS = {
    # 16-bit B fragment: b1 reads the k = 2t..2t+1 word again instead of 2t+8..2t+9.
    "b_fragment": (COMMON_OUT, "const uint32_t b[2] = {wr[0], wr[4]};", "const uint32_t b[2] = {wr[0], wr[0]};"),
    # fp32 inputs: one of the six bf16 split products (hi·mid of the weight) is dropped.
    "drop_split_term": (COMMON_OUT, "        mma_bf16(blk[ni], a[0], b[1]);\n", "\n"),
    # The running sum s is not rescaled when the running max grows.
    "no_rescale": ("head_forward_emu.h", "const float alpha = expf(m[rr] - mx);", "const float alpha = 1.f;"),
    # The second column half of each row is not merged into the split's statistics.
    "drop_column_half": ("head_forward_emu.h",
                         "combine(M, S, U, Tl, red_s[1][row][0], red_s[1][row][1], red_s[1][row][2], "
                         "red_s[1][row][3]);", ""),
    # The split merge skips the last vocabulary split.
    "merge_skip_last_split": ("head_forward_emu.h", "for (int i = 0; i < nsplit; ++i) {\n",
                              "for (int i = 0; i < nsplit - 1; ++i) {\n"),
    # The target logit is looked up one column off.
    "target_off_by_one": ("head_forward_emu.h", "if (v0 + col == tgt[rr]) tl[rr] += zv;",
                          "if (v0 + col + 1 == tgt[rr]) tl[rr] += zv;"),
    # The K tail of a tile is not masked on the element-wise load path (reads past K).
    "k_tail_unmasked": (COMMON_OUT, "(r < rows_valid && c < k_valid) ? src[r * stride + c] : zero_elem<T>();",
                        "(r < rows_valid && c <= k_valid) ? src[r * stride + c] : zero_elem<T>();"),
    # The backward forgets that an ignored row's logprob carries no gradient.
    "dlogits_ignored_grad": ("head_backward_emu.h", "tgt == kIgnoreIndex ? 0.f : a.g_lp[tr];", "a.g_lp[tr];"),
    # The backward's one-hot term uses the block-local column (vocab_offset dropped).
    "dlogits_offset": ("head_backward_emu.h", "if (a.vocab_offset + c0 + col == tgt) gz += g_lp;",
                       "if (c0 + col == tgt) gz += g_lp;"),
    # The barrier before a tile is overwritten is dropped (a shared-memory race; ThreadSanitizer).
    "drop_tile_barrier": (COMMON_OUT, "    __syncthreads();  // every warp is done reading the previous block's tiles",
                          "    /* dropped */     // every warp is done reading the previous block's tiles"),
}


def _fail(msg: str) -> None:
    raise GeneratorError(f"{msg}; {HINT}")


def _matching_brace(text: str, open_pos: int, where: str) -> int:
    """Index of the '}' closing the '{' at open_pos (skips comments, strings, char literals)."""
    depth, i, n = 0, open_pos, len(text)
    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        c = text[i]
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
        _fail(f"{where}: expected exactly one definition of device function '{func}', found {len(heads)}")
    open_pos = heads[0].end() - 1
    close = _matching_brace(text, open_pos, where)
    old = text[open_pos + 1:close]
    if "asm" not in old or instr not in old:
        _fail(f"{where}: '{func}' no longer is the inline asm '{instr}' the emulation implements")
    return text[:open_pos + 1] + " " + body + " " + text[close:]


def _poison_static_shared(text: str, kernel: str, where: str) -> str:
    heads = list(re.finditer(r"__global__[^;{]*\b" + re.escape(kernel) + r"\s*\([^;{]*\)\s*\{", text))
    if len(heads) != 1:
        _fail(f"{where}: expected exactly one __global__ definition of '{kernel}', found {len(heads)}")
    open_pos = heads[0].end() - 1
    close = _matching_brace(text, open_pos, where)
    body = text[open_pos:close + 1]
    decls = list(re.finditer(r"^[ \t]*__shared__[^;\n]*;[ \t]*\n", body, flags=re.M))
    names = []
    for d in decls:
        m = re.fullmatch(r"\s*__shared__\s+(?:__align__\(\d+\)\s+)?[\w:<>, ]+?\s+(\w+)\s*(\[[^\]]+\]\s*)+;\s*",
                         d.group(0))
        if not m:
            _fail(f"{where}: unsupported __shared__ declaration {d.group(0).strip()!r}")
        names.append(m.group(1))
    if decls:
        calls = "".join(f"  emu_poison_shared({nm}, sizeof({nm}));  // emulation: NaN-fill\n" for nm in names)
        end = decls[-1].end()
        body = body[:end] + calls + body[end:]
    return text[:open_pos] + body + text[close + 1:]


def _transform_kernel_file(text: str, kernels: tuple, where: str) -> str:
    if text.count(COMMON_INCLUDE) != 1:
        _fail(f"{where}: expected one line {COMMON_INCLUDE}")
    text = text.replace(COMMON_INCLUDE, f'#include "{COMMON_OUT}"')
    if text.count(HOST_MARKER) != 1:
        _fail(f"{where}: expected the marker line {HOST_MARKER!r} once")
    text = text[:text.index(HOST_MARKER)]
    if "extern __shared__" in text:
        _fail(f"{where}: 'extern __shared__' is not supported by this generator")
    for kernel in kernels:
        text = _poison_static_shared(text, kernel, where)
    opened = len(re.findall(r"^namespace(?:\s+\w+)?\s*\{", text, flags=re.M))
    closed = len(re.findall(r"^\}\s*//\s*namespace", text, flags=re.M))
    if opened - closed < 0:
        _fail(f"{where}: cannot follow the namespaces before the host code")
    return text + "}  // namespace (closed by gen_head.py)\n" * (opened - closed)


def generate(out_dir: Path | str, csrc: Path | str = DEFAULT_CSRC, mutation: str | None = None) -> dict[str, Path]:
    """Write head_common_emu.h, head_forward_emu.h and head_backward_emu.h; return their paths."""
    out_dir, csrc = Path(out_dir), Path(csrc)
    out_dir.mkdir(parents=True, exist_ok=True)
    where = str(csrc / COMMON_SRC)
    common = (csrc / COMMON_SRC).read_text()
    for func, (instr, body) in ASM_BODIES.items():
        common = _replace_asm_body(common, func, instr, body, where)
    texts = {COMMON_OUT: common}
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
                                 f"{texts[out].count(old)}; update MUTATIONS in tests/cuda_emulation/gen_head.py")
        texts[out] = texts[out].replace(old, new)
    paths = {}
    for out, text in texts.items():
        banner = f"// GENERATED by tests/cuda_emulation/gen_head.py from {csrc}; do not edit.\n"
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
        print(f"gen_head.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

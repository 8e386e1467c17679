"""Generate host-compilable copies of the CUDA lightning kernels for the CPU emulation test.

The kernels in ``csrc/lightning/`` are copied unchanged except for these edits, each of which
must find exactly what it expects or the generator raises ``GeneratorError`` (never a silent
test of stale or partially transformed code):

1. ``lightning_common.cuh``: the bodies of ``to_tf32`` (``cvt.rna.tf32.f32``) and ``mma_tf32``
   (``mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32``) become calls to ``emu_to_tf32`` /
   ``emu_mma`` in ``emu_runtime.h``, written from the PTX ISA fragment layouts independently of
   the kernel. The instruction strings are matched too: if the kernel switches to another MMA
   shape, rounding mode or operand type, the emulation no longer describes it and generation
   fails. No ``asm`` may remain in any generated file.
2. ``lightning_*.cu``: the include of ``lightning_common.cuh`` points at the generated copy;
   ``extern __shared__ T name[];`` becomes a pointer to the host-side dynamic shared memory;
   after the last static ``__shared__`` declaration of a kernel, every thread calls
   ``emu_poison_shared`` on each of them (NaN-fills them between two block barriers, before any
   kernel statement ran); everything after the ``__global__`` kernel (host launch code, C API)
   is dropped.

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
}

# generated file -> (source under csrc, name of the __global__ kernel it defines)
KERNELS = {
    "prefill_emu.h": ("lightning/lightning_prefill.cu", "lightning_prefill_kernel"),
    "decode_emu.h": ("lightning/lightning_decode.cu", "lightning_decode_kernel"),
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


def _transform_kernel_file(text: str, kernel: str, where: str) -> str:
    if text.count(COMMON_INCLUDE) != 1:
        _fail(f"{where}: expected one line {COMMON_INCLUDE}")
    text = text.replace(COMMON_INCLUDE, f'#include "{COMMON_OUT}"')
    text, n = re.subn(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;",
                      r"\1* \2 = reinterpret_cast<\1*>(emu_dyn_smem);", text)
    if "extern __shared__" in text:
        _fail(f"{where}: unsupported 'extern __shared__' declaration")
    heads = list(re.finditer(r"__global__[^;{]*\b" + re.escape(kernel) + r"\s*\([^;{]*\)\s*\{", text))
    if len(heads) != 1:
        _fail(f"{where}: expected exactly one __global__ definition of '{kernel}', found {len(heads)}")
    open_pos = heads[0].end() - 1
    close = _matching_brace(text, open_pos, where)
    body = _poison_static_shared(text[open_pos:close + 1], where)
    # Keep everything up to the kernel's end; host code (launchers, C API) is not emulated.
    # The anonymous namespace and the two named ones the kernel sits in are closed again.
    opened = re.findall(r"^namespace(?:\s+(\w+))?\s*\{", text[:open_pos], flags=re.M)
    closed = len(re.findall(r"^\}\s*//\s*namespace", text[:open_pos], flags=re.M))
    depth = len(opened) - closed
    if depth < 0:
        _fail(f"{where}: cannot follow the namespaces around '{kernel}'")
    return text[:open_pos] + body + "\n" + "}  // namespace (closed by gen.py)\n" * depth


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
    for out, (src, kernel) in KERNELS.items():
        texts[out] = _transform_kernel_file((csrc / src).read_text(), kernel, str(csrc / src))
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

"""CPU emulation of the CUDA MoE kernels (csrc/moe/; no GPU, only g++ and the CUDA headers).

``tests/cuda_emulation/gen_moe.py`` copies every kernel out of the CURRENT ``csrc/moe/`` sources,
replacing only the inline-asm bodies of ``moe_common.cuh`` (cp.async + commit/wait, ldmatrix .x4,
mma.sync m16n8k16 bf16/f16) with the emulation in ``tests/cuda_emulation/emu_runtime.h`` (written
from the PTX ISA fragment layouts; cp.async data lands only at the wait_group that covers it).
``test_moe.cpp`` runs the kernels block by block (a block as host threads), grids enumerated as
the host launchers size them, built with ``-fsanitize=address,undefined``, and prints one
``EMU_RESULT {json}`` line per case; the thresholds are asserted here.

What it checks, against fp64 or exact references written in the driver:

- routing (every registers-per-lane instantiation, fp32/bf16/fp16 logits, k up to 40 and k = E,
  padded rows): ids exactly (ties to the lower expert: logits are multiples of 1/4, so ties are
  exact and there are no near-ties), weights <= 1e-5 relative, rows without a softmax (NaN,
  +inf, all -inf) get ids 0..k-1 and NaN weights;
- alignment (several 256-entry chunks, int32/int64 ids, expert maps with -1 and invalid values,
  2^33 ids, 1000 experts, all entries non-local): ``sorted_ids`` and ``block_expert`` equal the
  definition element by element (deterministic: entries ascending within an expert);
- combine: bitwise equal to the fp32 slot-order sum; NaN rows for invalid ids, exact zeros for
  non-local slots, no writes past ``hidden``;
- the whole fused MoE (align -> gate_up GEMM -> down GEMM -> combine; bf16 and fp16, 16-bit
  and int8 weights with strided scales, K and column tails, padded row and expert strides, more
  row tiles than one launch group): ``h`` vs fp64 silu(gate)·up (<= the 16-bit rounding:
  2^-8 bf16, 2^-10 fp16), the down GEMM's fp32 rows vs fp64 from the kernel's own ``h``
  (<= 1e-5: isolates the GEMM), the output vs the fp64 MoE (<= 1e-2), and that nothing else is
  written (h, rows and outputs start as NaN / poison), no cp.async left pending, no smem read
  before it was written (static shared memory is NaN-filled per block).

Self-tests: two builds with a deliberate bug (``gen_moe.MUTATIONS``: a wrong ldmatrix row of
the GEMM's B operand, and a wrong rank in the alignment) must fail the checks;
``MM1_EMU_MOE_MUTATION=<name>`` runs the whole module on mutated kernels.

Also: a ThreadSanitizer build on two cases (slow; ``MM1_EMU_TSAN=0`` skips it) that must report
the GEMM without its main-loop barrier, and a plain-C caller of ``moe.h`` whose bad arguments
(overlapping output rows, misaligned pointers, short workspace, > 1024 experts, T·k overflow)
must be refused with ``cudaErrorInvalidValue`` before any launch.

Cannot catch: real tensor-core rounding and accumulation order, timing, the GPU memory model
beyond the modelled collectives, bank conflicts, register or shared-memory limits (see
``test_cuda_compile.py``), the host launchers (not emulated; the C API's argument checks are
tested without a launch), a copy issued into a stage other warps still read while a barrier
still precedes its wait (copies land at the wait here, the latest a GPU may land them).

Skipped (with the reason) when g++ or the CUDA headers are missing.
"""
from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cuda_c_api import find_nvcc, run_c_api_program

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emulation"
CSRC = ROOT / "csrc"
GXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")

_spec = importlib.util.spec_from_file_location("mm1_cuda_emulation_gen_moe", EMU / "gen_moe.py")
gen_moe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_moe)


def _cuda_include() -> Path | None:
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    for home in filter(None, homes):
        inc = Path(home) / "include"
        if all((inc / h).is_file() for h in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")):
            return inc
    return None


CUDA_INC = _cuda_include()
pytestmark = [
    pytest.mark.skipif(GXX is None, reason="g++ not found (needed to build the CPU emulation of the CUDA kernels)"),
    pytest.mark.skipif(CUDA_INC is None, reason="CUDA headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) not found "
                                                "under CUDA_HOME, CUDA_PATH, /usr/local/cuda or next to nvcc"),
]

# -O0: the run is dominated by creating host threads, not by code quality; -O0 compiles ~4x faster.
BASE_FLAGS = ["-std=c++20", "-Wno-attributes", "-pthread", "-O0"]
SAN_FLAGS = ["-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
SAN_ENV = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
MUTATION = os.environ.get("MM1_EMU_MOE_MUTATION") or None
TIMEOUT = 900
TSAN_FLAGS = ["-O1", "-g", "-fsanitize=thread"]
TSAN_ENV = {"TSAN_OPTIONS": "halt_on_error=1:report_signal_unsafe=0"}
# ThreadSanitizer runs these cases: the GEMM pipeline (3 K blocks, int8 and 16-bit weights) and
# the alignment's shared-memory counts and scan.
TSAN_CASES = ["fused_bf16_int8", "align_i32_skew_3chunks"]
RUN_TSAN = os.environ.get("MM1_EMU_TSAN", "1") != "0"

# Expected cases and the coverage each must report (guards against a case silently changing).
ROUTE_CASES = {
    "route_f32_e32_k2": dict(dtype="float32", vpl=1, k=2, bad_rows=3),
    "route_bf16_e33_k33_norenorm": dict(dtype="bfloat16", vpl=2, k=33, renormalize=0, bad_rows=3),
    "route_f16_e100_k8": dict(dtype="float16", vpl=4, k=8, bad_rows=3),
    "route_f32_e256_k40": dict(dtype="float32", vpl=8, k=40, bad_rows=3),
    "route_bf16_e1000_k2": dict(dtype="bfloat16", vpl=32, k=2, bad_rows=3),
    "route_f32_e1_k1": dict(dtype="float32", vpl=1, k=1, E=1),
}
ALIGN_CASES = {
    "align_i32_skew_3chunks": dict(ids_bytes=4, has_map=0, chunks=3, invalid=2),
    "align_i64_map": dict(ids_bytes=8, has_map=1, chunks=2),
    "align_e1000": dict(E=1000),
    "align_all_nonlocal": dict(has_map=1, placed=0, tiles_used=0),
}
COMBINE_CASES = {
    "combine_bf16_map_k3": dict(dtype="bfloat16", has_map=1, nan_rows=1, grid_y=2),
    "combine_f16_k2": dict(dtype="float16", has_map=0, nan_rows=0),
}
FUSED_CASES = {
    "fused_bf16_bf16": dict(dtype="bfloat16", wdtype="bfloat16"),
    "fused_f16_f16": dict(dtype="float16", wdtype="float16", ids_bytes=8),
    "fused_f16_int8_map": dict(dtype="float16", wdtype="int8", has_map=1, ids_bytes=8),
    "fused_bf16_int8": dict(dtype="bfloat16", wdtype="int8"),
    "fused_bf16_many_tiles": dict(dtype="bfloat16", row_tiles=48),
    "fused_t1_e1_h1_i1": dict(dtype="bfloat16", row_tiles=1, tiles_used=1),
    "fused_one_expert_t67": dict(dtype="bfloat16", row_tiles=6, tiles_used=3),
}
ROUTE_W_TOL = 1e-5
H_TOL = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -10}  # the rounding of h to the 16-bit dtype
ROWS_TOL = 1e-5                                        # fp32 accumulation of the down GEMM
OUT_TOL = 1e-2                                         # the contract for 16-bit inputs
SELF_TEST_MUTATIONS = {"gemm_b_ldmatrix": "fused_bf16_bf16", "align_rank": "align_i32_skew_3chunks"}


def _compile(out: Path, gen_dir: Path, flags: list[str]) -> None:
    cmd = [GXX, *BASE_FLAGS, *flags, f"-I{gen_dir}", f"-I{EMU}", f"-I{CSRC}", f"-I{CUDA_INC}",
           str(EMU / "test_moe.cpp"), "-o", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    if p.returncode != 0:
        raise AssertionError(f"compiling the emulation failed:\n{' '.join(cmd)}\n{p.stderr[-6000:]}")


def _run(binary: Path, *args: str, env_extra: dict | None = None) -> tuple[dict[str, dict], str]:
    env = {**os.environ, **(env_extra or {})}
    p = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    results = {}
    for line in p.stdout.splitlines():
        if line.startswith("EMU_RESULT "):
            r = json.loads(line[len("EMU_RESULT "):])
            results[r["name"]] = r
    if p.returncode != 0 or "EMU_DONE" not in p.stdout:
        raise AssertionError(f"{binary.name} {' '.join(args)} exited with {p.returncode} (sanitizer report or "
                             f"crash?)\nstdout tail:\n{p.stdout[-3000:]}\nstderr tail:\n{p.stderr[-6000:]}")
    return results, p.stderr


@pytest.fixture(scope="session")
def emu_bins(tmp_path_factory) -> dict[str, Path]:
    """The ASan+UBSan driver on the current kernels, and one plain build per self-test mutation."""
    d = tmp_path_factory.mktemp("cuda_emulation_moe")
    jobs = {"main": (d / "gen", MUTATION, SAN_FLAGS)}
    for name in SELF_TEST_MUTATIONS:
        jobs[name] = (d / f"gen_{name}", name, [])
    for gen_dir, mutation, _ in jobs.values():
        gen_moe.generate(gen_dir, CSRC, mutation)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
        futures = [ex.submit(_compile, d / name, gen_dir, flags) for name, (gen_dir, _, flags) in jobs.items()]
        for f in futures:
            f.result()
    return {name: d / name for name in jobs}


@pytest.fixture(scope="session")
def emu_results(emu_bins) -> dict[str, dict]:
    results, stderr = _run(emu_bins["main"], env_extra=SAN_ENV)
    assert "runtime error" not in stderr, f"UBSan report:\n{stderr[-6000:]}"
    return results


def _expect(r: dict, expected: dict) -> None:
    for key, want in expected.items():
        assert r[key] == want, f"{r['name']}: {key} = {r[key]!r}, the case is meant to have {want!r}"


def _zero(r: dict, keys: dict) -> None:
    for key, what in keys.items():
        assert r[key] == 0, f"{r['name']}: {r[key]} {what}"


def check_route(r: dict) -> None:
    _zero(r, {"id_mismatch": "expert ids differ from the stable-sort reference",
              "bad_row_errors": "rows without a softmax not given ids 0..k-1 and NaN weights",
              "unwritten": "outputs never written", "nonfinite": "non-finite weights of valid rows"})
    assert r["w_rel"] <= ROUTE_W_TOL, f"{r['name']}: weight rel err {r['w_rel']:.3e} > {ROUTE_W_TOL:g}"


def check_align(r: dict) -> None:
    _zero(r, {"sorted_mismatch": "sorted_ids entries differ from the definition",
              "tile_mismatch": "block_expert entries differ from the definition"})


def check_combine(r: dict) -> None:
    _zero(r, {"mismatch": "outputs not bitwise equal to the slot-order fp32 sum",
              "stray_writes": "writes past hidden"})


def check_fused(r: dict) -> None:
    name, dt = r["name"], r["dtype"]
    _zero(r, {"align_mismatch": "alignment entries differ from the definition",
              "h_nonfinite": "non-finite h of placed entries", "h_stray": "h elements written outside placed rows",
              "rows_nonfinite": "non-finite rows of placed entries", "rows_stray": "rows written for unplaced entries",
              "out_nonfinite": "non-finite outputs of valid tokens",
              "nan_rows_bad": "outputs of tokens with an invalid id that are not NaN",
              "out_stray": "writes past hidden", "undrained": "threads left with cp.async copies pending"})
    assert r["mma_calls"] > 0, f"{name}: the emulated mma.sync was never called"
    assert r["h_rel"] <= H_TOL[dt], f"{name}: h rel err {r['h_rel']:.3e} > {H_TOL[dt]:g}"
    assert r["rows_rel"] <= ROWS_TOL, f"{name}: down-GEMM rows rel err {r['rows_rel']:.3e} > {ROWS_TOL:g}"
    assert r["out_rel"] <= OUT_TOL, f"{name}: output rel err {r['out_rel']:.3e} > {OUT_TOL:g}"


CHECKS = {"route": check_route, "align": check_align, "combine": check_combine, "fused": check_fused}
ALL_CASES = {**ROUTE_CASES, **ALIGN_CASES, **COMBINE_CASES, **FUSED_CASES}


@pytest.mark.parametrize("case", list(ALL_CASES))
def test_moe_emulated(emu_results, case):
    r = emu_results.get(case)
    assert r is not None, f"case {case} produced no EMU_RESULT line"
    _expect(r, ALL_CASES[case])
    CHECKS[r["kernel"]](r)


def test_cases_and_coverage(emu_results):
    assert set(emu_results) == set(ALL_CASES), "update the *_CASES tables with test_moe.cpp"
    route = [r for r in emu_results.values() if r["kernel"] == "route"]
    assert {r["vpl"] for r in route} == {1, 2, 4, 8, 32}, "every routing instantiation must run"
    assert {r["dtype"] for r in route} == {"float32", "bfloat16", "float16"}
    fused = [r for r in emu_results.values() if r["kernel"] == "fused"]
    assert {(r["dtype"], r["wdtype"] == "int8") for r in fused} == \
        {(d, q) for d in ("bfloat16", "float16") for q in (False, True)}, "every GEMM instantiation must run"
    assert any(r["invalid_tokens"] and r["nonlocal_slots"] for r in fused)
    aligns = [r for r in emu_results.values() if r["kernel"] == "align"]
    assert any(r["invalid"] for r in aligns) and any(r["nonlocal"] for r in aligns)


@pytest.mark.parametrize("mutation", list(SELF_TEST_MUTATIONS))
def test_harness_catches_injected_bug(emu_bins, mutation):
    """The checks above must fail on kernels with a deliberate bug."""
    case = SELF_TEST_MUTATIONS[mutation]
    results, _ = _run(emu_bins[mutation], case)
    r = results[case]
    with pytest.raises(AssertionError):
        CHECKS[r["kernel"]](r)


def test_generator_fails_loudly_when_kernels_change(tmp_path):
    src = tmp_path / "csrc"
    shutil.copytree(CSRC / "moe", src / "moe")
    common = src / "moe" / "moe_common.cuh"
    text = common.read_text()
    needle = "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"
    assert needle in text, f"update this test: {needle!r} is no longer in {common.name}"
    common.write_text(text.replace(needle, needle.replace("m16n8k16", "m16n8k8")))
    with pytest.raises(gen_moe.GeneratorError, match="mma_bf16_16816.*no longer"):
        gen_moe.generate(tmp_path / "out", src)
    common.write_text(text + "\n__device__ inline void f() { asm volatile(\"membar.gl;\"); }\n")
    with pytest.raises(gen_moe.GeneratorError, match="inline asm left"):
        gen_moe.generate(tmp_path / "out", src)
    common.write_text(text)
    gemm = src / "moe" / "moe_gemm.cu"
    gemm.write_text(gemm.read_text().replace(gen_moe.HOST_MARKER, "// host code"))
    with pytest.raises(gen_moe.GeneratorError, match="host code"):
        gen_moe.generate(tmp_path / "out", src)


HOST_C = r"""
/* Plain C (no C++, no torch): moe.h must be usable from any engine. Every call below has an
 * argument the kernels cannot handle and must be refused with cudaErrorInvalidValue before any
 * launch (the pointers are never dereferenced: no GPU is needed). */
#include <stdio.h>
#include "moe/moe.h"

#define P(a) ((void*)(uintptr_t)(a))
static int fails = 0;
static void expect_invalid(const char* what, cudaError_t e) {
    if (e != cudaErrorInvalidValue) { printf("not refused: %s (got %d)\n", what, (int)e); ++fails; }
}
/* T tokens, k = 2, E = 4, hidden = 64, I = 32, bf16 weights; the arguments a caller can get right. */
static cudaError_t moe(int64_t T, int64_t stride_xt, int64_t stride_ot, uintptr_t topk_w, uintptr_t ids,
                       uintptr_t out, int64_t E, size_t ws_bytes) {
    return mm1_fused_moe(MM1_DTYPE_BFLOAT16, 0, P(0x10000), stride_xt, P(0x20000), 64 * 64, 64, P(0x30000),
                         64 * 32, 32, NULL, 0, 0, NULL, 0, 0, (const float*)P(topk_w), P(ids), 8, NULL, 4, 0,
                         P(out), stride_ot, T, 2, E, 64, 32, P(0x40000), ws_bytes, 0);
}

int main(void) {
    const size_t ws = mm1_fused_moe_workspace_size(MM1_DTYPE_BFLOAT16, 3, 2, 4, 64, 32);
    if (ws == 0 || mm1_fused_moe_workspace_size(MM1_DTYPE_BFLOAT16, 0, 2, 4, 64, 32) != 0) {
        printf("workspace size\n");
        return 1;
    }
    if (moe(0, 64, 64, 0x50000, 0x60000, 0x70000, 4, 0) != cudaSuccess) { printf("T = 0\n"); return 1; }
    expect_invalid("out rows overlap (stride_ot < hidden)", moe(3, 64, 32, 0x50000, 0x60000, 0x70000, 4, ws));
    expect_invalid("x rows not 16-byte apart", moe(3, 68, 64, 0x50000, 0x60000, 0x70000, 4, ws));
    expect_invalid("topk_weights not 4-byte aligned", moe(3, 64, 64, 0x50002, 0x60000, 0x70000, 4, ws));
    expect_invalid("int64 topk_ids not 8-byte aligned", moe(3, 64, 64, 0x50000, 0x60004, 0x70000, 4, ws));
    expect_invalid("out not 2-byte aligned", moe(3, 64, 64, 0x50000, 0x60000, 0x70001, 4, ws));
    expect_invalid("workspace too small", moe(3, 64, 64, 0x50000, 0x60000, 0x70000, 4, ws - 1));
    expect_invalid("more than MM1_MOE_MAX_EXPERTS experts", moe(3, 64, 64, 0x50000, 0x60000, 0x70000,
                                                               MM1_MOE_MAX_EXPERTS + 1, ws));
    /* top_k * T overflows int64: refused before the product is formed. */
    expect_invalid("top_k * T overflow",
                   mm1_fused_moe(MM1_DTYPE_BFLOAT16, 0, P(0x10000), 64, P(0x20000), 64 * 64, 64, P(0x30000),
                                 64 * 32, 32, NULL, 0, 0, NULL, 0, 0, (const float*)P(0x50000), P(0x60000), 8,
                                 NULL, 4, 0, P(0x70000), 64, (int64_t)1 << 30, (int64_t)1 << 40, 4, 64, 32,
                                 P(0x40000), ws, 0));
    expect_invalid("fp32 logits not 4-byte aligned",
                   mm1_moe_route(MM1_DTYPE_FLOAT32, P(0x10002), 3, 8, 8, 2, 1, (float*)P(0x20000),
                                 (int32_t*)P(0x30000), 0));
    expect_invalid("top_k > E", mm1_moe_route(MM1_DTYPE_FLOAT32, P(0x10000), 3, 8, 8, 9, 1, (float*)P(0x20000),
                                              (int32_t*)P(0x30000), 0));
    return fails ? 1 : 0;
}
"""


def test_c_api_refuses_what_the_kernels_cannot_handle(tmp_path):
    """moe.h is plain C, links against the MoE objects and the CUDA runtime alone, and refuses
    bad arguments (overlapping output rows, misaligned pointers, a short workspace, too many
    experts, an overflowing T·k) with cudaErrorInvalidValue before launching anything."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    run_c_api_program(nvcc, CSRC, sorted((CSRC / "moe").glob("*.cu")), HOST_C, tmp_path, TIMEOUT)


@pytest.mark.slow
@pytest.mark.skipif(not RUN_TSAN, reason="ThreadSanitizer run disabled by MM1_EMU_TSAN=0")
def test_tsan_no_shared_memory_races(tmp_path):
    """TSAN_CASES under ThreadSanitizer (the ASan build cannot see a missing barrier whose
    victims happen to be scheduled late); the GEMM without its main-loop barrier must be
    reported as a race. What it cannot see: a copy issued into a stage other warps may still be
    reading, when a barrier still separates it from the wait (cp.async lands at the wait here:
    the latest a GPU may land it), e.g. the next stage's copies issued before the barrier."""
    for name, mutation in (("tsan", None), ("tsan_race", "gemm_drop_barrier")):
        gen_moe.generate(tmp_path / f"gen_{name}", CSRC, mutation)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
        for f in [ex.submit(_compile, tmp_path / name, tmp_path / f"gen_{name}", TSAN_FLAGS)
                  for name in ("tsan", "tsan_race")]:
            f.result()
    for case in TSAN_CASES:
        try:
            results, stderr = _run(tmp_path / "tsan", case, env_extra=TSAN_ENV)
        except AssertionError as e:  # an environment TSan cannot run in is not a kernel bug
            if "FATAL: ThreadSanitizer" in str(e) and "data race" not in str(e):
                pytest.skip(f"ThreadSanitizer cannot run here: {str(e)[-500:]}")
            raise
        assert "ThreadSanitizer" not in stderr, stderr[-6000:]
        CHECKS[results[case]["kernel"]](results[case])
    with pytest.raises(AssertionError, match="ThreadSanitizer: data race"):
        _run(tmp_path / "tsan_race", "fused_bf16_int8", env_extra=TSAN_ENV)

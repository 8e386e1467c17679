"""CPU emulation of the CUDA head kernels (csrc/head/; no GPU, only g++ and the CUDA headers).

At test time ``tests/cuda_emulation/gen_head.py`` copies ``head_stats_kernel``,
``head_merge_kernel`` and ``head_dlogits_kernel`` (and ``head_common.cuh``) out of the CURRENT
sources; only the two inline-asm bodies (``mma.sync.m16n8k16`` with bf16 / fp16 operands) become
calls into an emulation written from the PTX ISA fragment layouts
(``emu_mma_m16n8k16`` in ``tests/cuda_emulation/emu_runtime.h``). The driver ``test_head.cpp`` is built with
``g++ -O1 -fsanitize=address,undefined``; one CTA runs as 256 host threads (barriers stand in for
``__syncthreads``, ``mma.sync`` and ``__shfl_xor_sync``, see ``emu_runtime.h``). Every case prints
an ``EMU_RESULT {json}`` line and the thresholds are asserted here.

What it catches:
- wrong fragment indices, tile masks, the K tail, split bounds, the online max/Σexp rescaling,
  the lane / column-half / split merges, the target lookup, temperature, the fp32 operand split:
  logprob, lse and entropy vs fp64 (<= 1e-5, normalized by max(1, |ref|): the fp32 contract),
  stored logits (<= 1e-6 of max |z|) and the backward's logit gradient (<= max(1e-5,
  4 eps32 max|z|) of max |dz|),
  for bf16, fp16 and fp32, both staging paths (16-byte and element-wise: K not a multiple of 8,
  misaligned pointers), 1-3 splits (the split size is an argument; the tests use 128-256 ids so
  that small vocabularies have several splits and a partial last one), 1-2 token tiles, int32
  and int64 targets, ignored rows (-100), temperatures != 1 and logits ~ 100 with a massive
  hidden channel;
- batch invariance and run-to-run determinism: a 3-row batch gives bitwise the results of the
  same rows inside the 66/70-row batch, and a second run is bitwise equal;
- unwritten outputs (NaN-filled), stray writes (padding columns of the logits / dz rows must stay
  NaN), reads of never-written shared memory (NaN-filled before every block);
- out-of-bounds accesses and undefined behaviour (ASan/UBSan on exact-size host buffers);
- the harness itself: three mutations (``gen_head.MUTATIONS``) must fail the checks here, and
  ``MM1_HEAD_EMU_MUTATION=<name>`` runs the whole module on mutated kernels;
- shared-memory races (slow): two cases under ThreadSanitizer, which must also report the race
  of the mutation ``drop_tile_barrier``.

What it cannot catch: real tensor-core rounding and accumulation order (the emulation sums each
MMA in double), ``--use_fast_math`` codegen (expf, logf), performance, the launch configuration
and the C API's argument checks (host code is not emulated; ``test_c_api_header_is_torch_free_c``
links and calls it with zero sizes).
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

_spec = importlib.util.spec_from_file_location("mm1_cuda_emulation_gen_head", EMU / "gen_head.py")
gen_head = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_head)


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
             str(Path(nvcc).resolve().parent.parent) if nvcc else None]
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

BASE_FLAGS = ["-std=c++20", "-Wno-attributes", "-pthread"]
SAN_FLAGS = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
SAN_ENV = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
TSAN_FLAGS = ["-O1", "-g", "-fsanitize=thread"]
TSAN_ENV = {"TSAN_OPTIONS": "halt_on_error=1:report_signal_unsafe=0"}
# ThreadSanitizer runs these cases (3 splits with stored logits and an fp32 element-path case).
TSAN_CASES = ["f16_t20_v513_k40_misaligned", "f32_t5_v200_k37_scalar"]
MUTATION = os.environ.get("MM1_HEAD_EMU_MUTATION") or None
TIMEOUT = 600

# Expected cases and the coverage each must report (guards against a case silently changing).
CASES = {
    "bf16_t70_v300_k48_vec": dict(dtype="bfloat16", vec=1, nsplit=2, token_tiles=2, index_bytes=8,
                                  store_logits=1, batch_variant=0, nondeterministic=0),
    "bf16_t9_v520_k45_scalar_temp": dict(dtype="bfloat16", vec=0, nsplit=3, index_bytes=4, temperature=0.7),
    "f16_t20_v513_k40_misaligned": dict(dtype="float16", vec=0, nsplit=3, store_logits=1, temperature=1.3),
    "f32_t66_v260_k40_split3": dict(dtype="float32", vec=1, nsplit=3, token_tiles=2, store_logits=1),
    "f32_t5_v200_k37_scalar": dict(dtype="float32", vec=0, nsplit=2, index_bytes=4, temperature=2.5),
    "bf16_t2_v2049_k8_split2048": dict(dtype="bfloat16", vec=1, nsplit=2, T=2, V=2049, index_bytes=4),
}
STATS_TOL = 1e-5   # logprob, lse, entropy: |err| / max(1, |ref|)
LOGITS_TOL = 1e-6  # stored logits: max |err| / max(1, max |z|)
# logit gradient: max |err| / max |dz| <= max(DZ_TOL, 4 fp32 eps × max |z|): the fp32 logit and
# z - lse carry half an ulp of |z| each, which moves p = exp(z - lse) by that relative amount
# (at |z| ~ 100 that alone is up to ~1.5e-5, for any fp32 head).
DZ_TOL = 1e-5
# Mutations the module requires to fail, each on the case that exercises it.
SELF_TEST_MUTATIONS = {
    "b_fragment": ("bf16_t70_v300_k48_vec", "lp_err"),
    "drop_split_term": ("f32_t66_v260_k40_split3", "lp_err|lse_err|logits_err"),
    "merge_skip_last_split": ("f16_t20_v513_k40_misaligned", "lp_err|lse_err"),
}


def _compile(out: Path, gen_dir: Path, flags: list[str]) -> None:
    cmd = [GXX, *BASE_FLAGS, *flags, f"-I{gen_dir}", f"-I{EMU}", f"-I{CSRC}", f"-I{CUDA_INC}",
           str(EMU / "test_head.cpp"), "-o", str(out)]
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


@pytest.fixture(scope="module")
def emu_bins(tmp_path_factory) -> dict[str, Path]:
    """The ASan+UBSan build of the current kernels and one -O1 build per self-test mutation."""
    d = tmp_path_factory.mktemp("cuda_emulation_head")
    gen_head.generate(d / "gen", CSRC, MUTATION)
    jobs = {"san": ("gen", SAN_FLAGS)}
    for name in SELF_TEST_MUTATIONS:
        gen_head.generate(d / f"gen_{name}", CSRC, name)
        jobs[name] = (f"gen_{name}", ["-O1"])
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
        futures = [ex.submit(_compile, d / name, d / gdir, flags) for name, (gdir, flags) in jobs.items()]
        for f in futures:
            f.result()
    return {name: d / name for name in jobs} | {"dir": d}


@pytest.fixture(scope="module")
def emu_results(emu_bins) -> dict[str, dict]:
    results, stderr = _run(emu_bins["san"], env_extra=SAN_ENV)
    assert "runtime error" not in stderr, f"UBSan report:\n{stderr[-6000:]}"
    return results


def check_case(r: dict) -> None:
    name = r["name"]
    for key, what in [("nonfinite", "non-finite outputs (unwritten, or a read of NaN-poisoned smem)"),
                      ("stray_writes", "writes to the padding columns of logits / dz"),
                      ("ignored_lp_not_zero", "ignored rows (-100) with a logprob other than 0")]:
        assert r[key] == 0, f"{name}: {r[key]} {what}"
    for key in ("lp_err", "lse_err", "ent_err"):
        assert r[key] <= STATS_TOL, f"{name}: {key} {r[key]:.3e} > {STATS_TOL:g}"
    assert r["logits_err"] <= LOGITS_TOL, f"{name}: logits_err {r['logits_err']:.3e} > {LOGITS_TOL:g}"
    dz_tol = max(DZ_TOL, 4 * 2.0**-24 * r["zmax"])
    assert r["dz_err"] <= dz_tol, f"{name}: dz_err {r['dz_err']:.3e} > {dz_tol:.3g}"
    assert r["mma_fwd_warp0"] > 0 and r["mma_bwd_warp0"] > 0, f"{name}: the emulated mma.sync was never called"
    if r["batch_variant"] >= 0:
        assert r["batch_variant"] == 0, f"{name}: {r['batch_variant']} rows differ between a 3-row and the full batch"
        assert r["nondeterministic"] == 0, f"{name}: {r['nondeterministic']} rows differ between two runs"


@pytest.mark.parametrize("case", list(CASES))
def test_head_emulated(emu_results, case):
    r = emu_results.get(case)
    assert r is not None, f"case {case} produced no EMU_RESULT line"
    for key, want in CASES[case].items():
        assert r[key] == want, f"{case}: {key} = {r[key]!r}, the case is meant to have {want!r}"
    assert r["dz_rows"] > 0 and r["dz_cols"] > 0
    check_case(r)


def test_cases_and_coverage(emu_results):
    assert set(emu_results) == set(CASES), "update CASES with test_head.cpp"
    rs = list(emu_results.values())
    assert {r["dtype"] for r in rs} == {"float32", "float16", "bfloat16"}
    assert {r["vec"] for r in rs} == {0, 1} and {r["index_bytes"] for r in rs} == {4, 8}
    assert max(r["zmax"] for r in rs) >= 50, "no case has logits of the size where fp32 accuracy matters"


@pytest.mark.parametrize("mutation", list(SELF_TEST_MUTATIONS))
def test_harness_catches_injected_bugs(emu_bins, mutation):
    case, match = SELF_TEST_MUTATIONS[mutation]
    results, _ = _run(emu_bins[mutation], case)
    with pytest.raises(AssertionError, match=match):
        check_case(results[case])


def test_generator_fails_loudly_when_the_kernels_change(tmp_path):
    src = tmp_path / "csrc"
    shutil.copytree(CSRC / "head", src / "head")
    common = src / "head" / "head_common.cuh"
    text = common.read_text()
    needle = "m16n8k16.row.col.f32.bf16.bf16.f32"
    assert needle in text, f"update this test: {needle!r} is no longer in {common.name}"
    common.write_text(text.replace(needle, "m16n8k8.row.col.f32.bf16.bf16.f32"))
    with pytest.raises(gen_head.GeneratorError, match="mma_bf16.*no longer"):
        gen_head.generate(tmp_path / "out", src)
    common.write_text(text + "\n__device__ inline void f() { asm volatile(\"membar.gl;\"); }\n")
    with pytest.raises(gen_head.GeneratorError, match="inline asm left"):
        gen_head.generate(tmp_path / "out", src)
    common.write_text(text)
    fwd = src / "head" / "head_forward.cu"
    fwd.write_text(fwd.read_text().replace(gen_head.HOST_MARKER, "// host code"))
    with pytest.raises(gen_head.GeneratorError, match="marker"):
        gen_head.generate(tmp_path / "out", src)


HOST_C = r"""
/* Plain C (no C++, no torch): the head's C API must be usable from any engine. */
#include <stdio.h>
#include "head/head.h"

int main(void) {
    /* Zero-sized calls launch nothing and need no GPU; bad arguments are refused before any. */
    cudaError_t a = mm1_head_forward(MM1_DTYPE_BFLOAT16, 0, 0, 0, 8, 0, 0, 0, 0, 0,
                                     0, 200064, 6144, 6144, 6144, 0, 1.0, 0);
    cudaError_t b = mm1_head_dlogits(MM1_DTYPE_FLOAT32, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0,
                                     0, 4096, 0, 6144, 6144, 6144, 4096, 0.7, 0);
    cudaError_t c = mm1_head_forward(MM1_DTYPE_FLOAT16, 0, 0, 0, 2, 0, 0, 0, 0, 0,
                                     1, 10, 16, 16, 16, 0, 1.0, 0);  /* index bytes 2 */
    cudaError_t d = mm1_head_forward(MM1_DTYPE_FLOAT16, 0, 0, 0, 4, 0, 0, 0, 0, 0,
                                     1, 10, 16, 16, 16, 0, 0.0, 0);  /* temperature 0 */
    /* misaligned element pointers (fp32 hidden at +2 bytes; int64 targets at +4): refused */
    float* f = (float*)(size_t)0x20000;
    cudaError_t e = mm1_head_forward(MM1_DTYPE_FLOAT32, (void*)(size_t)0x10002, (void*)(size_t)0x10000,
                                     (void*)(size_t)0x30000, 8, f, f, f, f, 0, 1, 10, 16, 16, 16, 0, 1.0, 0);
    cudaError_t g = mm1_head_dlogits(MM1_DTYPE_BFLOAT16, (void*)(size_t)0x10000, (void*)(size_t)0x10000,
                                     (void*)(size_t)0x30004, 8, f, f, f, f, f, f, 1, 10, 0, 16, 16, 16, 10,
                                     1.0, 0);
    long long n = (long long)mm1_head_num_splits(200064);
    unsigned long long ws = (unsigned long long)mm1_head_workspace_bytes(8192, 200064);
    printf("%d %d %d %d %d %d %lld %llu\n", (int)a, (int)b, (int)c, (int)d, (int)e, (int)g, n, ws);
    return (a == cudaSuccess && b == cudaSuccess && c == cudaErrorInvalidValue && d == cudaErrorInvalidValue &&
            e == cudaErrorInvalidValue && g == cudaErrorInvalidValue && n == 98 && ws == 98ull * 4 * 8192 * 4)
               ? 0 : 1;
}
"""


def test_c_api_header_is_torch_free_c(tmp_path):
    """head.h is plain C; the C API links against the head objects and the CUDA runtime alone;
    bad arguments (including misaligned element pointers) are refused before any launch."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    run_c_api_program(nvcc, CSRC, sorted((CSRC / "head").glob("*.cu")), HOST_C, tmp_path, TIMEOUT)


@pytest.mark.slow
def test_tsan_no_shared_memory_races(emu_bins):
    """TSAN_CASES under ThreadSanitizer; the dropped tile barrier must be reported as a race."""
    d = emu_bins["dir"]
    gen_head.generate(d / "gen_race", CSRC, "drop_tile_barrier")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
        for f in [ex.submit(_compile, d / "tsan", d / "gen", TSAN_FLAGS),
                  ex.submit(_compile, d / "tsan_race", d / "gen_race", TSAN_FLAGS)]:
            f.result()
    for case in TSAN_CASES:
        try:
            results, stderr = _run(d / "tsan", case, env_extra=TSAN_ENV)
        except AssertionError as e:  # an environment TSan cannot run in is not a kernel bug
            if "FATAL: ThreadSanitizer" in str(e) and "data race" not in str(e):
                pytest.skip(f"ThreadSanitizer cannot run here: {str(e)[-500:]}")
            raise
        assert "ThreadSanitizer" not in stderr, stderr[-6000:]
        check_case(results[case])
    with pytest.raises(AssertionError, match="ThreadSanitizer: data race"):
        _run(d / "tsan_race", "f32_t5_v200_k37_scalar", env_extra=TSAN_ENV)

"""CPU emulation of the CUDA lightning kernels (no GPU, only g++ and the CUDA headers).

At test time ``tests/cuda_emulation/gen.py`` copies ``lightning_prefill_kernel`` (fp32/fp16,
TF32), ``lightning_prefill_bf16_kernel`` (bf16) and ``lightning_decode_kernel`` out of the CURRENT
``csrc/lightning/`` sources. Only the inline-asm bodies change (``cvt.rna.tf32.f32``,
``mma.sync`` m16n8k8 .tf32 and m16n8k16 .bf16, ``ldmatrix`` .x4 and .x4.trans, ``cp.async``
16-byte copies with commit/wait), to calls into an emulation written from the PTX ISA fragment
layouts (``tests/cuda_emulation/emu_runtime.h``). If those asm bodies, the kernel names or the
shared-memory declarations are not found as expected, generation fails with a message naming
what to update; stale code is never tested silently.
The test drivers (``test_prefill.cpp``, ``test_decode.cpp``) are built with
``g++ -O2 -fsanitize=address,undefined``. One CTA runs as 256 host threads, with barriers
standing in for ``__syncthreads``, ``mma.sync``, ``ldmatrix`` and ``__shfl_xor_sync``.
``cp.async`` copies are deferred to the ``cp.async.wait_group`` that covers them, so a missing or
too shallow wait leaves NaN poison or a stale tile in shared memory. ``ldmatrix`` and ``cp.async``
addresses must be 16-byte aligned and inside the dynamic shared memory (abort otherwise). Every
case prints an ``EMU_RESULT {json}`` line, and the thresholds are asserted here.

What it catches:
- wrong fragment/tile indices, masks, decay exponents, strides or offsets: outputs and states
  are compared with an fp64 recurrence. Limits: fp32 o and states <= 1e-5 relative. bf16/fp16 o
  <= 1e-2 and <= 2x the error of rounding the exact o to the dtype once (the naive error; the
  bf16 kernel rounds the state and the decayed scores to bf16 once, Triton's "default").
  Prefill final states <= 1e-5 for every dtype (the fp32-state contract: the kernels split the
  decayed keys of the state update into hi + lo, TF32 or bf16); decode states stay fp32
  throughout, so <= 1e-5 there too.
- reads of shared memory that was never written: dynamic and static smem are NaN-filled before
  every block, so such a read makes the result non-finite.
- missing or stray global writes: o starts as NaN in prefill, and a sentinel in decode so that
  the NaN of a bad slot must really be written. Every o row is padded past DV. Tokens outside
  every varlen sequence must stay unwritten. Decode slot semantics: a negative slot gives 0, an
  out-of-range slot gives NaN (2^33 as int64 included), and unowned slots stay bit-identical.
- out-of-bounds accesses to global and shared memory (host buffers of exact size) and undefined
  behaviour (ASan/UBSan).
- a change of the asm contract: the instruction strings must match what the emulation
  implements, or generation fails.
- shared-memory races between barriers: every decode case and three multi-chunk prefill cases
  also run under ThreadSanitizer (about 20 s more; ``MM1_EMU_TSAN=0`` skips it), and
  ``test_tsan_catches_injected_missing_barrier`` requires TSan to report a race when the
  end-of-chunk ``__syncthreads`` is dropped (mutation ``drop_state_barrier``).
- the harness itself: ``test_harness_catches_injected_fragment_bug`` builds the prefill with a
  wrong B-fragment index (``gen.py --mutation pv_b_fragment``) and requires the checks to fail;
  ``test_harness_catches_bf16_kernel_bugs`` does the same for the bf16 kernel: a wrong ldmatrix
  row address, a dropped or too shallow ``cp.async.wait_group``, and the decayed-key pair
  reduced to one bf16 product; ``test_harness_catches_split_bugs`` for the segment split (the
  scan's decay power λ^(L-1), incoming states off by one segment, a final state written by a
  non-last segment, a table without the last partial segment); ``bf16_high_drop_lo`` for
  precision "high" (a lo product of Q S dropped).
- the segment split (``*_split*`` cases: the table kernel, the local pass, the scan and the output
  pass, run as the C API launches them, CTAs of a pass last row first): vs fp64 as above, and vs
  the unsplit pass (o within the dtype's rounding, final states 1e-5).
- precision "high" (``*_high*`` cases): per element, o's error beyond one bf16 spacing and the
  final state's error stay under ``SPLIT_BOUND`` × the magnitude of the terms, and o's is at most
  the "default" run's.
  ``MM1_EMU_MUTATION=<name>`` runs the whole module on mutated kernels (see ``gen.MUTATIONS``).

What it cannot catch: real tensor-core rounding and the fp32 accumulation order (the emulation
accumulates each MMA in double, so an error that only fp32 accumulation would expose is
invisible), timing and performance, and the real GPU memory model: warp execution and
independent thread scheduling beyond the modelled collectives, ``ld/st.global.cs`` cache
behaviour, bank conflicts (the ldmatrix padding is only asserted statically), and cp.async
timing: the emulated copies land exactly at the wait, so a copy racing with a read from another
thread between a wait and the missing barrier after it is seen only by TSan. It does not check register or
shared-memory limits or the launch configuration (the host launch code and the C API are not
emulated, and the grids are enumerated here), nor nvcc codegen (``--use_fast_math``). Races
that TSan misses because the host threads happened to run in a benign order are missed too.
To run a driver by hand::

    python tests/cuda_emulation/gen.py /tmp/emu && cd tests/cuda_emulation && \\
    g++ -std=c++20 -O1 -g -fsanitize=thread -Wno-attributes -I/tmp/emu -I. -I../../csrc \\
        -I/usr/local/cuda/include test_prefill.cpp -o /tmp/emu/prefill_tsan -pthread && \\
    /tmp/emu/prefill_tsan f32_d37_dv29_scalar     # or no argument: every case

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

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emulation"
CSRC = ROOT / "csrc"
GXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")

_spec = importlib.util.spec_from_file_location("mm1_cuda_emulation_gen", EMU / "gen.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)


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

BASE_FLAGS = ["-std=c++20", "-Wno-attributes", "-pthread"]
SAN_FLAGS = ["-O2", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
SAN_ENV = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"}
MUTATION = os.environ.get("MM1_EMU_MUTATION") or None
TIMEOUT = 600

# Expected cases and the coverage each must report (guards against a case silently changing).
PREFILL_CASES = {
    "f32_d128_t150_fused": dict(dtype="float32", dmax=128, vec4=1, chunks=3, num_seqs=2, has_init=1, has_final=1),
    "f32_d80_dv48_separate": dict(dtype="float32", vec4=1, chunks=2),
    "f32_d37_dv29_scalar": dict(dtype="float32", vec4=0, chunks=2),
    "f32_varlen_cu64_empty_len1": dict(dtype="float32", varlen=1, cu_bytes=8, seqs_empty=2, seqs_len1=1),
    "f32_varlen_cu32_clamp_h2": dict(dtype="float32", varlen=1, cu_bytes=4, seqs_empty=1),
    "f32_d192_dv40_dmax256": dict(dtype="float32", dmax=256, chunks=2),
    "f32_t0_init_to_final": dict(dtype="float32", chunks=0, has_init=1, has_final=1),
    "bf16_d128_t130_fused": dict(dtype="bfloat16", dmax=128, bf16_kernel=1, async16=1, chunks=3),
    "f16_d24_dv132_cu32": dict(dtype="float16", varlen=1, cu_bytes=4, seqs_len1=1, has_init=0),
    "f16_d250_dv10_noinit_nofinal": dict(dtype="float16", dmax=256, vec4=0, has_init=0, has_final=0),
    "bf16_d200_dv36_dmax256_cu64": dict(dtype="bfloat16", dmax=256, bf16_kernel=1, async16=0, varlen=1, cu_bytes=8,
                                        seqs_len1=1),
    "bf16_d72_dv40_async_cu32_h2": dict(dtype="bfloat16", dmax=128, bf16_kernel=1, async16=1, varlen=1, cu_bytes=4,
                                        seqs_empty=1, seqs_len1=1, chunks=3),
    "bf16_d256_dv64_async_dmax256": dict(dtype="bfloat16", dmax=256, bf16_kernel=1, async16=1, chunks=4, has_init=0),
    # The segment split (table kernel, local pass, scan, output pass; segment_len > 0).
    "bf16_split64_varlen_cu32_h2": dict(dtype="bfloat16", bf16_kernel=1, async16=1, varlen=1, cu_bytes=4,
                                        seqs_empty=1, seqs_len1=1, has_init=1, segment_len=64, table_rows=9,
                                        segments=8),
    "bf16_split128_b2_d128_fused_high": dict(dtype="bfloat16", bf16_kernel=1, async16=1, varlen=0, num_seqs=2,
                                             has_init=0, segment_len=128, table_rows=6, segments=4, high=1),
    "f32_split64_cu64_d32": dict(dtype="float32", bf16_kernel=0, varlen=1, cu_bytes=8, seqs_empty=1, has_init=1,
                                 segment_len=64, table_rows=7, segments=6),
    # precision "high" (bf16 pairs for the state in Q S and the decayed scores in P V).
    "bf16_high_d64_t192_h2_init": dict(dtype="bfloat16", bf16_kernel=1, high=1, has_init=1, segment_len=0),
}
DECODE_CASES = {
    "f32_vec4_tpr32_i64": dict(dtype="float32", vec=4, tpr=32, slot_bytes=8, pad_rows=1, oob_rows=2, fused=1),
    "f32_vec4_tpr16_i64": dict(dtype="float32", vec=4, tpr=16, slot_bytes=8, pad_rows=1, oob_rows=2),
    "bf16_vec4_tpr8_i32": dict(dtype="bfloat16", vec=4, tpr=8, slot_bytes=4, pad_rows=1),
    "f16_vec4_tpr4_noslots": dict(dtype="float16", vec=4, tpr=4, pad_rows=0, oob_rows=0),
    "f32_vec1_tpr32_i32_oob": dict(dtype="float32", vec=1, tpr=32, slot_bytes=4, pad_rows=1, oob_rows=1),
    "f32_vec1_tpr16_i32": dict(dtype="float32", vec=1, tpr=16),
    "f16_vec1_tpr8_noslots": dict(dtype="float16", vec=1, tpr=8),
    "bf16_vec1_tpr4_i64_oob": dict(dtype="bfloat16", vec=1, tpr=4, slot_bytes=8, pad_rows=1, oob_rows=1),
    "f16_vec4_tpr32_i64": dict(dtype="float16", vec=4, tpr=32, slot_bytes=8, pad_rows=1, oob_rows=1),
}
O_TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}
# precision "high", per element: o's error beyond one bf16 spacing of the truth, and the final
# state's error, over the magnitude of the terms (tests/test_lightning.py's SPLIT_BOUND, the
# same bound as for the Triton kernel's "high"). Measured: 1.8e-7 on o ("default": 5.0e-4 on the
# same case), 2e-6 on the state; without a lo product 5e-5 … 5e-4.
SPLIT_BOUND = 2.0 ** -15
PREFILL_FINAL_TOL = {"float32": 1e-5, "bfloat16": 1e-5, "float16": 1e-5}
DECODE_STATE_TOL = 1e-5


def _compile(src: str, out: Path, gen_dir: Path, flags: list[str]) -> None:
    cmd = [GXX, *BASE_FLAGS, *flags, f"-I{gen_dir}", f"-I{EMU}", f"-I{CSRC}", f"-I{CUDA_INC}",
           str(EMU / src), "-o", str(out)]
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


# bf16-kernel mutations (gen.MUTATIONS) -> (case they run on, the check that must fail).
BF16_MUTATIONS = {
    "bf16_ldsm_address": ("bf16_d72_dv40_async_cu32_h2", "o rel err"),
    "bf16_drop_cp_async_wait": ("bf16_d72_dv40_async_cu32_h2", "non-finite"),
    "bf16_cp_async_wait_depth": ("bf16_d72_dv40_async_cu32_h2", "non-finite|o rel err"),
    "bf16_state_pair_lo": ("bf16_d72_dv40_async_cu32_h2", "final state rel err"),
    "bf16_high_drop_lo": ("bf16_high_d64_t192_h2_init", "o excess"),
    "bf16_full_chunk_key_decay": ("bf16_d128_t130_fused", "final state rel err"),
    "bf16_full_chunk_output_decay": ("bf16_d72_dv40_async_cu32_h2", "o rel err"),
}


# Segment-split mutations (gen.MUTATIONS) -> the check that must fail; each runs on the fp32 split
# case (the table, the scan and the pass bookkeeping are shared by both kernels; fp32's 1e-5
# bound is the tightest). The output pass runs its CTAs last row first, so a final state
# written by a non-last segment is the one left.
SPLIT_CASE = "f32_split64_cu64_d32"
SPLIT_MUTATIONS = {
    "split_scan_decay_power": "o rel err|final state rel err",
    "split_incoming_off_by_one": "o rel err",
    "split_final_from_non_last": "final state rel err",
    "split_table_drops_partial": "non-finite",
}


@pytest.fixture(scope="session")
def emu_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cuda_emulation")
    gen.generate(d / "gen", CSRC, MUTATION)
    gen.generate(d / "gen_mut", CSRC, "pv_b_fragment")
    gen.generate(d / "gen_race", CSRC, "drop_state_barrier")
    for mutation in (*BF16_MUTATIONS, *SPLIT_MUTATIONS):
        gen.generate(d / f"gen_{mutation}", CSRC, mutation)
    return d


TSAN_FLAGS = ["-O1", "-g", "-fsanitize=thread"]
# ThreadSanitizer runs every decode case and the prefill cases below (multi-chunk, both DMAX).
# f32_split64_cu64_d32: the segment split (the table kernel's shared-memory scan, the scan kernel).
TSAN_PREFILL_CASES = ["f32_d37_dv29_scalar", "f32_d80_dv48_separate", "bf16_d200_dv36_dmax256_cu64",
                      "bf16_d72_dv40_async_cu32_h2", "f32_split64_cu64_d32"]
TSAN_ENV = {"TSAN_OPTIONS": "halt_on_error=1:report_signal_unsafe=0"}
RUN_TSAN = os.environ.get("MM1_EMU_TSAN", "1") != "0"


@pytest.fixture(scope="session")
def emu_bins(emu_dir) -> dict[str, Path]:
    """All builds, at most one compile per core: ASan+UBSan -O2 drivers, the mutated prefill
    for the self-test, and the ThreadSanitizer drivers (unless MM1_EMU_TSAN=0)."""
    d = emu_dir
    jobs = {"prefill": ("test_prefill.cpp", "gen", SAN_FLAGS), "decode": ("test_decode.cpp", "gen", SAN_FLAGS),
            "prefill_mut": ("test_prefill.cpp", "gen_mut", ["-O1"])}
    # Builds for one mutation compile only the case they run where the driver allows it.
    only = {**{m: ["-DEMU_ONLY_BF16"] for m in BF16_MUTATIONS}, "bf16_high_drop_lo": ["-DEMU_ONLY_BF16_HIGH"],
            **{m: ["-DEMU_ONLY_F32_SPLIT"] for m in SPLIT_MUTATIONS}}
    jobs.update({f"prefill_{m}": ("test_prefill.cpp", f"gen_{m}", ["-O1", *only.get(m, [])])
                 for m in (*BF16_MUTATIONS, *SPLIT_MUTATIONS)})
    if RUN_TSAN:
        jobs.update(prefill_tsan=("test_prefill.cpp", "gen", TSAN_FLAGS),
                    decode_tsan=("test_decode.cpp", "gen", TSAN_FLAGS),
                    prefill_tsan_race=("test_prefill.cpp", "gen_race", TSAN_FLAGS))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as ex:
        futures = [ex.submit(_compile, src, d / name, d / gdir, flags) for name, (src, gdir, flags) in jobs.items()]
        for f in futures:
            f.result()
    return {name: d / name for name in jobs}


@pytest.fixture(scope="session")
def emu_results(emu_bins) -> dict[str, dict[str, dict]]:
    """Run both ASan+UBSan drivers (all cases) and collect their EMU_RESULT lines."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
        runs = {k: ex.submit(_run, emu_bins[k], env_extra=SAN_ENV) for k in ("prefill", "decode")}
        out = {}
        for k, f in runs.items():
            results, stderr = f.result()
            assert "runtime error" not in stderr, f"UBSan report from {k}:\n{stderr[-6000:]}"
            out[k] = results
    return out


def _expect(r: dict, expected: dict) -> None:
    for key, want in expected.items():
        assert r[key] == want, f"{r['name']}: {key} = {r[key]!r}, the case is meant to have {want!r}"


def check_prefill(r: dict) -> None:
    name, dt = r["name"], r["dtype"]
    assert r["nonfinite"] == 0, (f"{name}: {r['nonfinite']} non-finite o/final values "
                                 "(a read of NaN-poisoned smem, or an unwritten output)")
    assert r["stray_writes"] == 0, f"{name}: {r['stray_writes']} writes to o outside the sequences / past DV"
    assert r["o_rel"] <= O_TOL[dt], f"{name}: o rel err {r['o_rel']:.3e} > {O_TOL[dt]:g}"
    if dt != "float32":
        assert r["o_rel"] <= 2 * r["o_naive_rel"], \
            f"{name}: o rel err {r['o_rel']:.3e} > 2x the naive {dt} error {r['o_naive_rel']:.3e}"
    assert r["final_rel"] <= PREFILL_FINAL_TOL[dt], \
        f"{name}: final state rel err {r['final_rel']:.3e} > {PREFILL_FINAL_TOL[dt]:g}"
    if r["chunks"] > 0:
        assert r["mma_warp0"] > 0, f"{name}: the emulated mma.sync was never called"
    if r["high"]:
        assert r["o_excess"] <= SPLIT_BOUND, \
            f"{name}: \"high\" o excess {r['o_excess']:.3e} x |terms| beyond the bf16 rounding > {SPLIT_BOUND:.1e}"
        assert r["final_excess"] <= SPLIT_BOUND, \
            f"{name}: \"high\" final state excess {r['final_excess']:.3e} x |terms| > {SPLIT_BOUND:.1e}"
        if r["segment_len"] == 0:  # unsplit "high" cases also ran "default"
            assert r["o_excess"] <= r["o_default_excess"], \
                f"{name}: \"high\" o excess {r['o_excess']:.3e} > \"default\"'s {r['o_default_excess']:.3e}"
    if r["segment_len"] > 0:
        # The split changes only fp32 roundings of the states: o as the unsplit pass's within the
        # dtype's own rounding (fp32: 1e-5), the final states within the fp32-state contract.
        split_o_tol = O_TOL[dt] if dt == "float32" else r["o_naive_rel"]
        assert r["split_vs_whole_o_rel"] <= split_o_tol, \
            f"{name}: split vs unsplit o rel diff {r['split_vs_whole_o_rel']:.3e} > {split_o_tol:.3e}"
        assert r["split_vs_whole_final_rel"] <= PREFILL_FINAL_TOL[dt], \
            f"{name}: split vs unsplit final state rel diff {r['split_vs_whole_final_rel']:.3e}"


def check_decode(r: dict) -> None:
    name, dt = r["name"], r["dtype"]
    for key, what in [("valid_nonfinite", "non-finite outputs of valid rows"),
                      ("pad_not_zero", "outputs of padding rows (negative slot) that are not 0"),
                      ("oob_not_nan", "outputs of out-of-range-slot rows that are not NaN"),
                      ("unwritten", "outputs never written"),
                      ("stray_writes", "writes to the o padding past DV"),
                      ("untouched_slots_changed", "state elements changed in slots no valid row owns")]:
        assert r[key] == 0, f"{name}: {r[key]} {what}"
    assert r["o_rel"] <= O_TOL[dt], f"{name}: o rel err {r['o_rel']:.3e} > {O_TOL[dt]:g}"
    assert r["state_rel"] <= DECODE_STATE_TOL, f"{name}: state rel err {r['state_rel']:.3e} > {DECODE_STATE_TOL:g}"


@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_emulated(emu_results, case):
    r = emu_results["prefill"].get(case)
    assert r is not None, f"prefill case {case} produced no EMU_RESULT line"
    _expect(r, PREFILL_CASES[case])
    check_prefill(r)


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_emulated(emu_results, case):
    r = emu_results["decode"].get(case)
    assert r is not None, f"decode case {case} produced no EMU_RESULT line"
    _expect(r, DECODE_CASES[case])
    check_decode(r)


# Cases with a NaN in one token's k (test_prefill.cpp's poison_k): not checked against fp64 (every
# later output is NaN), only for the leak into earlier outputs.
NAN_KEY_CASES = ("bf16_nan_k100_full_chunk", "bf16_nan_k129_partial_chunk")


@pytest.mark.parametrize("case", NAN_KEY_CASES)
def test_prefill_nan_in_later_key_stays_out_of_earlier_outputs(emu_results, case):
    """The bf16 kernel masks above the diagonal with a select: 0 · NaN from a later token's k
    would otherwise poison the earlier rows of its 16x16 diagonal tile (full chunks and the
    partial last chunk take different code)."""
    r = emu_results["prefill"].get(case)
    assert r is not None, f"prefill case {case} produced no EMU_RESULT line"
    assert r["nan_at_poison"] > 0, f"{case}: the poisoned token's output is finite (poison not applied?)"
    assert r["nan_leak"] == 0, f"{case}: {r['nan_leak']} non-finite outputs before the poisoned token"


def test_cases_and_coverage(emu_results):
    assert set(emu_results["prefill"]) == set(PREFILL_CASES) | set(NAN_KEY_CASES), \
        "update PREFILL_CASES with test_prefill.cpp"
    assert set(emu_results["decode"]) == set(DECODE_CASES), "update DECODE_CASES with test_decode.cpp"
    variants = {(r["vec"], r["tpr"]) for r in emu_results["decode"].values()}
    assert variants == {(v, t) for v in (1, 4) for t in (4, 8, 16, 32)}, "every decode instantiation must be run"
    assert {r["dtype"] for r in emu_results["prefill"].values()} == set(O_TOL)
    assert {r["dtype"] for r in emu_results["decode"].values()} == set(O_TOL)


def test_harness_catches_injected_fragment_bug(emu_bins):
    """The checks above must fail on a kernel with one wrong B-fragment index (P·V, b1 at g^1)."""
    results, _ = _run(emu_bins["prefill_mut"], "f16_d24_dv132_cu32")
    r = results["f16_d24_dv132_cu32"]
    with pytest.raises(AssertionError, match="o rel err"):
        check_prefill(r)


@pytest.mark.parametrize("mutation", list(BF16_MUTATIONS))
def test_harness_catches_bf16_kernel_bugs(emu_bins, mutation):
    """The checks must fail on the bf16 kernel with a planted bug (see gen.MUTATIONS)."""
    case, message = BF16_MUTATIONS[mutation]
    results, _ = _run(emu_bins[f"prefill_{mutation}"], case)
    with pytest.raises(AssertionError, match=message):
        check_prefill(results[case])


@pytest.mark.parametrize("mutation", list(SPLIT_MUTATIONS))
def test_harness_catches_split_bugs(emu_bins, mutation):
    """The checks must fail on the segment split with a planted bug: the scan's decay power
    λ^(L-1), incoming states off by one segment, the final state written by a non-last segment,
    a table without each sequence's last partial segment."""
    results, _ = _run(emu_bins[f"prefill_{mutation}"], SPLIT_CASE)
    with pytest.raises(AssertionError, match=SPLIT_MUTATIONS[mutation]):
        check_prefill(results[SPLIT_CASE])


def test_generator_fails_loudly_when_asm_changes(tmp_path):
    src = tmp_path / "csrc"
    shutil.copytree(CSRC / "lightning", src / "lightning")
    common = src / "lightning" / "lightning_common.cuh"
    text = common.read_text()
    for needle in ("uint32_t to_tf32(float x)", "m16n8k8.row.col", "m16n8k16.row.col", "x4.trans.shared",
                   "cp.async.wait_group"):
        assert needle in text, f"update this test: {needle!r} is no longer in {common.name}"
    # a renamed helper, and a changed instruction: both must stop generation
    common.write_text(text.replace("uint32_t to_tf32(float x)", "uint32_t to_tf32_rna(float x)"))
    with pytest.raises(gen.GeneratorError, match="to_tf32.*update tests/cuda_emulation/gen.py"):
        gen.generate(tmp_path / "out", src)
    common.write_text(text.replace("m16n8k8.row.col", "m16n8k4.row.col"))
    with pytest.raises(gen.GeneratorError, match="mma_tf32.*no longer"):
        gen.generate(tmp_path / "out", src)
    # the bf16 MMA shape, the ldmatrix transpose and the cp.async wait are matched as well
    for old, new, func in [("m16n8k16.row.col", "m16n8k8.row.col", "mma_bf16"),
                           ("x4.trans.shared", "x2.trans.shared", "ldsm_x4_trans"),
                           ("cp.async.wait_group", "cp.async.wait_all", "cp_async_wait")]:
        common.write_text(text.replace(old, new))
        with pytest.raises(gen.GeneratorError, match=f"{func}.*no longer"):
            gen.generate(tmp_path / "out", src)
    common.write_text(text + "\n__device__ inline void f() { asm volatile(\"membar.gl;\"); }\n")
    with pytest.raises(gen.GeneratorError, match="inline asm left"):
        gen.generate(tmp_path / "out", src)


@pytest.mark.slow
@pytest.mark.skipif(not RUN_TSAN, reason="ThreadSanitizer run disabled by MM1_EMU_TSAN=0")
def test_tsan_no_shared_memory_races(emu_bins):
    """Shared-memory races between barriers (e.g. a dropped __syncthreads) under ThreadSanitizer."""
    def run(binary: str, case: str | None):
        try:
            return _run(emu_bins[binary], *([case] if case else []), env_extra=TSAN_ENV)
        except AssertionError as e:  # an environment TSan cannot run in is not a kernel bug
            if "FATAL: ThreadSanitizer" in str(e) and "data race" not in str(e):
                pytest.skip(f"ThreadSanitizer cannot run here: {str(e)[-500:]}")
            raise

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
        futures = [ex.submit(run, "decode_tsan", None)]
        futures += [ex.submit(run, "prefill_tsan", case) for case in TSAN_PREFILL_CASES]
        for f in futures:
            results, stderr = f.result()
            assert "ThreadSanitizer" not in stderr, stderr[-6000:]
            for r in results.values():
                (check_prefill if r["kernel"] == "prefill" else check_decode)(r)


@pytest.mark.slow
@pytest.mark.skipif(not RUN_TSAN, reason="ThreadSanitizer run disabled by MM1_EMU_TSAN=0")
def test_tsan_catches_injected_missing_barrier(emu_bins):
    """ThreadSanitizer must report the race when the end-of-chunk __syncthreads is dropped."""
    with pytest.raises(AssertionError, match="ThreadSanitizer: data race"):
        _run(emu_bins["prefill_tsan_race"], "f32_d37_dv29_scalar", env_extra=TSAN_ENV)

"""Every Triton kernel compiles for sm_90a (no GPU needed), within its register budget."""
import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

# M1's alignments as Triton's JIT would see them (one home: the static roofline's cases).
from profiles.static.cases import DECODE_ALIGNED, PREFILL_ALIGNED  # noqa: E402
from triton_aot import compile_cases_in_subprocess  # noqa: E402

H100_SMEM = 227 * 1024
PREFILL = "mm1_kernels.lightning.triton_prefill"
DECODE = "mm1_kernels.lightning.triton_decode"
PREFILL_PTRS = dict(slopes_ptr="*fp32", seg_meta_ptr="*i32", seg_state_ptr="*fp32", init_state_ptr="*fp32",
                    final_state_ptr="*fp32", seq_last_seg_ptr="*i32", slot_ptr="*i32")


def _io(dtype):
    return {name: f"*{dtype}" for name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}


def _cases():
    import torch

    from mm1_kernels.lightning import triton_prefill as tp

    cases = {}
    # D = 128 (M1): the value tiles, warps and mode names are the launcher's own.
    torch_dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)
    bv, warps, stages = tp.prefill_tiles(128, 128, torch.bfloat16)
    modes = [("bf16", tp.BF16_DOT_MODE["default"], ""), ("bf16", tp.BF16_DOT_MODE["high"], "-high"),
             ("fp16", "tf32", ""), ("fp32", "ieee", "")]
    for dtype, mode, tag in modes:
        bv_d, warps_d, stages_d = tp.prefill_tiles(128, 128, torch_dtype[dtype])
        for local in (False, True):
            cases[f"prefill-{dtype}{tag}-{'local' if local else 'output'}"] = (
                PREFILL, "lightning_segment_kernel", {**PREFILL_PTRS, **_io(dtype)},
                dict(C=64, BD=128, BV=bv_d, LOCAL_PASS=local, USE_SEG_STATE=not local, HAS_INIT=False,
                     STORE_FINAL=not local, HAS_SLOTS=False, DOT_MODE=mode, EXACT_TILES=True,
                     BOUNDARY_STATE=False), warps_d, stages_d,
                PREFILL_ALIGNED)
    # One segment per sequence (the common case), and a head dim that is not a tile multiple
    # (masked tiles, D = 96 in a 128-wide tile).
    cases["prefill-bf16-single"] = (
        PREFILL, "lightning_segment_kernel", {**PREFILL_PTRS, **_io("bf16")},
        dict(C=64, BD=128, BV=bv, LOCAL_PASS=False, USE_SEG_STATE=False, HAS_INIT=True,
             STORE_FINAL=True, HAS_SLOTS=False, DOT_MODE="bf16", EXACT_TILES=True, BOUNDARY_STATE=False), warps,
        stages, PREFILL_ALIGNED)
    cases["prefill-bf16-masked"] = (
        PREFILL, "lightning_segment_kernel", {**PREFILL_PTRS, **_io("bf16")},
        dict(C=64, BD=128, BV=bv, LOCAL_PASS=False, USE_SEG_STATE=False, HAS_INIT=True,
             STORE_FINAL=True, HAS_SLOTS=False, DOT_MODE="bf16", EXACT_TILES=False, BOUNDARY_STATE=False), warps,
        stages,
        PREFILL_ALIGNED)
    # The widest head (D = 256) must fit in an H100's shared memory too (launchable), for every dtype.
    for dtype in ("bf16", "fp32"):
        bv_d, warps_d, stages_d = tp.prefill_tiles(256, 256, torch_dtype[dtype])
        cases[f"prefill-{dtype}-D256-output"] = (
            PREFILL, "lightning_segment_kernel", {**PREFILL_PTRS, **_io(dtype)},
            dict(C=64, BD=256, BV=bv_d, LOCAL_PASS=False, USE_SEG_STATE=True, HAS_INIT=False, STORE_FINAL=True,
                 HAS_SLOTS=False, DOT_MODE="bf16" if dtype == "bf16" else "ieee", EXACT_TILES=True,
                 BOUNDARY_STATE=False), warps_d,
            stages_d, PREFILL_ALIGNED)
    # Chunked prefill on a slot-indexed state cache: one pass that reads and writes the slots.
    cases["prefill-bf16-slots"] = (
        PREFILL, "lightning_segment_kernel", {**PREFILL_PTRS, **_io("bf16")},
        dict(C=64, BD=128, BV=bv, LOCAL_PASS=False, USE_SEG_STATE=False, HAS_INIT=True,
             STORE_FINAL=False, HAS_SLOTS=True, DOT_MODE="bf16", EXACT_TILES=True, BOUNDARY_STATE=False), warps,
        stages, PREFILL_ALIGNED)
    # Consistent mode's cache step (lightning_chunk_cache_step): the same pass, with the state
    # stopping at the last chunk boundary.
    cases["prefill-bf16-slots-boundary"] = (
        PREFILL, "lightning_segment_kernel", {**PREFILL_PTRS, **_io("bf16")},
        dict(C=64, BD=128, BV=bv, LOCAL_PASS=False, USE_SEG_STATE=False, HAS_INIT=True,
             STORE_FINAL=False, HAS_SLOTS=True, DOT_MODE="bf16", EXACT_TILES=True, BOUNDARY_STATE=True), warps,
        stages, PREFILL_ALIGNED)
    for slots in (False, True):
        cases["scan-slots" if slots else "scan"] = (
            PREFILL, "lightning_segment_scan_kernel",
            dict(slopes_ptr="*fp32", seg_state_ptr="*fp32", init_state_ptr="*fp32",
                 seq_first_seg_ptr="*i32", seq_last_seg_ptr="*i32", slot_ptr="*i32"),
            dict(BD=128, BV=tp.SCAN_BV, HAS_INIT=True, HAS_SLOTS=slots), 4, 3,
            ("seg_state_ptr", "init_state_ptr", "H", "D", "DV"))
    for dtype in ("bf16", "fp32"):
        # One token per row (the decode step), and T tokens per row with per-token states.
        for multi in (False, True):
            cases[f"decode-{dtype}" + ("-tokens-states" if multi else "")] = (
                DECODE, "lightning_decode_kernel",
                dict(**_io(dtype), slopes_ptr="*fp32", state_ptr="*fp32", slot_ptr="*i32", states_ptr="*fp32"),
                dict(BD=128, BV=32, HAS_SLOTS=True, STORE_STATES=multi, ONE_TOKEN=not multi), 4, 3,
                DECODE_ALIGNED)
    return cases


@pytest.fixture(scope="module")
def lightning_stats():
    return compile_cases_in_subprocess(_cases())


def test_all_lightning_kernels_compile_for_hopper(lightning_stats):
    assert set(lightning_stats) == set(_cases())
    for name, stats in lightning_stats.items():
        assert stats["shared_bytes"] <= H100_SMEM, (name, stats)


def test_lightning_register_budget(lightning_stats):
    # No spills in any kernel a bf16 (M1) prefill or a decode launches by default, nor in the
    # fp16 passes. The bf16 passes sit at 255 registers: the fp32 state S^T [128, 128] alone is 64.
    for name in ("decode-bf16", "decode-fp32", "decode-bf16-tokens-states", "decode-fp32-tokens-states",
                 "prefill-bf16-output", "prefill-bf16-local", "prefill-bf16-single", "prefill-bf16-masked",
                 "prefill-bf16-slots", "prefill-bf16-slots-boundary",
                 "prefill-bf16-high-local", "prefill-fp16-local", "prefill-fp16-output",
                 "scan", "scan-slots"):
        assert lightning_stats[name]["spill_bytes"] == 0, (name, lightning_stats[name])
    # precision="high" (three bf16 pairs): 48-76 B/thread spilled, values parked across the loop
    # (Triton 3.6 / 3.9); a regression guard, not a goal.
    high = lightning_stats["prefill-bf16-high-output"]
    assert high["spill_bytes"] <= 128, high


@pytest.fixture(scope="module")
def prefill_roofline(tmp_path_factory):
    """The static roofline of the bf16 prefill at B=8, T=4096 (one pass) and B=1, T=32768 (split)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "profiles.static", "--case", "lightning-prefill-B8-T4096",
                          "--case", "lightning-prefill-B1-T32768", "--out", str(out), "--jobs", "2"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return {op["case"]: op for op in json.loads((out / "report.json").read_text())["ops"]}


def test_lightning_prefill_issues_no_repeated_tensor_core_work(prefill_roofline):
    """Q K^T once per chunk and head, no product repeated by both warp groups, wgmma: per chunk the
    bf16 pass issues the counted 4C²D + 4CD² FLOPs plus the second (lo) product of the state
    update's decayed keys, 4/3 of the count; the split adds the non-last segments' K^T V."""
    one = prefill_roofline["lightning-prefill-B8-T4096"]
    (single,) = one["launches"]
    assert single["mma_kind"].startswith("HGMMA") and single["sass_matches_ttgir"], single
    assert all(d["dup"] == 1 for d in single["dots_per_trip"]), single["dots_per_trip"]
    assert sum(d["macs"] for d in single["dots_per_trip"] if d["M"] == d["N"] == 64) == 64 * 64 * 128  # Q K^T
    assert one["issued_over_counted"] <= 4 / 3 + 1e-9, one["issued_over_counted"]
    assert one["bytes_over_min_l2"] <= 1.02, one["bytes_over_min_l2"]
    split = prefill_roofline["lightning-prefill-B1-T32768"]
    assert [r["kernel"] for r in split["launches"]] == ["prefill local pass", "prefill segment scan",
                                                        "prefill output pass"]
    assert split["issued_over_counted"] <= 5 / 3 + 1e-9 and split["bytes_over_min_l2"] <= 1.3, split
    for op in (one, split):
        for r in op["launches"]:
            assert r["spill_bytes"] == 0 and r["ctas_per_sm"] >= 1, r


def test_lightning_head_and_batch_offsets_are_64_bit(lightning_stats):
    """h · stride_h is an int32 product unless widened first: a head-major [B, H, T, D] view at
    T = 1M has stride_h = 2^27, so 48 of 64 heads would wrap (a reviewer's reproducer)."""
    for name, stats in lightning_stats.items():
        assert stats["i32_stride_products"] == 0, (name, stats)

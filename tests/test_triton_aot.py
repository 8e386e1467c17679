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
    cases = {}
    for dtype, mode in (("bf16", "bf16x2"), ("fp16", "tf32"), ("fp32", "ieee")):
        for local in (False, True):
            # D = 128 (M1); the value tile matches triton_prefill._value_tile(128).
            cases[f"prefill-{dtype}-{'local' if local else 'output'}"] = (
                PREFILL, "lightning_segment_kernel", {**PREFILL_PTRS, **_io(dtype)},
                dict(C=64, BD=128, BV=32, LOCAL_PASS=local, USE_SEG_STATE=not local, HAS_INIT=False,
                     STORE_FINAL=not local, HAS_SLOTS=False, DOT_MODE=mode), 8, 3, PREFILL_ALIGNED)
    # Chunked prefill on a slot-indexed state cache: one pass that reads and writes the slots.
    cases["prefill-bf16-slots"] = (
        PREFILL, "lightning_segment_kernel", {**PREFILL_PTRS, **_io("bf16")},
        dict(C=64, BD=128, BV=32, LOCAL_PASS=False, USE_SEG_STATE=False, HAS_INIT=True,
             STORE_FINAL=False, HAS_SLOTS=True, DOT_MODE="bf16x2"), 8, 3, PREFILL_ALIGNED)
    for slots in (False, True):
        cases["scan-slots" if slots else "scan"] = (
            PREFILL, "lightning_segment_scan_kernel",
            dict(slopes_ptr="*fp32", seg_state_ptr="*fp32", init_state_ptr="*fp32",
                 seq_first_seg_ptr="*i32", seq_last_seg_ptr="*i32", slot_ptr="*i32"),
            dict(BD=128, BV=32, HAS_INIT=True, HAS_SLOTS=slots), 4, 3,
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
    for name in ("decode-bf16", "decode-fp32", "decode-bf16-tokens-states", "decode-fp32-tokens-states",
                 "prefill-bf16-local", "prefill-fp16-local", "scan", "scan-slots"):
        assert lightning_stats[name]["spill_bytes"] == 0, (name, lightning_stats[name])
    # Regression guard: the bf16 output pass sits at the 255-register limit with ~8 B/thread of
    # spills today (see triton_prefill's docstring).
    assert lightning_stats["prefill-bf16-output"]["spill_bytes"] <= 64, lightning_stats["prefill-bf16-output"]
    # The slot-cached single pass (read + write back through slot_ids) stays in the same budget.
    assert lightning_stats["prefill-bf16-slots"]["spill_bytes"] <= 64, lightning_stats["prefill-bf16-slots"]


def test_lightning_head_and_batch_offsets_are_64_bit(lightning_stats):
    """h · stride_h is an int32 product unless widened first: a head-major [B, H, T, D] view at
    T = 1M has stride_h = 2^27, so 48 of 64 heads would wrap (a reviewer's reproducer)."""
    for name, stats in lightning_stats.items():
        assert stats["i32_stride_products"] == 0, (name, stats)

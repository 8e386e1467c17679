"""The head's Triton kernels compile for sm_90a with their GPU tiles (no GPU needed).

The interpreter cannot see tensor-core shape rules, shared-memory size or register spills;
this compiles each kernel as a GPU run would (see tests/triton_aot.py) at the tile sizes
``triton_head.TILES`` gives on a GPU (8 warps), and holds them to no register spills.
"""
import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

from triton_aot import compile_cases_in_subprocess  # noqa: E402

H100_SMEM = 227 * 1024
MOD = "mm1_kernels.head.triton_head"
# triton_head.TILES as on a GPU (this process runs the interpreter, whose tiles differ).
GPU_TILES = {"bf16": dict(BT=128, BV=64, BK=64), "fp16": dict(BT=128, BV=64, BK=64),
             "fp32": dict(BT=32, BV=64, BK=32)}
# triton_head.LOGITS_TILES: the STORE_LOGITS (sampling) build and unaligned layouts keep
# 64-token tiles, since at 128 they spill. The 128-token forward runs only when hidden's width,
# the row strides and the pointers are multiples of 16, so it is compiled with those hints
# (as the JIT attaches them); the 64-token fallback without any.
ALIGNED = ("h_ptr", "w_ptr", "K", "stride_h", "stride_w")
LOGITS_TILES = dict(GPU_TILES, bf16=dict(BT=64, BV=64, BK=64), fp16=dict(BT=64, BV=64, BK=64))
GROUP_T = 8  # triton_head.GROUP_T on a GPU (the forward's program order)


def _cases():
    cases = {}
    for dtype in ("bf16", "fp16", "fp32"):
        io = dict(h_ptr=f"*{dtype}", w_ptr=f"*{dtype}", inv_temp="fp32")
        flags = dict(FP32_INPUTS=dtype == "fp32", COMPENSATE=True)
        ptrs = dict(io, tgt_ptr="*i64", part_ptr="*fp32", logits_ptr="*fp32")
        for store in (False, True):
            cases[f"split-stats-{dtype}{'-logits' if store else ''}"] = (
                MOD, "head_split_stats_kernel", ptrs,
                dict(LOGITS_TILES[dtype], STORE_LOGITS=store, GROUP_T=GROUP_T, **flags), 8)
        cases[f"split-stats-{dtype}-aligned"] = (
            MOD, "head_split_stats_kernel", ptrs,
            dict(GPU_TILES[dtype], STORE_LOGITS=False, GROUP_T=GROUP_T, **flags), 8, 3, ALIGNED)
        cases[f"dlogits-{dtype}"] = (
            MOD, "head_dlogits_kernel",
            dict(io, tgt_ptr="*i64", g_lp_ptr="*fp32", g_lse_ptr="*fp32", g_ent_ptr="*fp32",
                 lse_ptr="*fp32", ent_ptr="*fp32", dz_ptr="*fp32"),
            dict(GPU_TILES[dtype], **flags), 8)
    cases["merge"] = (MOD, "head_merge_splits_kernel",
                      dict(part_ptr="*fp32", tgt_ptr="*i64", lp_ptr="*fp32", lse_ptr="*fp32",
                           ent_ptr="*fp32"),
                      dict(IGNORE=-100, BT=128), 4)
    return cases


@pytest.fixture(scope="module")
def head_stats():
    return compile_cases_in_subprocess(_cases())


def test_head_kernels_compile_for_hopper(head_stats):
    assert set(head_stats) == set(_cases())
    for name, stats in head_stats.items():
        assert stats["shared_bytes"] <= H100_SMEM, (name, stats)
        assert stats["spill_bytes"] == 0, (name, stats)

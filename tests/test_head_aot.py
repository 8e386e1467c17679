"""The head's Triton kernels compile for sm_90a with their GPU tiles (no GPU needed).

The interpreter cannot see tensor-core shape rules, shared-memory size or register spills;
this compiles each kernel as a GPU run would (see tests/triton_aot.py) at every tile shape
``triton_head.GPU_TILES`` / ``GPU_DLOGITS_TILES`` give on a GPU (8 warps; this process runs the
interpreter, whose tiles differ, so the GPU tables are read directly), and holds them to no
register spills and to the tensor-core instruction the shape is chosen for.
"""
import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

from mm1_kernels.head import triton_head as th  # noqa: E402

from triton_aot import compile_cases_in_subprocess  # noqa: E402

H100_SMEM = 227 * 1024
MOD = "mm1_kernels.head.triton_head"
# The non-fallback forward runs only when hidden's width, the row strides and the pointers are
# multiples of 16, so it is compiled with those hints (as the JIT attaches them); the fallback
# (sampling logits, unaligned layouts) without any.
ALIGNED = ("h_ptr", "w_ptr", "K", "stride_h", "stride_w")


def _dlogits(io, dz, shape, flags, aligned):
    bt, bv, bk = shape
    return (MOD, "head_dlogits_kernel",
            dict(io, tgt_ptr="*i64", g_lp_ptr="*fp32", g_lse_ptr="*fp32", g_ent_ptr="*fp32",
                 lse_ptr="*fp32", ent_ptr="*fp32", dz_ptr=f"*{dz}"),
            dict(BT=bt, BV=bv, BK=bk, GROUP_T=th.gpu_group_t(shape), **flags), 8, 3,
            ALIGNED + ("dz_ptr", "stride_dz") if aligned else ())


def _cases():
    """Every GPU tile entry of the default (plain) build for bf16 and fp32, the compensated
    option's, fp16's main forward (it compiles to bf16's shapes and registers), and the
    logit-gradient kernel with dz in the input dtype (tensor-core gradient GEMMs) and in fp32
    (torch without fp32-output mm), with and without the alignment hints. Unaligned and
    sampling builds share the fallback tiles; the sampling one (more registers) stands for both
    where the option is not the default."""
    cases = {}
    for dtype in ("bf16", "fp16", "fp32"):
        fp32 = dtype == "fp32"
        io = dict(h_ptr=f"*{dtype}", w_ptr=f"*{dtype}", inv_temp="fp32")
        ptrs = dict(io, tgt_ptr="*i64", part_ptr="*fp32", logits_ptr="*fp32")
        for comp in (False, True) if dtype != "fp16" else (False,):
            tag = f"{dtype}{'-compensated' if comp else ''}"
            flags = dict(FP32_INPUTS=fp32, COMPENSATE=comp)
            for fallback in (False, True) if dtype != "fp16" else (False,):
                bt, bv, bk = shape = th.GPU_TILES[(fp32, comp, fallback)]
                tiles = dict(BT=bt, BV=bv, BK=bk, GROUP_T=th.gpu_group_t(shape), **flags)
                if fallback:
                    for store in (False, True) if not comp else (True,):
                        cases[f"split-stats-{tag}-{'logits' if store else 'unaligned'}"] = (
                            MOD, "head_split_stats_kernel", ptrs, dict(tiles, STORE_LOGITS=store), 8)
                else:
                    cases[f"split-stats-{tag}-aligned"] = (
                        MOD, "head_split_stats_kernel", ptrs, dict(tiles, STORE_LOGITS=False), 8, 3, ALIGNED)
            if dtype == "fp16":
                continue
            shape = th.GPU_DLOGITS_TILES[(fp32, comp, False)]
            cases[f"dlogits-{tag}"] = _dlogits(io, dtype, shape, flags, True)
            cases[f"dlogits-{tag}-unaligned"] = _dlogits(io, dtype, th.GPU_DLOGITS_TILES[(fp32, comp, True)],
                                                         flags, False)
            if dtype == "bf16" and not comp:
                cases[f"dlogits-{tag}-dz-fp32"] = _dlogits(io, "fp32", shape, flags, True)
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

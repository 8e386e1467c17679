"""The CUDA C++ MoE backend (csrc/moe, backend="cuda").

Dispatch rules run everywhere; the kernels' GPU proof needs the built extension and a GPU
(skipped otherwise; ``tests/test_cuda_emulation_moe.py`` checks the same kernels on the CPU).
Truth is the fp64 reference (``mm1_kernels.moe.reference``); Triton is the peer.
"""
from __future__ import annotations

import pytest
import torch

import mm1_kernels as mk
from mm1_kernels._dispatch import CUDA_EXTENSION_IMPORT_ERROR, cuda_op_registered
from mm1_kernels.moe.reference import fused_moe_reference, moe_route_reference

from numerics import TOL, assert_close_to_reference

HAVE_CUDA_MOE = (CUDA_EXTENSION_IMPORT_ERROR is None and torch.cuda.is_available()
                 and cuda_op_registered("fused_moe_cuda"))
needs_cuda_moe = pytest.mark.skipif(not HAVE_CUDA_MOE, reason=f"needs a GPU and the CUDA extension with the MoE "
                                                             f"ops ({CUDA_EXTENSION_IMPORT_ERROR})")


@pytest.mark.parametrize("op", ["moe_route", "fused_moe"])
def test_automatic_choice_never_picks_cuda(op, monkeypatch):
    monkeypatch.delenv("MM1_BACKEND", raising=False)
    order = mk.available_backends(op)  # the automatic order on a GPU
    assert "cuda" in order and order[-1] == "cuda" and order.index("torch") < order.index("cuda")
    if torch.cuda.is_available():
        assert mk.resolve_backend(op, None, "cuda") != "cuda"


def test_explicit_cuda_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("MM1_BACKEND", raising=False)
    with pytest.raises(mk.BackendUnavailableError, match="moe_route.*needs CUDA tensors"):
        mk.moe_route(torch.randn(3, 8), 2, backend="cuda")
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    w13, w2 = torch.randn(4, 32, 16, dtype=torch.bfloat16), torch.randn(4, 16, 16, dtype=torch.bfloat16)
    with pytest.raises(mk.BackendUnavailableError, match="fused_moe.*needs CUDA tensors"):
        mk.fused_moe(x, w13, w2, torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.int32), backend="cuda")


def test_cuda_argument_checks_name_the_argument():
    """check_fused_moe_cuda_args (pure Python, runs on the CPU): more local experts than the C
    API's MM1_MOE_MAX_EXPERTS is a ValueError naming w13, not the launcher's unnamed error; a
    one-token x may have any row stride (the C API ignores it)."""
    from mm1_kernels.moe.api import MAX_EXPERTS
    from mm1_kernels.moe.cuda_ops import check_fused_moe_cuda_args
    x = torch.zeros(2, 16, dtype=torch.bfloat16)
    w13, w2 = torch.zeros(MAX_EXPERTS + 1, 16, 16, dtype=torch.bfloat16), torch.zeros(4, 16, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"at most 1024 local experts \(w13.shape\[0\]\)"):
        check_fused_moe_cuda_args(x, w13, w2)
    check_fused_moe_cuda_args(x, w13[:MAX_EXPERTS], w2)
    one = torch.zeros(1, 16 + 3, dtype=torch.bfloat16)[:, :16]  # row stride 19, one row
    check_fused_moe_cuda_args(one, w13[:4], w2)
    with pytest.raises(ValueError, match="x.stride"):
        check_fused_moe_cuda_args(torch.zeros(2, 19, dtype=torch.bfloat16)[:, :16], w13[:4], w2)


# ------------------------------------------------------------------------------------ on a GPU

def _experts(E, hidden, inter, dtype, seed=0, pad=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13 = (torch.randn(E, 2 * inter, hidden + pad, device="cuda", generator=g) * 0.05).to(dtype)[..., :hidden]
    w2 = (torch.randn(E, hidden, inter + pad, device="cuda", generator=g) * 0.05).to(dtype)[..., :inter]
    return w13, w2


@pytest.mark.gpu
@needs_cuda_moe
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,E,k", [(1, 32, 2), (77, 32, 2), (300, 64, 6), (5, 1000, 8)])
def test_route_matches_reference(dtype, T, E, k):
    g = torch.Generator(device="cuda").manual_seed(T + E)
    logits = (torch.randint(-12, 13, (T, E), device="cuda", generator=g) / 4).to(dtype)  # exact ties
    w, ids = mk.moe_route(logits, k, backend="cuda")
    w_ref, ids_ref = moe_route_reference(logits.double(), k)
    assert torch.equal(ids.long(), ids_ref)
    assert_close_to_reference(w, w_ref, tol=TOL[torch.float32], what="route weights")
    w_t, ids_t = mk.moe_route(logits, k, backend="triton")
    assert torch.equal(ids, ids_t)


@pytest.mark.gpu
@needs_cuda_moe
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("T", [1, 7, 64, 1000])
def test_fused_moe_matches_reference(dtype, quant, T):
    E, hidden, inter, k = 8, 256, 192, 2
    w13, w2 = _experts(E, hidden, inter, dtype, seed=T, pad=16)
    s13 = s2 = None
    if quant:
        w13, s13, w2, s2 = mk.quantize_moe_weights(w13, w2)
    x = torch.randn(T, hidden, device="cuda").to(dtype)
    w, ids = mk.moe_route(torch.randn(T, E, device="cuda"), k)
    out = mk.fused_moe(x, w13, w2, w, ids, s13, s2, backend="cuda")
    ref = fused_moe_reference(x, w13, w2, w, ids, s13, s2, compute_dtype=torch.float64)
    assert_close_to_reference(out, ref, tol=TOL[dtype], what="fused_moe cuda")
    again = mk.fused_moe(x, w13, w2, w, ids, s13, s2, backend="cuda")
    assert torch.equal(out, again), "not deterministic"
    # batch invariant: token 0 alone gives the same bits
    alone = mk.fused_moe(x[:1], w13, w2, w[:1], ids[:1], s13, s2, backend="cuda")
    assert torch.equal(alone[0], out[0])


@pytest.mark.gpu
@needs_cuda_moe
def test_fused_moe_expert_map_and_invalid_ids():
    E, hidden, inter = 4, 128, 64
    w13, w2 = _experts(E, hidden, inter, torch.bfloat16)
    x = torch.randn(6, hidden, device="cuda").to(torch.bfloat16)
    emap = torch.tensor([2, -1, 0, 3, 1, -1], device="cuda", dtype=torch.int32)
    ids = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 5], [3, 0], [2, 2]], device="cuda", dtype=torch.int64)
    w = torch.rand(6, 2, device="cuda")
    out = mk.fused_moe(x, w13, w2, w, ids, backend="cuda", expert_map=emap)
    ref = fused_moe_reference(x, w13, w2, w, ids, compute_dtype=torch.float64, expert_map=emap)
    assert_close_to_reference(out, ref, tol=TOL[torch.bfloat16], what="fused_moe cuda expert_map")
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # both experts on other ranks: exactly 0
    bad = ids.clone()
    bad[1, 0] = 6  # out of range of the map: a NaN row, nothing else touched
    out_bad = mk.fused_moe(x, w13, w2, w, bad, backend="cuda", check_ids=False, expert_map=emap)
    assert torch.isnan(out_bad[1]).all() and torch.equal(out_bad[[0, 2, 3, 4, 5]], out[[0, 2, 3, 4, 5]])


@pytest.mark.gpu
@needs_cuda_moe
def test_fused_moe_cuda_graph_and_compile():
    E, hidden, inter = 8, 128, 64
    w13, w2 = _experts(E, hidden, inter, torch.bfloat16)
    x = torch.randn(4, hidden, device="cuda").to(torch.bfloat16)
    logits = torch.randn(4, E, device="cuda")

    def step(x, logits):
        w, ids = mk.moe_route(logits, 2, backend="cuda")
        return mk.fused_moe(x, w13, w2, w, ids, backend="cuda", check_ids=False)

    eager = step(x, logits)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(x, logits)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    compiled = torch.compile(step, fullgraph=True)(x, logits)
    assert torch.equal(compiled, eager)


@pytest.mark.gpu
@needs_cuda_moe
def test_fused_moe_cuda_rejects_what_it_cannot_run():
    w13, w2 = _experts(2, 64, 32, torch.float32)
    x = torch.randn(2, 64, device="cuda")
    ids = torch.zeros(2, 1, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="bf16 or fp16 x"):
        mk.fused_moe(x, w13, w2, torch.ones(2, 1, device="cuda"), ids, backend="cuda")
    xb = torch.randn(2, 64 + 3, device="cuda").to(torch.bfloat16)[:, :64]
    w13b, w2b = w13.to(torch.bfloat16), w2.to(torch.bfloat16)
    with pytest.raises(ValueError, match="x.stride"):
        mk.fused_moe(xb, w13b, w2b, torch.ones(2, 1, device="cuda"), ids, backend="cuda")

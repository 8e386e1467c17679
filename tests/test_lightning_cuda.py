"""GPU tests of the CUDA C++ lightning kernels (backend="cuda"); skipped without a GPU.

Truth is the fp64 recurrence (``reference.lightning_recurrence``); the Triton backend is the
peer. Also: compute-sanitizer memcheck/racecheck on a small run, and the C API driven from
CuPy arrays through ctypes (no torch tensors) to show other engines can call it.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import mm1_kernels as mk
from mm1_kernels._dispatch import CUDA_EXTENSION_IMPORT_ERROR, cuda_op_registered
from mm1_kernels.lightning.reference import lightning_recurrence

from numerics import TOL, assert_close_to_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(CUDA_EXTENSION_IMPORT_ERROR is not None or not cuda_op_registered("lightning_decode_cuda"),
                       reason=f"CUDA extension not built: {CUDA_EXTENSION_IMPORT_ERROR}"),
]

NUM_LAYERS = 80


def assert_close(out, ref, tol, what):
    assert_close_to_reference(out, ref, tol=tol, what=what)


def poison_allocator(nbytes=64 << 20):
    """Leave NaN-filled blocks in torch's caching allocator, so outputs the extension allocates
    with at::empty likely land on NaNs and an unwritten element fails the finiteness check."""
    for size in (nbytes, nbytes // 16, 1 << 16):
        torch.full((size // 4,), float("nan"), device="cuda")


def qkv(B, T, H, D, DV, dtype, fused=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if fused:  # per-head interleaved [q | k | v] like M1's qkv projection: strided views
        x = torch.nn.functional.silu(torch.randn(B, T, H, 2 * D + DV, device="cuda", generator=g)).to(dtype)
        return x[..., :D], x[..., D:2 * D], x[..., 2 * D:]
    mk_ = lambda d: torch.nn.functional.silu(torch.randn(B, T, H, d, device="cuda", generator=g)).to(dtype)
    return mk_(D), mk_(D), mk_(DV)


def slopes_for(H, layer):
    return mk.lightning_slopes(H, layer, NUM_LAYERS).cuda()


def run_cuda_and_check(q, k, v, s, init=None, cu=None, tol=None, check_triton=True):
    poison_allocator()
    o, final = mk.lightning_attention(q, k, v, s, initial_state=init, output_final_state=True,
                                      cu_seqlens=cu, backend="cuda")
    ref_o, ref_final = lightning_recurrence(q, k, v, s, init, cu)
    tol = tol or TOL[q.dtype]
    assert o.dtype == q.dtype and o.shape == ref_o.shape
    assert final.dtype == torch.float32 and final.shape == ref_final.shape
    assert_close(o, ref_o, tol, "o vs fp64")
    assert_close(final, ref_final, tol, "final state vs fp64")
    if check_triton:
        t_o, t_final = mk.lightning_attention(q, k, v, s, initial_state=init, output_final_state=True,
                                              cu_seqlens=cu, backend="triton")
        assert_close(o, t_o.float(), 2 * tol, "o vs triton")
        assert_close(final, t_final, 2 * tol, "final state vs triton")
    return o, final


def test_cuda_backend_is_registered_after_triton_on_a_gpu():
    # Triton leads lightning's GPU order until a GPU run has verified and timed the CUDA kernels.
    for op in ("lightning_attention", "lightning_decode"):
        assert mk.available_backends(op, "cuda") == ("triton", "cuda", "torch")
        assert mk.resolve_backend(op, None, "cuda") == "triton"
        assert mk.resolve_backend(op, "cuda", "cuda") == "cuda"


@pytest.mark.parametrize("T", [1, 17, 63, 64, 65, 257, 1000])
@pytest.mark.parametrize("layer", [0, 39, 78])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_matches_reference(T, layer, dtype):
    B, H, D = 2, 4, 64
    q, k, v = qkv(B, T, H, D, D, dtype, seed=T * 100 + layer)
    run_cuda_and_check(q, k, v, slopes_for(H, layer))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer", [0, 78])
def test_prefill_m1_shape(dtype, layer):
    """H=64, D=128 (M1), with an initial state; fused-qkv strided views."""
    B, T, H, D = 1, 257, 64, 128
    q, k, v = qkv(B, T, H, D, D, dtype, fused=True, seed=layer)
    init = torch.randn(B, H, D, D, device="cuda") * 0.1
    run_cuda_and_check(q, k, v, slopes_for(H, layer), init=init)


@pytest.mark.parametrize("D,DV", [(128, 96), (100, 100), (72, 30), (200, 200), (256, 256), (16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_odd_dims(D, DV, dtype):
    """Partial value tiles, scalar (non-16-byte) loads, and the D > 128 configuration."""
    q, k, v = qkv(2, 97, 3, D, DV, dtype, seed=D + DV)
    init = torch.randn(2, 3, D, DV, device="cuda") * 0.1
    run_cuda_and_check(q, k, v, slopes_for(3, 10), init=init)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_varlen(index_dtype, dtype):
    lengths = [1, 63, 1, 130, 64, 1, 200, 65]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=index_dtype, device="cuda")
    T, H, D = sum(lengths), 4, 64
    q, k, v = qkv(1, T, H, D, D, dtype, seed=7)
    init = torch.randn(len(lengths), H, D, D, device="cuda") * 0.1
    run_cuda_and_check(q, k, v, slopes_for(H, 39), init=init, cu=cu)


def test_prefill_no_final_state_and_empty_sequence():
    q, k, v = qkv(1, 10, 2, 32, 32, torch.float32)
    s = slopes_for(2, 5)
    o, final = mk.lightning_attention(q, k, v, s, backend="cuda")
    assert final is None
    # An empty sequence in the middle: its final state is its initial state.
    cu = torch.tensor([0, 4, 4, 10], dtype=torch.int32, device="cuda")
    init = torch.randn(3, 2, 32, 32, device="cuda")
    o, final = mk.lightning_attention(q, k, v, s, initial_state=init, output_final_state=True,
                                      cu_seqlens=cu, backend="cuda")
    assert torch.equal(final[1], init[1])


def test_prefill_deterministic():
    q, k, v = qkv(1, 300, 8, 128, 128, torch.bfloat16)
    s = slopes_for(8, 60)
    a = mk.lightning_attention(q, k, v, s, output_final_state=True, backend="cuda")
    b = mk.lightning_attention(q, k, v, s, output_final_state=True, backend="cuda")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- the segment split (segment_len > 0) ------------------------------------------------------

def cuda_prefill(q, k, v, s, init=None, cu=None, segment_len=0):
    return torch.ops.mm1.lightning_prefill_cuda(q, k, v, s, init, cu, True, segment_len)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_split_varlen_matches_unsplit_and_fp64(dtype):
    """Forced small segments, varlen with empty and length-1 sequences and an initial state."""
    lengths = [1, 0, 300, 64, 0, 129, 1]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    T, H, D = sum(lengths), 4, 64
    q, k, v = qkv(1, T, H, D, D, dtype, seed=21)
    s = slopes_for(H, 20)
    init = torch.randn(len(lengths), H, D, D, device="cuda") * 0.1
    ref_o, ref_final = lightning_recurrence(q, k, v, s, init, cu)
    whole_o, whole_final = cuda_prefill(q, k, v, s, init, cu)
    tol = TOL[dtype]
    for L in (64, 128, 192):
        poison_allocator()
        o, final = cuda_prefill(q, k, v, s, init, cu, segment_len=L)
        assert_close(o, ref_o, tol, f"split L={L}: o vs fp64")
        assert_close(final, ref_final, tol, f"split L={L}: final state vs fp64")
        assert_close(o, whole_o.float(), tol, f"split L={L}: o vs unsplit")
        assert_close(final, whole_final, 1e-5, f"split L={L}: final vs unsplit")
        assert torch.equal(final[1], init[1]) and torch.equal(final[4], init[4]), "empty sequence: final = init"
        again = cuda_prefill(q, k, v, s, init, cu, segment_len=L)
        assert torch.equal(o, again[0]) and torch.equal(final, again[1]), "split is not deterministic"


@pytest.mark.parametrize("layer", [0, 78])
def test_prefill_split_m1_tp8_shape(layer):
    """M1 under TP = 8: H = 8, D = Dv = 128, one 32,768-token sequence. The planner splits it
    (8 CTAs unsplit: one per head, BV = 128); also a forced 2048-token split, vs the Triton
    kernel and fp64."""
    from mm1_kernels.lightning.api import cuda_prefill_segment_len
    B, T, H, D = 1, 32768, 8, 128
    q, k, v = qkv(B, T, H, D, D, torch.bfloat16, fused=True, seed=layer)
    s = slopes_for(H, layer)
    init = torch.randn(B, H, D, D, device="cuda") * 0.1
    planned = cuda_prefill_segment_len(q, v, None)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if sms >= 64:
        assert planned > 0 and planned % 64 == 0, planned
        assert H * -(-T // planned) <= sms < 2 * H * -(-T // planned), (planned, sms)
    ref_o, ref_final = lightning_recurrence(q, k, v, s, init)
    t_o, t_final = mk.lightning_attention(q, k, v, s, initial_state=init, output_final_state=True, backend="triton")
    tol = TOL[torch.bfloat16]
    for L in (planned, 2048):
        poison_allocator()
        o, final = cuda_prefill(q, k, v, s, init, None, segment_len=L)
        assert_close(o, ref_o, tol, f"L={L}: o vs fp64")
        assert_close(final, ref_final, tol, f"L={L}: final state vs fp64")
        assert_close(o, t_o.float(), 2 * tol, f"L={L}: o vs triton")
        assert_close(final, t_final, 2 * tol, f"L={L}: final state vs triton")
    # The public op plans the split itself.
    o, final = mk.lightning_attention(q, k, v, s, initial_state=init, output_final_state=True, backend="cuda")
    assert_close(o, ref_o, tol, "lightning_attention(backend='cuda'): o vs fp64")


@pytest.mark.parametrize("segment_len", [0, 64])
def test_prefill_high_precision(segment_len):
    """precision="high" (bf16 pairs for the state in Q S and the scores in P V) on the CUDA
    kernel: at least as accurate as "default", close to Triton's "high", and what
    lightning_attention(backend="cuda", precision="high") runs (no Triton fallback any more)."""
    from mm1_kernels.lightning.api import cuda_prefill_segment_len
    T, H, D = 200, 2, 64
    q, k, v = qkv(1, T, H, D, D, torch.bfloat16, seed=5)
    s = slopes_for(H, 0)
    init = torch.randn(1, H, D, D, device="cuda") * 0.1
    ref_o, ref_final = lightning_recurrence(q, k, v, s, init)
    high = torch.ops.mm1.lightning_prefill_cuda(q, k, v, s, init, None, True, segment_len, 1)
    default = torch.ops.mm1.lightning_prefill_cuda(q, k, v, s, init, None, True, segment_len, 0)
    err = lambda o: ((o.double() - ref_o).norm() / ref_o.norm()).item()  # noqa: E731
    assert err(high[0]) <= err(default[0]), (err(high[0]), err(default[0]))
    assert_close(high[1], ref_final, 1e-5, "high: final state vs fp64")
    t_o, _ = mk.lightning_attention(q, k, v, s, initial_state=init, output_final_state=True, backend="triton",
                                    precision="high")
    assert_close(high[0], t_o.float(), TOL[torch.bfloat16], "high: o vs triton high")
    o, final = mk.lightning_attention(q, k, v, s, initial_state=init, output_final_state=True, backend="cuda",
                                      precision="high")
    direct = torch.ops.mm1.lightning_prefill_cuda(q, k, v, s, init, None, True, cuda_prefill_segment_len(q, v, None), 1)
    assert torch.equal(o, direct[0]) and torch.equal(final, direct[1])


def test_prefill_split_rejects_bad_segment_len():
    q, k, v = qkv(1, 100, 2, 32, 32, torch.bfloat16)
    s = slopes_for(2, 3)
    for bad in (-64, 32, 100):
        with pytest.raises(RuntimeError, match="segment_len"):
            cuda_prefill(q, k, v, s, segment_len=bad)


def test_prefill_split_c_api_workspace():
    """mm1_lightning_prefill_workspace_bytes is a pure function of the sizes; a workspace one
    byte too small is refused with cudaErrorInvalidValue (1) and nothing is launched."""
    lib = ctypes.CDLL(importlib.util.find_spec("mm1_kernels._C").origin)
    ws = lib.mm1_lightning_prefill_workspace_bytes
    ws.argtypes = [ctypes.c_int64] * 7
    ws.restype = ctypes.c_size_t
    N, B, T, H, D, DV, L = 1, 1, 1000, 2, 64, 64, 128
    rows = -(-B * T // L) + N
    need = ws(N, B, T, H, D, DV, L)
    assert need >= rows * H * D * DV * 4 + rows * 32 + (N + 1) * 8
    assert ws(N, B, T, H, D, DV, 0) == 0
    fn = lib.mm1_lightning_prefill
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = ([ctypes.c_int, vp, vp, vp, vp, vp, vp, vp, vp, ctypes.c_int] + [i64] * 6 + [i64] * 12
                   + [i64, ctypes.c_int, vp, ctypes.c_size_t, vp])
    fn.restype = ctypes.c_int
    q, k, v = qkv(B, T, H, D, DV, torch.bfloat16)
    o = torch.full((B, T, H, DV), float("nan"), dtype=torch.bfloat16, device="cuda")
    s = slopes_for(H, 3)
    work = torch.empty(need, dtype=torch.uint8, device="cuda")
    strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3]]
    args = [2, q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), s.data_ptr(), None, None, None, 4,
            N, B, T, H, D, DV, *strides, L, 0, work.data_ptr()]
    stream = torch.cuda.current_stream().cuda_stream
    assert fn(*args, need - 1, stream) == 1
    assert torch.isnan(o.float()).all()
    assert fn(*args, need, stream) == 0
    ref_o, _ = lightning_recurrence(q, k, v, s)
    assert_close(o, ref_o, TOL[torch.bfloat16], "C API split o vs fp64")


def test_prefill_split_cuda_graph_capture():
    """No host synchronization in the split (the table is built on the device): capturable."""
    lengths = [300, 0, 5]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64, device="cuda")
    q, k, v = qkv(1, sum(lengths), 2, 64, 64, torch.bfloat16, seed=3)
    s = slopes_for(2, 9)
    ref = cuda_prefill(q, k, v, s, None, cu, segment_len=64)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_prefill(q, k, v, s, None, cu, segment_len=64)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


# ---- decode ---------------------------------------------------------------------------------

def decode_reference_fp64(q, k, v, slopes, state, slots):
    """fp64 step on clones: (o, new_state_cache); padding rows o = 0, their slots untouched."""
    state = state.double().clone()
    o = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=torch.float64, device=q.device)
    lam = torch.exp(-slopes.double())[:, None, None]
    for b, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        S = lam * state[slot] + k[b].double()[:, :, None] * v[b].double()[:, None, :]
        state[slot] = S
        o[b] = torch.einsum("hd,hde->he", q[b].double(), S)
    return o, state


@pytest.mark.parametrize("B", [1, 3, 64, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D,DV", [(128, 128), (64, 96), (100, 100), (32, 30)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_decode_matches_reference(B, dtype, D, DV, index_dtype):
    H, S = 4, B + 3
    g = torch.Generator(device="cuda").manual_seed(B * 1000 + D + DV)
    q, k, v = (torch.nn.functional.silu(torch.randn(B, H, d, device="cuda", generator=g)).to(dtype)
               for d in (D, D, DV))
    slopes = slopes_for(H, 40)
    state = torch.randn(S, H, D, DV, device="cuda", generator=g)
    slots = torch.randperm(S, device="cuda", generator=g)[:B].to(index_dtype)
    if B > 1:
        slots[1] = -1  # a padding row
    ref_o, ref_state = decode_reference_fp64(q, k, v, slopes, state, slots)
    tri_state = state.clone()
    tri_o = mk.lightning_decode(q, k, v, slopes, tri_state, slots, backend="triton")
    before = state.clone()
    poison_allocator()
    o = mk.lightning_decode(q, k, v, slopes, state, slots, backend="cuda")
    tol = TOL[dtype]
    assert_close(o, ref_o, tol, "decode o vs fp64")
    assert_close(state, ref_state, 1e-6, "decode state vs fp64")
    assert_close(o, tri_o.float(), 2 * tol, "decode o vs triton")
    assert_close(state, tri_state, 1e-6, "decode state vs triton")
    untouched = torch.ones(S, dtype=torch.bool, device="cuda")
    untouched[slots[slots >= 0].long()] = False
    assert torch.equal(state[untouched], before[untouched]), "a slot no row owns was written"
    if B > 1:
        assert (o[1] == 0).all(), "padding row must output zeros"


def test_decode_default_slots_and_squeezed_shape():
    B, H, D = 5, 64, 128
    q, k, v = (torch.nn.functional.silu(torch.randn(B, 1, H, D, device="cuda")).bfloat16() for _ in range(3))
    slopes = slopes_for(H, 0)
    state = torch.randn(B, H, D, D, device="cuda")
    ref_o, ref_state = decode_reference_fp64(q[:, 0], k[:, 0], v[:, 0], slopes, state,
                                             torch.arange(B, device="cuda"))
    o = mk.lightning_decode(q, k, v, slopes, state, backend="cuda")
    assert o.shape == (B, 1, H, D)
    assert_close(o[:, 0], ref_o, 1e-2, "o")
    assert_close(state, ref_state, 1e-6, "state")


def test_decode_out_of_range_slot_is_nan_and_leaves_state():
    """Reachable only when the host check is skipped (graph capture); call the op directly."""
    B, H, D, S = 3, 2, 64, 4
    q, k, v = (torch.randn(B, H, D, device="cuda") for _ in range(3))
    state = torch.randn(S, H, D, D, device="cuda")
    before = state.clone()
    slots = torch.tensor([0, S + 5, -1], dtype=torch.int32, device="cuda")
    o = torch.ops.mm1.lightning_decode_cuda(q, k, v, slopes_for(H, 3), state, slots)
    assert torch.isnan(o[1]).all() and torch.isfinite(o[0]).all() and (o[2] == 0).all()
    assert torch.equal(state[1:], before[1:])
    # A 64-bit id that would alias slot 1 if truncated to 32 bits is still out of range.
    slots64 = torch.tensor([(1 << 32) + 1], dtype=torch.int64, device="cuda")
    o = torch.ops.mm1.lightning_decode_cuda(q[:1], k[:1], v[:1], slopes_for(H, 3), state, slots64)
    assert torch.isnan(o).all() and torch.equal(state[1:], before[1:])


def test_direct_op_calls_reject_bad_devices_and_shapes():
    """The ops skip api.py's checks when called directly; the bindings must still refuse
    pointers the kernels cannot dereference and a v smaller than q's extents."""
    B, H, D = 2, 2, 32
    q, k, v = (torch.randn(B, H, D, device="cuda") for _ in range(3))
    s = slopes_for(H, 3)
    with pytest.raises(RuntimeError, match="state_cache"):
        torch.ops.mm1.lightning_decode_cuda(q, k, v, s, torch.zeros(B, H, D, D), None)
    with pytest.raises(RuntimeError, match="v must be"):
        torch.ops.mm1.lightning_decode_cuda(q, k, v[:1], s, torch.zeros(B, H, D, D, device="cuda"), None)
    q4, k4, v4 = (torch.randn(1, 9, H, D, device="cuda") for _ in range(3))
    with pytest.raises(RuntimeError, match="initial_state"):
        torch.ops.mm1.lightning_prefill_cuda(q4, k4, v4, s, torch.zeros(1, H, D, D), None, False)
    with pytest.raises(RuntimeError, match="v must be"):
        torch.ops.mm1.lightning_prefill_cuda(q4, k4, v4[:, :4], s, None, None, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_then_decode_matches_prefill(dtype):
    B, T, extra, H, D = 2, 100, 5, 4, 128
    q, k, v = qkv(B, T + extra, H, D, D, dtype, seed=11)
    s = slopes_for(H, 70)
    full_o, full_final = mk.lightning_attention(q, k, v, s, output_final_state=True, backend="cuda")
    _, state = mk.lightning_attention(q[:, :T], k[:, :T], v[:, :T], s, output_final_state=True, backend="cuda")
    outs = []
    for t in range(T, T + extra):
        outs.append(mk.lightning_decode(q[:, t], k[:, t], v[:, t], s, state, backend="cuda"))
    dec_o = torch.stack(outs, dim=1)
    tol = TOL[dtype]
    assert_close(dec_o, full_o[:, T:].float(), 2 * tol, "decode after prefill vs prefill")
    # fp32 inputs: both paths are fp32-accurate. 16-bit inputs: prefill rounds the fp32 operand
    # of K^T V to TF32 (as Triton does) and decode does not, so the two states differ by ~1e-4.
    state_tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert_close(state, full_final, state_tol, "state after decode vs prefill final state")


def test_decode_cuda_graph_capture():
    B, H, D = 8, 4, 128
    q, k, v = (torch.randn(B, H, D, device="cuda").bfloat16() for _ in range(3))
    slopes = slopes_for(H, 1)
    state = torch.randn(B, H, D, D, device="cuda")
    slots = torch.arange(B, dtype=torch.int32, device="cuda")
    ref_state = state.clone()
    ref_o = mk.lightning_decode(q, k, v, slopes, ref_state, slots, backend="cuda")
    work = state.clone()
    mk.lightning_decode(q, k, v, slopes, work, slots, backend="cuda")  # warm-up outside capture
    work.copy_(state)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = mk.lightning_decode(q, k, v, slopes, work, slots, backend="cuda")
    work.copy_(state)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(o, ref_o) and torch.equal(work, ref_state)


def test_torch_compile_fullgraph():
    q, k, v = qkv(1, 70, 2, 64, 64, torch.bfloat16)
    s = slopes_for(2, 2)
    fn = torch.compile(lambda q, k, v, s: mk.lightning_attention(q, k, v, s, output_final_state=True,
                                                                 backend="cuda"), fullgraph=True)
    o, final = fn(q, k, v, s)
    ref_o, ref_final = mk.lightning_attention(q, k, v, s, output_final_state=True, backend="cuda")
    assert torch.equal(o, ref_o) and torch.equal(final, ref_final)


def test_torch_compile_cuda_ops_fakes():
    """The extension's own ops trace through their Python fakes (cuda_ops.py)."""
    from mm1_kernels.lightning import cuda_ops
    assert cuda_ops.REGISTERED
    q, k, v = qkv(1, 70, 2, 64, 64, torch.bfloat16)
    s = slopes_for(2, 2)
    prefill = torch.compile(lambda q, k, v, s: torch.ops.mm1.lightning_prefill_cuda(q, k, v, s, None, None, False),
                            fullgraph=True)
    o, final = prefill(q, k, v, s)
    assert final.numel() == 0
    assert torch.equal(o, torch.ops.mm1.lightning_prefill_cuda(q, k, v, s, None, None, False)[0])
    state = torch.randn(3, 2, 64, 64, device="cuda")
    ref_state = state.clone()
    decode = torch.compile(lambda q, k, v, s, st: torch.ops.mm1.lightning_decode_cuda(q, k, v, s, st, None),
                           fullgraph=True)
    o = decode(q[0, :3], k[0, :3], v[0, :3], s, state)
    ref = torch.ops.mm1.lightning_decode_cuda(q[0, :3], k[0, :3], v[0, :3], s, ref_state, None)
    assert torch.equal(o, ref) and torch.equal(state, ref_state)


# ---- compute-sanitizer ---------------------------------------------------------------------

SANITIZER_SCRIPT = textwrap.dedent("""
    import torch
    import mm1_kernels as mk
    torch.manual_seed(0)
    s = mk.lightning_slopes(2, 30, 80).cuda()
    for dtype in (torch.float32, torch.bfloat16):
        for D in (64, 72, 200):
            q, k, v = (torch.randn(2, 70, 2, D, device="cuda").to(dtype) for _ in range(3))
            init = torch.randn(2, 2, D, D, device="cuda")
            mk.lightning_attention(q, k, v, s, initial_state=init, output_final_state=True, backend="cuda")
        cu = torch.tensor([0, 1, 66, 140], dtype=torch.int32, device="cuda")
        q, k, v = (torch.randn(1, 140, 2, 64, device="cuda").to(dtype) for _ in range(3))
        mk.lightning_attention(q, k, v, s, output_final_state=True, cu_seqlens=cu, backend="cuda")
        torch.ops.mm1.lightning_prefill_cuda(q, k, v, s, None, cu, True, 64)  # the segment split
        for D in (128, 30):
            q, k, v = (torch.randn(3, 2, D, device="cuda").to(dtype) for _ in range(3))
            state = torch.randn(4, 2, D, D, device="cuda")
            slots = torch.tensor([2, -1, 0], dtype=torch.int32, device="cuda")
            mk.lightning_decode(q, k, v, s, state, slots, backend="cuda")
    torch.cuda.synchronize()
    print("ok")
""")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool, tmp_path):
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        candidate = os.path.join(cuda_home, "bin", "compute-sanitizer")
        sanitizer = candidate if os.path.isfile(candidate) else None
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    script = tmp_path / "sanitize_lightning.py"
    script.write_text(SANITIZER_SCRIPT)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # exact allocations: OOB is visible
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", "1",
           "--kernel-name", "kns=lightning_", sys.executable, str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "ok" in proc.stdout, f"compute-sanitizer {tool} failed:\n{log[-8000:]}"
    assert "ERROR SUMMARY: 0 errors" in log or "RACECHECK SUMMARY: 0 hazards" in log, log[-4000:]


# ---- the C API from CuPy, no torch tensors --------------------------------------------------

def test_c_api_from_cupy():
    cp = pytest.importorskip("cupy")
    np = pytest.importorskip("numpy")
    lib = ctypes.CDLL(importlib.util.find_spec("mm1_kernels._C").origin)
    fn = lib.mm1_lightning_decode
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ctypes.c_int, vp, vp, vp, vp, vp, vp, vp, ctypes.c_int,
                   i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, i64, vp]
    fn.restype = ctypes.c_int
    B, H, D, S = 3, 4, 128, 5
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, H, D)).astype(np.float32) for _ in range(3))
    slopes = (np.arange(1, H + 1, dtype=np.float32) * 0.05)
    state = rng.standard_normal((S, H, D, D)).astype(np.float32)
    slots = np.array([4, -1, 0], dtype=np.int32)
    dq, dk, dv, ds, dstate, dslots = map(cp.asarray, (q, k, v, slopes, state, slots))
    do = cp.full((B, H, D), cp.nan, dtype=cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    err = fn(0, dq.data.ptr, dk.data.ptr, dv.data.ptr, do.data.ptr, ds.data.ptr, dstate.data.ptr,
             dslots.data.ptr, 4, B, H, D, D, S, H * D, D, H * D, D, H * D, D, H * D, D, stream.ptr)
    assert err == 0, f"mm1_lightning_decode returned cudaError {err}"
    stream.synchronize()
    lam = np.exp(-slopes.astype(np.float64))[:, None, None]
    ref_state = state.astype(np.float64)
    ref_o = np.zeros((B, H, D))
    for b, slot in enumerate(slots):
        if slot < 0:
            continue
        ref_state[slot] = lam * ref_state[slot] + k[b].astype(np.float64)[:, :, None] * v[b][:, None, :]
        ref_o[b] = np.einsum("hd,hde->he", q[b].astype(np.float64), ref_state[slot])
    out_o, out_state = cp.asnumpy(do), cp.asnumpy(dstate)
    assert np.linalg.norm(out_o - ref_o) / np.linalg.norm(ref_o) < 1e-5
    assert np.linalg.norm(out_state - ref_state) / np.linalg.norm(ref_state) < 1e-6
    assert (out_o[1] == 0).all()
    assert np.array_equal(out_state[[1, 2, 3]], state[[1, 2, 3]])

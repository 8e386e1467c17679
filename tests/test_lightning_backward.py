"""Lightning attention backward: every backend's gradients against autograd of the fp64 recurrence.

The truth is ``torch.autograd`` through ``reference.lightning_recurrence`` in float64 (the
token-by-token definition, docs/m1_math.md §3.2) with M1's slopes (heads 0 and 63 of 64); the loss is
``Σ o·do + Σ final·dfinal`` with random ``do`` and ``dfinal``, so the gradient of every input is
checked, including what reaches ``initial_state`` and q/k/v through the final state.
Bounds (tests/numerics.py): fp32 1e-5 relative; bf16 1e-2 and 2 × the error of the naive bf16
backward (``reference.lightning_chunked_backward(..., operand_dtype=bf16)``: every matmul operand
rounded to bf16, fp32 accumulation, the state gradient kept fp32).
"""
import pytest
import torch

import mm1_kernels as mk
from mm1_kernels.lightning import reference as ref

from numerics import assert_close_to_reference, case_id

BACKENDS = ["torch", "triton"]
NAMES = ("dq", "dk", "dv", "dinit")


def m1_slopes(H, layer, device):
    """M1's slopes of global layer ``layer`` (of 80) for H of its 64 heads, spread from head 0
    (the fastest decay, λ = 0.40 at layer 0) to head 63 (the slowest)."""
    heads = torch.linspace(0, 63, H).round().long()
    return mk.lightning_slopes(64, layer, 80)[heads].contiguous().to(device)


def make_inputs(B, T, H, D, DV, dtype, device, n_states, seed=0):
    g = torch.Generator().manual_seed(seed)
    # silu-activated, as in the model (q/k/v = silu(x W^T)); do is a plain Gaussian.
    q, k = (torch.nn.functional.silu(torch.randn(B, T, H, D, generator=g)) for _ in range(2))
    v = torch.nn.functional.silu(torch.randn(B, T, H, DV, generator=g))
    do = torch.randn(B, T, H, DV, generator=g)
    init = 0.1 * torch.randn(n_states, H, D, DV, generator=g)
    dfinal = torch.randn(n_states, H, D, DV, generator=g)
    q, k, v, do = (x.to(device, dtype) for x in (q, k, v, do))
    return q, k, v, do, init.to(device), dfinal.to(device)


def fp64_grads(q, k, v, slopes, init, cu, do, dfinal):
    """(dq, dk, dv, dinit) by autograd of the fp64 recurrence; dinit None without init."""
    leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    init64 = None if init is None else init.detach().cpu().double().requires_grad_()
    o, final = ref.lightning_recurrence(*leaves, slopes.cpu(), init64, None if cu is None else cu.cpu())
    loss = (o * do.cpu().double()).sum()
    if dfinal is not None:
        loss = loss + (final * dfinal.cpu().double()).sum()
    wrt = leaves + ([init64] if init64 is not None else [])
    grads = torch.autograd.grad(loss, wrt)
    return tuple(grads) + ((None,) if init is None else ())


def op_grads(q, k, v, slopes, init, cu, do, dfinal, backend, precision="default"):
    """(dq, dk, dv, dinit) through ``mk.lightning_attention`` and plain autograd."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    init_l = None if init is None else init.detach().clone().requires_grad_()
    o, final = mk.lightning_attention(*leaves, slopes, init_l, output_final_state=dfinal is not None,
                                      cu_seqlens=cu, backend=backend, precision=precision)
    outs, grads_out = [o], [do]
    if dfinal is not None:
        outs.append(final)
        grads_out.append(dfinal)
    wrt = leaves + ([init_l] if init_l is not None else [])
    grads = torch.autograd.grad(outs, wrt, grads_out)
    return tuple(grads) + ((None,) if init is None else ())


def check_grads(got, q, k, v, slopes, init, cu, do, dfinal):
    truth = fp64_grads(q, k, v, slopes, init, cu, do, dfinal)
    naive = (None,) * 4
    if q.dtype != torch.float32:
        naive = ref.lightning_chunked_backward(do, dfinal, q, k, v, slopes, init, cu,
                                               operand_dtype=q.dtype)
    for name, g, t, nv in zip(NAMES, got, truth, naive):
        if t is None:
            assert g is None, name
            continue
        assert g.dtype == (torch.float32 if name == "dinit" else q.dtype), name
        assert_close_to_reference(g.cpu(), t, dtype=q.dtype, naive=None if nv is None else nv.cpu(), what=name)


# (T, layer, B, with initial state, with final-state gradient): T covers one token, a partial
# chunk, exactly one chunk, one past it, and several chunks; M1 slopes of layers 0, 39, 78 of 80.
FP32_CASES = [(1, 0, 2, True, True), (17, 39, 2, False, True), (64, 78, 1, True, False),
              (65, 0, 2, True, True), (257, 78, 1, True, True), (257, 39, 1, False, False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,layer,B,with_init,with_dfinal", FP32_CASES,
                         ids=[case_id(T=c[0], L=c[1], B=c[2], init=c[3], dfinal=c[4]) for c in FP32_CASES])
def test_backward_fp32(backend, T, layer, B, with_init, with_dfinal, device):
    H, D, DV = 2, 64, 32
    q, k, v, do, init, dfinal = make_inputs(B, T, H, D, DV, torch.float32, device, B, seed=T + layer)
    slopes = m1_slopes(H, layer, device)
    init = init if with_init else None
    dfinal = dfinal if with_dfinal else None
    got = op_grads(q, k, v, slopes, init, None, do, dfinal, backend)
    check_grads(got, q, k, v, slopes, init, None, do, dfinal)


# precision: the forward's (and so the backward's) bf16 product mode on Triton; torch ignores it,
# and so does fp16 (TF32 products on Triton, exact for fp16 values).
LOWP_CASES = [(65, 0, 2, "default", torch.bfloat16), (257, 78, 1, "default", torch.bfloat16),
              (65, 0, 2, "high", torch.bfloat16), (65, 39, 1, "default", torch.float16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,layer,B,precision,dtype", LOWP_CASES,
                         ids=[case_id(T=c[0], L=c[1], B=c[2], p=c[3], dtype=c[4]) for c in LOWP_CASES])
def test_backward_16bit(backend, T, layer, B, precision, dtype, device):
    H, D, DV = 2, 64, 32
    q, k, v, do, init, dfinal = make_inputs(B, T, H, D, DV, dtype, device, B, seed=T)
    slopes = m1_slopes(H, layer, device)
    got = op_grads(q, k, v, slopes, init, None, do, dfinal, backend, precision)
    check_grads(got, q, k, v, slopes, init, None, do, dfinal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_varlen(backend, dtype, device):
    # Length-1 sequences, an empty one (its dinit is its dfinal), one chunk, and one past it.
    lengths = [1, 66, 0, 1, 64, 17]
    H, D, DV = 2, 64, 32
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    q, k, v, do, init, dfinal = make_inputs(1, int(cu[-1]), H, D, DV, dtype, device, len(lengths), seed=3)
    slopes = m1_slopes(H, 39, device)
    got = op_grads(q, k, v, slopes, init, cu, do, dfinal, backend)
    check_grads(got, q, k, v, slopes, init, cu, do, dfinal)
    torch.testing.assert_close(got[3][2].cpu(), dfinal[2].cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_head_dim_128(backend, device):
    H, D, DV, T = 1, 128, 128, 70
    q, k, v, do, init, dfinal = make_inputs(1, T, H, D, DV, torch.float32, device, 1, seed=7)
    slopes = m1_slopes(H, 0, device)
    got = op_grads(q, k, v, slopes, init, None, do, dfinal, backend)
    check_grads(got, q, k, v, slopes, init, None, do, dfinal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_partial_inputs(backend, device):
    """Only some inputs need a gradient; o unused (gradient only through the final state)."""
    H, D, DV, T = 2, 64, 32, 40
    q, k, v, _, init, dfinal = make_inputs(1, T, H, D, DV, torch.float32, device, 1, seed=9)
    slopes = m1_slopes(H, 39, device)
    vl = v.clone().requires_grad_()
    _, final = mk.lightning_attention(q, k, vl, slopes, init, output_final_state=True, backend=backend)
    (final * dfinal).sum().backward()
    zero_do = torch.zeros(1, T, H, DV, device=device)
    truth = fp64_grads(q, k, v, slopes, init, None, zero_do, dfinal)
    assert_close_to_reference(vl.grad.cpu(), truth[2], dtype=torch.float32, what="dv")
    # Gradient only through o, with the final state not requested.
    ql = q.clone().requires_grad_()
    o, none = mk.lightning_attention(ql, k, v, slopes, backend=backend)
    assert none is None
    do = torch.randn_like(o)
    o.backward(do)
    truth = fp64_grads(q, k, v, slopes, None, None, do, None)
    assert_close_to_reference(ql.grad.cpu(), truth[0], dtype=torch.float32, what="dq")


def test_backward_compiles_fullgraph(device):
    """Forward + backward trace into one graph (register_autograd with a backward custom op)."""
    H, D, DV, T = 2, 64, 32, 20
    q, k, v, do, init, dfinal = make_inputs(1, T, H, D, DV, torch.float32, device, 1, seed=11)
    slopes = m1_slopes(H, 0, device)

    def f(q, k, v, init):
        o, final = mk.lightning_attention(q, k, v, slopes, init, output_final_state=True, backend="torch")
        return (o * do).sum() + (final * dfinal).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, f):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, init)]
        fn(*leaves).backward()
        results.append([x.grad for x in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_opcheck(device):
    """torch.library.opcheck: schemas, fakes against real outputs, the autograd registration and
    AOT dispatch of the forward op and of the backward op, with and without states, varlen."""
    H, D, DV, T = 2, 16, 8, 10
    q, k, v, do, init, dfinal = make_inputs(1, T, H, D, DV, torch.float32, device, 2, seed=19)
    slopes = m1_slopes(H, 0, device)
    cu = torch.tensor([0, 3, T], dtype=torch.int32, device=device)
    ops = torch.ops.mm1
    for init_, cu_, df in ((init, cu, dfinal), (None, None, None)):
        init_ = None if init_ is None else init_[: (1 if cu_ is None else 2)]
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        torch.library.opcheck(ops.lightning_attention.default,
                              (*leaves, slopes, init_, cu_, df is not None, "torch", "default"))
        torch.library.opcheck(ops.lightning_attention_backward.default,
                              (do, df, q, k, v, slopes, init_, cu_, init_ is not None, "torch", "default"))
    # Head-major storage ([B, H, T, D] memory viewed as [B, T, H, D], fla's head_first): the
    # fakes must give the ops' contiguous gradients, not the inputs' strides (inductor checks).
    hm = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, do)]
    for backend in ("torch", "triton"):
        torch.library.opcheck(ops.lightning_attention_backward.default,
                              (hm[3], dfinal[:1], hm[0], hm[1], hm[2], slopes, init[:1], None, True, backend,
                               "default"),
                              test_utils=("test_schema", "test_faketensor"))


def test_non_differentiable_paths_refuse_grad(device):
    """The in-place cache paths are inference-only and slopes are constants: a loud error, not
    outputs silently missing a gradient."""
    H, D = 1, 16
    q = torch.rand(1, 3, H, D, device=device, requires_grad=True)
    slopes = m1_slopes(H, 0, device)
    cache = torch.zeros(1, H, D, D, device=device)
    with pytest.raises(RuntimeError, match=r"state_cache.*not differentiable.*q require grad"):
        mk.lightning_attention(q, q.detach(), q.detach(), slopes, state_cache=cache)
    with pytest.raises(RuntimeError, match=r"lightning_decode.*not differentiable.*q require grad"):
        mk.lightning_decode(q[:, 0], q[:, 0].detach(), q[:, 0].detach(), slopes, cache)
    with torch.no_grad():
        mk.lightning_attention(q, q, q, slopes, state_cache=cache)
        mk.lightning_decode(q[:, 0], q[:, 0], q[:, 0], slopes, cache)
    # Slopes are constants: one that requires grad would silently get none.
    with pytest.raises(RuntimeError, match="slopes require grad"):
        mk.lightning_attention(q, q, q, slopes.clone().requires_grad_())


def test_fla_chunk_simple_gla_backward(device):
    """fla's chunk_simple_gla entry (head_first, state_v_first, scale) trains through the op."""
    from mm1_kernels.integrations.fla import chunk_simple_gla
    H, D, DV, T = 2, 16, 16, 20
    q, k, v, do, init, dfinal = make_inputs(1, T, H, D, DV, torch.float32, device, 1, seed=17)
    slopes = m1_slopes(H, 0, device)
    leaves = [x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)]   # [B, H, T, D]
    init_vk = init.transpose(-1, -2).contiguous().requires_grad_()
    o, final = chunk_simple_gla(*leaves, g_gamma=-slopes, scale=1.0, initial_state=init_vk,
                                output_final_state=True, head_first=True, state_v_first=True, backend="torch")
    got = torch.autograd.grad((o, final), leaves + [init_vk], (do.transpose(1, 2), dfinal.transpose(-1, -2)))
    truth = fp64_grads(q, k, v, slopes, init, None, do, dfinal)
    for name, g, t in zip(NAMES, got[:3], truth[:3]):
        assert_close_to_reference(g.transpose(1, 2).cpu(), t, dtype=torch.float32, what=name)
    assert_close_to_reference(got[3].transpose(-1, -2).cpu(), truth[3], dtype=torch.float32, what="dinit")
    with pytest.raises(NotImplementedError, match="g_gamma"):
        chunk_simple_gla(q, k, v, g_gamma=(-slopes).requires_grad_())


def test_triton_backward_segmented(device):
    """Sequences split into segments (local pass, scan, output pass) in both sweep directions,
    with partial last segments and varlen boundaries; bitwise deterministic."""
    from mm1_kernels.lightning.triton_backward import lightning_backward_triton
    segment_len = 64
    lengths = [1, 150, 0, 70]
    H, D, DV = 2, 32, 64
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    q, k, v, do, init, dfinal = make_inputs(1, int(cu[-1]), H, D, DV, torch.float32, device, len(lengths), seed=13)
    slopes = m1_slopes(H, 78, device)
    got = lightning_backward_triton(do, dfinal, q, k, v, slopes, init, cu, segment_len=segment_len)
    check_grads(got, q, k, v, slopes, init, cu, do, dfinal)
    again = lightning_backward_triton(do, dfinal, q, k, v, slopes, init, cu, segment_len=segment_len)
    for name, a, b in zip(NAMES, got, again):
        assert torch.equal(a, b), name


def test_backward_scratch_plan(monkeypatch):
    """The scratch the module docstring states, at M1's shapes on 132 SMs (no kernel runs)."""
    from mm1_kernels.lightning import triton_backward as LB
    from mm1_kernels.lightning import triton_prefill as P
    monkeypatch.setattr(P, "_num_sms", lambda device: 132)
    gpu = torch.device("cuda")
    for T in (1 << 17, 1 << 20):
        assert LB.backward_scratch_bytes(T, 1, 64, 128, 128, gpu) == 0           # 256 programs: no split
        assert LB.backward_scratch_bytes(T, 1, 8, 128, 128, gpu) == 5 * 8 * 128 * 128 * 4   # 2.5 MiB
        assert LB.backward_scratch_bytes(T, 1, 1, 128, 128, gpu) <= P.SCRATCH_BYTES


def test_backward_kernels_compile_for_hopper():
    """The sweep and scan kernels compile for sm_90a at M1's tiles (D = Dv = 128, BZ = 32, the
    launcher's warps), within the register file without spilling in the default bf16 precision,
    with 64-bit head and batch offsets. No GPU needed (tests/triton_aot.py)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    from mm1_kernels.lightning import triton_backward as LB

    from profiles.static.cases import LB_SWEEP_ALIGNED, LB_SWEEP_PTRS
    from triton_aot import compile_cases_in_subprocess

    def sweep(reverse, local, use_seg, mode, final=False, io_t=False):
        return (LB.__name__, "lightning_bwd_sweep_kernel", LB_SWEEP_PTRS,
                dict(C=64, BY=128, BZ=LB._z_tile(128), REVERSE=reverse, IO_T=io_t, LOCAL_PASS=local,
                     USE_SEG_STATE=use_seg, HAS_INIT=True, STORE_FINAL=final, DOT_MODE=mode),
                LB.NUM_WARPS, 3, LB_SWEEP_ALIGNED)

    default, high = LB.BF16_DOT_MODE["default"], LB.BF16_DOT_MODE["high"]
    cases = {"dq": sweep(False, False, False, default, io_t=True), "dv-dinit": sweep(True, False, False, default, True),
             "dk-seg": sweep(True, False, True, default), "local-rev": sweep(True, True, False, default),
             "dv-high": sweep(True, False, False, high, True),
             "scan": (LB.__name__, "lightning_bwd_scan_kernel",
                      dict(slopes_ptr="*fp32", seg_meta_ptr="*i32", seg_state_ptr="*fp32", init_ptr="*fp32",
                           sweep_start_ptr="*i32", sweep_end_ptr="*i32"),
                      dict(BY=128, BZ=32, HAS_INIT=True, IO_T=True), 4, 3,
                      ("seg_state_ptr", "init_ptr", "H", "DY", "DZ"))}
    stats = compile_cases_in_subprocess(cases)
    for name, st in stats.items():
        assert st["registers"] <= 255 and st["shared_bytes"] <= 227 * 1024, (name, st)
        assert st["i32_stride_products"] == 0, (name, st)
    # What a training step launches by default (no dinit wanted) stays (nearly) unspilled.
    for name in ("dq", "dk-seg", "local-rev", "scan"):
        assert stats[name]["spill_bytes"] <= 8, (name, stats[name])
    # dinit wanted (the final store after the loop) and "high": regression guards, not goals.
    for name in ("dv-dinit", "dv-high"):
        assert stats[name]["spill_bytes"] <= 256, (name, stats[name])

"""MoE backward: gradients of ``fused_moe`` and ``moe_route`` against autograd of fp64 loops.

The truth is :func:`loop_moe`, an fp64 loop over tokens and slots written here, independently
of the package's reference and kernels, differentiated by torch autograd. fp32 inputs must
agree to 1e-5 relative (Frobenius), bf16 inputs to 2× the error of the same loop run naively
in bf16 (tests/numerics.py). On the CPU the Triton kernels run through the interpreter, so the
shapes are tiny (hidden 64, I 48, E ≤ 8, T ≤ 40); the same tests compile them on a GPU.
"""
import pytest
import torch
import torch.nn.functional as F

import mm1_kernels as mk
from mm1_kernels._dispatch import triton_interpret_enabled

from numerics import assert_close_to_reference, case_id

HAS_TRITON_DEVICE = torch.cuda.is_available() or triton_interpret_enabled()
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON_DEVICE else [])
HIDDEN, INTER = 64, 48
NAMES = ("x", "w13", "w2", "topk_weights")


def make_experts(E, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * INTER, HIDDEN, generator=g, dtype=torch.float64) / HIDDEN ** 0.5
    w2 = torch.randn(E, HIDDEN, INTER, generator=g, dtype=torch.float64) / INTER ** 0.5
    return w13, w2


def make_inputs(T, E, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, HIDDEN, generator=g, dtype=torch.float64)
    logits = 2.0 * torch.randn(T, E, generator=g, dtype=torch.float64)
    dy = torch.randn(T, HIDDEN, generator=g, dtype=torch.float64)
    return x, logits, dy


def loop_moe(x, w13, w2, topk_weights, topk_ids, expert_map=None):
    """``y[t] = Σ_j w[t, j] · W2[e] (silu(W1[e] x[t]) · W3[e] x[t])``, token by token."""
    inter = w13.shape[1] // 2
    ids = topk_ids.tolist()
    emap = None if expert_map is None else expert_map.tolist()
    out = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j, e in enumerate(ids[t]):
            if emap is not None:
                e = emap[e]
                if e < 0:  # another rank's expert: contributes nothing
                    continue
            gu = w13[e] @ x[t]
            h = F.silu(gu[:inter]) * gu[inter:]
            acc = acc + topk_weights[t, j] * (w2[e] @ h)
        out.append(acc)
    return torch.stack(out)


def loop_grads(dtype, dy, x, w13, w2, topk_weights, topk_ids, expert_map=None, frozen=False):
    """Autograd of :func:`loop_moe` with leaves cast to ``dtype`` (fp64: the truth; the input
    dtype: the naive yardstick). ``frozen`` weights get no gradient (None)."""
    leaves = [t.detach().to(dtype) for t in (x, w13, w2, topk_weights)]
    for i, t in enumerate(leaves):
        t.requires_grad_(not (frozen and i in (1, 2)))
    y = loop_moe(*leaves, topk_ids, expert_map)
    wanted = [t for t in leaves if t.requires_grad]
    got = iter(torch.autograd.grad(y, wanted, dy.to(dtype)))
    return [next(got) if t.requires_grad else None for t in leaves]


def op_grads(backend, dy, x, w13, w2, topk_weights, topk_ids, expert_map=None, frozen=False,
             **kw):
    leaves = [x.detach().clone(), w13.detach().clone(), w2.detach().clone(),
              topk_weights.detach().clone()]
    for i, t in enumerate(leaves):
        t.requires_grad_(t.is_floating_point() and not (frozen and i in (1, 2)))
    y = mk.fused_moe(*leaves, topk_ids, backend=backend, expert_map=expert_map, **kw)
    assert y.dtype == x.dtype
    y.backward(dy.to(y.dtype))
    for t in leaves:
        assert t.grad is None or t.grad.dtype == t.dtype
    return [t.grad for t in leaves]


def check_grads(got, ref, naive, dtype, what=""):
    for name, g, r, n in zip(NAMES, got, ref, naive):
        if r is None:
            assert g is None, f"{what} {name}: got a gradient for a frozen input"
            continue
        assert_close_to_reference(g, r.to(g.device), dtype=dtype,
                                  naive=None if n is None else n.to(g.device),
                                  what=f"{what} d{name}")


def to(device, dtype, *ts):
    return [t.to(device, dtype) for t in ts]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: case_id(d))
def test_grads_match_fp64_loop(backend, dtype, device, poison_outputs):
    """Routed by moe_route, with one expert that receives no token (its weight gradients must
    be exactly zero, not unwritten)."""
    T, E = 37, 8
    x, logits, dy = make_inputs(T, E, seed=3)
    logits[:, 6] = -30.0  # expert 6 is never chosen
    w13, w2 = make_experts(E)
    tw, ids = mk.moe_route(logits.float().to(device), top_k=2, backend=backend)
    assert not bool((ids == 6).any()) and bool((ids == 7).any())
    xd, w13d, w2d, dyd = to(device, dtype, x, w13, w2, dy)
    got = op_grads(backend, dyd, xd, w13d, w2d, tw, ids)
    ids_cpu, tw_cpu = ids.cpu(), tw.cpu()
    ref = loop_grads(torch.float64, dyd.cpu(), xd.cpu(), w13d.cpu(), w2d.cpu(), tw_cpu, ids_cpu)
    naive = (loop_grads(dtype, dyd.cpu(), xd.cpu(), w13d.cpu(), w2d.cpu(), tw_cpu, ids_cpu)
             if dtype != torch.float32 else [None] * 4)
    check_grads(got, ref, naive, dtype)
    assert bool((got[1][6] == 0).all()) and bool((got[2][6] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_when_a_token_sends_both_slots_to_one_expert(backend, device, poison_outputs):
    """Hand-made ids: most tokens send both slots to the same expert, so the two entries of a
    token sit in the same row tile and their dx rows and weight contributions must add up."""
    T, E = 40, 4  # ~27 entries per expert: two row tiles of 16 each
    x, _, dy = make_inputs(T, E, seed=5)
    w13, w2 = make_experts(E, seed=6)
    g = torch.Generator().manual_seed(7)
    first = torch.randint(0, E - 1, (T,), generator=g)  # expert 3 receives nothing
    second = torch.where(torch.arange(T) % 3 == 0, (first + 1) % (E - 1), first)
    ids = torch.stack([first, second], dim=1).to(torch.int32)
    tw = torch.rand(T, 2, generator=g, dtype=torch.float64) + 0.1
    xd, w13d, w2d, dyd, twd = to(device, torch.float32, x, w13, w2, dy, tw)
    got = op_grads(backend, dyd, xd, w13d, w2d, twd, ids.to(device))
    ref = loop_grads(torch.float64, dyd.cpu(), xd.cpu(), w13d.cpu(), w2d.cpu(), twd.cpu(), ids)
    check_grads(got, ref, [None] * 4, torch.float32)
    assert bool((got[1][3] == 0).all()) and bool((got[2][3] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_with_expert_map(backend, device, poison_outputs):
    """Expert parallelism: 8 global experts, 4 on this rank. Slots on other ranks add nothing
    to dx and get a zero topk_weights gradient; summing the ranks' gradients gives the full
    MoE's."""
    T, G = 23, 8
    x, logits, dy = make_inputs(T, G, seed=9)
    w13_all, w2_all = make_experts(G, seed=10)
    tw, ids = mk.moe_route(logits.float(), top_k=2, backend="torch")
    xd, dyd = to(device, torch.float32, x, dy)
    ranks = [[5, 0, 6, 3], [2, 7, 1, 4]]  # local order shuffled
    total = [0, 0, 0, 0]
    for local in ranks:
        emap = torch.full((G,), -1, dtype=torch.int32)
        emap[torch.tensor(local)] = torch.arange(len(local), dtype=torch.int32)
        w13d, w2d = to(device, torch.float32, w13_all[local], w2_all[local])
        got = op_grads(backend, dyd, xd, w13d, w2d, tw.to(device), ids.to(device),
                       expert_map=emap.to(device))
        ref = loop_grads(torch.float64, dyd.cpu(), xd.cpu(), w13d.cpu(), w2d.cpu(), tw, ids,
                         expert_map=emap)
        check_grads(got, ref, [None] * 4, torch.float32, what=f"rank {local}")
        off_rank = emap[ids.long()] < 0
        assert bool((got[3].cpu()[off_rank] == 0).all())
        total = [total[0] + got[0].cpu().double(), total[1], total[2], total[3] + got[3].cpu().double()]
    full = loop_grads(torch.float64, dyd.cpu(), xd.cpu(), w13_all, w2_all, tw, ids)
    assert_close_to_reference(total[0], full[0], dtype=torch.float32, what="Σ ranks dx")
    assert_close_to_reference(total[3], full[3], dtype=torch.float32, what="Σ ranks dtopk_weights")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: case_id(d))
def test_grads_int8_weights(backend, dtype, device, poison_outputs):
    """int8 experts are frozen: gradients for x and topk_weights, through the dequantized
    weights."""
    T, E = 19, 4
    x, logits, dy = make_inputs(T, E, seed=11)
    w13, w2 = make_experts(E, seed=12)
    w13_q, s13, w2_q, s2 = mk.quantize_moe_weights(w13.float(), w2.float())
    deq13 = (w13_q.double() * s13.double()[..., None]).to(dtype)  # what the kernels multiply by
    deq2 = (w2_q.double() * s2.double()[..., None]).to(dtype)
    tw, ids = mk.moe_route(logits.float(), top_k=2, backend="torch")
    xd, dyd = to(device, dtype, x, dy)
    got = op_grads(backend, dyd, xd, w13_q.to(device), w2_q.to(device), tw.to(device),
                   ids.to(device), w13_scale=s13.to(device), w2_scale=s2.to(device))
    assert got[1] is None and got[2] is None
    ref = loop_grads(torch.float64, dyd.cpu(), xd.cpu(), deq13, deq2, tw, ids, frozen=True)
    naive = (loop_grads(dtype, dyd.cpu(), xd.cpu(), deq13, deq2, tw, ids, frozen=True)
             if dtype != torch.float32 else [None] * 4)
    check_grads(got, ref, naive, dtype, what="int8")


def test_int8_scales_requiring_grad_raise(device):
    w13, w2 = make_experts(2)
    w13_q, s13, w2_q, s2 = mk.quantize_moe_weights(w13.float(), w2.float())
    x = torch.randn(3, HIDDEN, device=device, requires_grad=True)
    tw = torch.full((3, 1), 1.0, device=device)
    ids = torch.zeros(3, 1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="w13_scale requires grad.*frozen"):
        mk.fused_moe(x, w13_q.to(device), w2_q.to(device), tw, ids,
                     w13_scale=s13.to(device).requires_grad_(), w2_scale=s2.to(device))
    with torch.no_grad():  # inference with such scales is fine
        mk.fused_moe(x, w13_q.to(device), w2_q.to(device), tw, ids,
                     w13_scale=s13.to(device).requires_grad_(), w2_scale=s2.to(device))


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weights_and_empty_batch(backend, device):
    T, E = 9, 4
    x, logits, dy = make_inputs(T, E, seed=13)
    w13, w2 = make_experts(E, seed=14)
    tw, ids = mk.moe_route(logits.float(), top_k=2, backend="torch")
    xd, w13d, w2d, dyd = to(device, torch.float32, x, w13, w2, dy)
    got = op_grads(backend, dyd, xd, w13d, w2d, tw.to(device), ids.to(device), frozen=True)
    ref = loop_grads(torch.float64, dyd.cpu(), xd.cpu(), w13d.cpu(), w2d.cpu(), tw, ids,
                     frozen=True)
    check_grads(got, ref, [None] * 4, torch.float32, what="frozen")
    got = op_grads(backend, dyd[:0], xd[:0], w13d, w2d, tw[:0].to(device), ids[:0].to(device))
    assert got[0].shape == (0, HIDDEN) and got[3].shape == (0, 2)
    assert bool((got[1] == 0).all()) and bool((got[2] == 0).all())


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
def test_triton_backward_with_many_partial_tiles(device, monkeypatch, poison_outputs):
    """Tiles smaller than the problem and not dividing it (I = 48 over 32-wide column tiles,
    hidden 64 over 16-wide K steps, ...): several column tiles (hence several routing-gradient
    partials per entry), several K trips and output tiles, masked edges, 32-row tiles."""
    from mm1_kernels.moe import triton_backward

    small = dict(BLOCK_M=32, BLOCK_N1=32, BLOCK_K1=16, BLOCK_N2=16, BLOCK_K2=32, BLOCK_P=32,
                 BLOCK_Q=32, GROUP_M=2, num_warps=4, act_warps=4, num_stages=2)
    monkeypatch.setattr(triton_backward, "backward_config", lambda *args: small)
    T, E = 30, 4
    x, logits, dy = make_inputs(T, E, seed=25)
    w13, w2 = make_experts(E, seed=26)
    tw, ids = mk.moe_route(logits.float(), top_k=2, backend="torch")
    xd, w13d, w2d, dyd = to(device, torch.float32, x, w13, w2, dy)
    got = op_grads("triton", dyd, xd, w13d, w2d, tw.to(device), ids.to(device))
    ref = loop_grads(torch.float64, dyd.cpu(), xd.cpu(), w13d.cpu(), w2d.cpu(), tw, ids)
    check_grads(got, ref, [None] * 4, torch.float32, what="small tiles")


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs Triton")
def test_triton_backward_is_deterministic(device):
    T, E = 33, 8
    x, logits, dy = make_inputs(T, E, seed=15)
    w13, w2 = make_experts(E, seed=16)
    tw, ids = mk.moe_route(logits.float().to(device), top_k=2, backend="triton")
    args = to(device, torch.bfloat16, dy, x, w13, w2) + [tw, ids]
    first = op_grads("triton", *args)
    second = op_grads("triton", *args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------------ routing

def route_ref_grad(logits, top_k, renormalize, g):
    """Autograd of softmax → stable sort → top-k → renormalize in fp64."""
    leaf = logits.detach().cpu().double().requires_grad_()
    p = torch.softmax(leaf, dim=-1)
    values, _ = torch.sort(p, dim=-1, descending=True, stable=True)
    w = values[:, :top_k]
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return torch.autograd.grad(w, leaf, g.cpu().double())[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k,renormalize", [(2, True), (2, False), (1, True), (3, False),
                                               (3, True)])
def test_route_grads_match_fp64(backend, top_k, renormalize, device):
    T, E = 29, 8
    _, logits, _ = make_inputs(T, E, seed=17 + top_k)
    logits[:4, 2] = logits[:4, 5]  # exact ties: the lower expert is chosen and differentiated
    logits[4] = 0.5
    logits = logits.float().to(device).requires_grad_()
    tw, ids = mk.moe_route(logits, top_k=top_k, renormalize=renormalize, backend=backend)
    g = torch.randn(T, top_k, generator=torch.Generator().manual_seed(top_k)).to(device)
    (tw * g).sum().backward()
    ref = route_ref_grad(logits, top_k, renormalize, g)
    if top_k == 1 and renormalize:  # the weight is identically 1 (fp64 autograd: ~1e-16)
        assert bool((logits.grad == 0).all()) and float(ref.abs().max()) < 1e-12
        return
    assert_close_to_reference(logits.grad, ref.to(device), dtype=torch.float32, what="dlogits")
    if renormalize:
        chosen = torch.zeros(T, E, dtype=torch.bool).scatter(1, ids.cpu().long(), True)
        assert bool((logits.grad.cpu()[~chosen] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_then_experts_grads(backend, device):
    """The whole block, routed, differentiated w.r.t. the logits through the experts."""
    T, E = 17, 4
    x, logits, dy = make_inputs(T, E, seed=21)
    w13, w2 = make_experts(E, seed=22)
    xd, w13d, w2d, dyd, ld = to(device, torch.float32, x, w13, w2, dy, logits)
    ld.requires_grad_()
    tw, ids = mk.moe_route(ld, top_k=2, backend=backend)
    mk.fused_moe(xd, w13d, w2d, tw, ids, backend=backend).backward(dyd)
    leaf = ld.detach().cpu().double().requires_grad_()
    p = torch.softmax(leaf, dim=-1)
    w = p.gather(1, ids.cpu().long())
    w = w / w.sum(dim=-1, keepdim=True)
    y = loop_moe(xd.cpu().double(), w13d.cpu().double(), w2d.cpu().double(), w, ids.cpu())
    ref = torch.autograd.grad(y, leaf, dyd.cpu().double())[0]
    assert_close_to_reference(ld.grad, ref.to(device), dtype=torch.float32, what="dlogits")


def test_compile_fullgraph_traces_forward_and_backward(device):
    T, E = 8, 4
    x, logits, dy = make_inputs(T, E, seed=23)
    w13, w2 = make_experts(E, seed=24)
    leaves = to(device, torch.float32, x, logits, w13, w2)

    def block(x, logits, w13, w2, dy):
        w, ids = mk.moe_route(logits, top_k=2, backend="torch")
        return (mk.fused_moe(x, w13, w2, w, ids, backend="torch", check_ids=False) * dy).sum()

    grads = []
    for fn in (block, torch.compile(block, fullgraph=True, backend="aot_eager")):
        ls = [t.detach().clone().requires_grad_() for t in leaves]
        fn(*ls, dy.float().to(device)).backward()
        grads.append([t.grad for t in ls])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_fakes_match_the_ops_on_permuted_layouts(device):
    """Dense permuted inputs (expert-minor weight storage, transposed routing tensors): the ops
    return contiguous tensors and the fakes must say so (inductor compares them)."""
    T, E = 6, 4
    x, logits, dy = make_inputs(T, E, seed=31)
    w13, w2 = make_experts(E, seed=32)
    x, logits, dy, w13, w2 = to(device, torch.float32, x, logits, dy, w13, w2)
    w13p = w13.transpose(0, 1).contiguous().transpose(0, 1)   # [E, 2I, H] stored [2I, E, H]
    w2p = w2.transpose(0, 1).contiguous().transpose(0, 1)
    logits_t = logits.t().contiguous().t()
    w, ids = mk.moe_route(logits, top_k=2, backend="torch")
    w_t = w.t().contiguous().t()
    ops = torch.ops.mm1
    checks = ("test_schema", "test_faketensor")
    for backend in BACKENDS:
        torch.library.opcheck(ops.fused_moe.default, (x, w13p, w2p, w_t, ids, None, None, backend, None),
                              test_utils=checks)
        torch.library.opcheck(ops.fused_moe_backward.default,
                              (dy, x, w13p, w2p, w_t, ids, None, None, backend, None, True), test_utils=checks)
        torch.library.opcheck(ops.moe_route_backward.default, (w_t, logits_t, w, ids, True, backend),
                              test_utils=checks)


# ------------------------------------------------------------------------------ sm_90a builds

def test_backward_kernels_compile_for_hopper_without_spills():
    """The backward kernels as launched at M1's shape (T = 4096 bf16: the launches of
    ``profiles.static``'s backward case, so the hints are the JIT's), plus the activation kernel
    with int8 weights and at the 128-row tile of T = 16384, compile for sm_90a without spills."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    # triton_aot first: it puts the repository root (profiles/) on sys.path.
    from triton_aot import compile_cases_in_subprocess  # noqa: I001

    from profiles.static.cases import moe_backward

    cases = {}
    for T in (4096, 16384):
        for launch in moe_backward(T, 9216).launches:
            module, kernel, ptrs, constexprs, warps, stages, aligned = launch.compile
            if not kernel.startswith("moe_bwd") or (T == 16384 and kernel != "moe_bwd_act_kernel"):
                continue
            cases[f"{launch.name} T{T}"] = launch.compile
            if kernel == "moe_bwd_act_kernel" and T == 4096:
                ptrs = {k: "*i8" if k in ("w13_ptr", "w2_ptr") else v for k, v in ptrs.items()}
                cases[f"{launch.name} T{T} int8"] = (module, kernel, ptrs, dict(constexprs, QUANT=True),
                                                warps, stages, aligned)
    assert len(cases) == 7
    for name, stats in compile_cases_in_subprocess(cases).items():
        assert stats["spill_bytes"] == 0, (name, stats)
        assert stats["registers"] <= 255 and stats["shared_bytes"] <= 227 * 1024, (name, stats)

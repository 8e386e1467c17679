"""fused_moe for other engines: expert parallelism (``expert_map``) and padded-stride weights.

The convention is vLLM's (``fused_experts(..., global_num_experts, expert_map)``, its
``moe_align_block_size`` and ``fused_moe_kernel``): ``topk_ids`` hold global ids, ``expert_map``
maps a global id to the index of the expert in this rank's ``w13``/``w2``, -1 when it lives on
another rank, and such a slot contributes exactly zero (vLLM's kernel writes zeros for a -1
expert block before the routing weight is applied; ``moe_sum`` adds the k slots).

Every check is against :func:`loop_reference`, an fp64 loop over tokens and slots written here
independently of the package's reference. Several "ranks" are simulated in one process: each
holds a subset of the experts (in a shuffled local order), runs ``fused_moe`` with its map,
and the outputs summed over ranks must equal the full MoE.
"""
import pytest
import torch
import torch.nn.functional as F
from cuda_graphs import graph_replay_and_eager

import mm1_kernels as mk
from mm1_kernels._dispatch import triton_interpret_enabled

from numerics import assert_close_to_reference, case_id, rel_err

HAS_TRITON_DEVICE = torch.cuda.is_available() or triton_interpret_enabled()
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON_DEVICE else [])
E_GLOBAL, HIDDEN, INTER = 8, 64, 48


def make_experts(E, hidden, inter, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(E, hidden, inter, generator=g) / inter ** 0.5
    return w13.to(device, dtype), w2.to(device, dtype)


def make_tokens(T, E, hidden, dtype, device, seed=1, top_k=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, hidden, generator=g).to(device, dtype)
    logits = (2.0 * torch.randn(T, E, generator=g)).to(device)
    w, ids = mk.moe_route(logits, top_k=top_k, backend="torch")
    return x, w, ids


def loop_reference(x, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None,
                   expert_map=None):
    """fp64, one token and one slot at a time; a slot whose expert maps to -1 is skipped."""
    T, hidden = x.shape
    inter = w13.shape[1] // 2
    out = torch.zeros(T, hidden, dtype=torch.float64)
    x, ids, tw = x.cpu().double(), topk_ids.cpu().tolist(), topk_weights.cpu().double()
    emap = None if expert_map is None else expert_map.cpu().tolist()
    for t in range(T):
        for j, g in enumerate(ids[t]):
            e = g if emap is None else emap[g]
            if e == -1:
                continue
            a, b = w13[e].cpu().double(), w2[e].cpu().double()
            if w13_scale is not None:
                a = a * w13_scale[e].cpu().double()[:, None]
                b = b * w2_scale[e].cpu().double()[:, None]
            gu = a @ x[t]
            out[t] += tw[t, j] * (b @ (F.silu(gu[:inter]) * gu[inter:]))
    return out


def naive_bf16(x, w13, w2, topk_weights, topk_ids, expert_map=None):
    """The same computation plainly in the input dtype (the 2×-naive yardstick)."""
    inter = w13.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            g = int(topk_ids[t, j])
            e = g if expert_map is None else int(expert_map[g])
            if e < 0:
                continue
            gu = w13[e] @ x[t]
            out[t] += (w2[e] @ (F.silu(gu[:inter]) * gu[inter:])) * topk_weights[t, j].to(x.dtype)
    return out


def split_experts(E, ranks, seed=3):
    """Global experts dealt to ranks in a shuffled order, each rank's local order shuffled too
    (so the map is not an offset). Returns per rank ``(global ids in local order, map [E])``."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(E, generator=g)
    out = []
    for r in range(ranks):
        mine = perm[r::ranks]
        mine = mine[torch.randperm(len(mine), generator=g)]
        emap = torch.full((E,), -1, dtype=torch.int32)
        emap[mine] = torch.arange(len(mine), dtype=torch.int32)
        out.append((mine, emap))
    return out


def rank_weights(w13, w2, mine, scales=None):
    if scales is None:
        return w13[mine], w2[mine], {}
    s13, s2 = scales
    return w13[mine], w2[mine], dict(w13_scale=s13[mine], w2_scale=s2[mine])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: case_id(d))
@pytest.mark.parametrize("ranks,top_k,T", [(2, 2, 19), (4, 2, 40), (4, 3, 7)],
                         ids=lambda v: str(v))
def test_ranks_sum_to_the_full_moe(backend, dtype, ranks, top_k, T, device, poison_outputs):
    w13, w2 = make_experts(E_GLOBAL, HIDDEN, INTER, dtype, device)
    x, tw, ids = make_tokens(T, E_GLOBAL, HIDDEN, dtype, device, seed=T + ranks, top_k=top_k)
    full_ref = loop_reference(x, w13, w2, tw, ids)
    total = torch.zeros(T, HIDDEN, dtype=torch.float64)
    naive_total = torch.zeros(T, HIDDEN, dtype=dtype)
    for mine, emap in split_experts(E_GLOBAL, ranks):
        l13, l2, _ = rank_weights(w13, w2, mine.to(device))
        emap = emap.to(device)
        out = mk.fused_moe(x, l13, l2, tw, ids, backend=backend, expert_map=emap)
        assert out.dtype == dtype and out.shape == (T, HIDDEN)
        rank_ref = loop_reference(x, l13, l2, tw, ids, expert_map=emap)
        naive = naive_bf16(x, l13, l2, tw, ids, emap) if dtype == torch.bfloat16 else None
        # A rank may hold no expert of a token: those rows are exactly zero, on their own.
        assert_close_to_reference(out, rank_ref, dtype=dtype, naive=naive, what="one rank")
        total += out.double().cpu()
        if naive is not None:
            naive_total += naive
    naive = naive_total if dtype == torch.bfloat16 else None
    assert_close_to_reference(total, full_ref, dtype=dtype, naive=naive, what="sum over ranks")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_non_local_rows_are_exactly_zero(backend, device, poison_outputs):
    """Tokens whose every expert is elsewhere give +0 exactly, whatever their weights (vLLM
    writes zeros before the routing weight is applied), and cost the local GEMMs nothing."""
    T = 9
    w13, w2 = make_experts(E_GLOBAL, HIDDEN, INTER, torch.float32, device)
    x, tw, ids = make_tokens(T, E_GLOBAL, HIDDEN, torch.float32, device)
    mine = torch.tensor([5, 1])                      # local 0 = global 5, local 1 = global 1
    emap = torch.full((E_GLOBAL,), -1, dtype=torch.int32)
    emap[mine] = torch.tensor([0, 1], dtype=torch.int32)
    ids = ids.clone()
    ids[0] = torch.tensor([0, 2])                    # neither local
    ids[3] = torch.tensor([7, 6])                    # neither local
    ids[4] = torch.tensor([3, 5])                    # one local
    tw = tw.clone()
    tw[0] = float("nan")                             # never read: the slot is not local
    tw[3] = float("inf")
    tw[4, 0] = float("nan")
    l13, l2 = w13[mine.to(device)], w2[mine.to(device)]
    out = mk.fused_moe(x, l13, l2, tw, ids, backend=backend, expert_map=emap.to(device))
    local = torch.isin(ids.cpu().long(), mine).any(dim=1)
    assert not bool(local[[0, 3]].any()) and bool(local[4])
    zero_rows = out[~local.to(out.device)]
    assert torch.equal(zero_rows, torch.zeros_like(zero_rows))
    assert not bool(torch.signbit(zero_rows).any())  # +0, not -0
    assert_close_to_reference(out[local], loop_reference(x, l13, l2, tw, ids, expert_map=emap)[local],
                              dtype=torch.float32, what="rows with a local expert")

    # A rank that holds none of the experts the batch picked: the whole output is +0.
    none = torch.full((E_GLOBAL,), -1, dtype=torch.int32, device=device)
    out = mk.fused_moe(x, l13, l2, tw, ids, backend=backend, expert_map=none)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_and_duplicated_experts(backend, device, poison_outputs):
    """Equal router probabilities (the lower global id wins), one expert picked twice by a
    token, and two global ids mapped to one local expert (a replicated expert)."""
    T = 6
    w13, w2 = make_experts(E_GLOBAL, HIDDEN, INTER, torch.float32, device)
    x, _, _ = make_tokens(T, E_GLOBAL, HIDDEN, torch.float32, device)
    logits = torch.zeros(T, E_GLOBAL, device=device)
    logits[:, [2, 6]] = 3.0                          # a tie between experts 2 and 6
    logits[1, :] = 0.0                               # all tied: experts 0 and 1
    tw, ids = mk.moe_route(logits, top_k=2, backend=backend)
    assert ids[0].tolist() == [2, 6] and ids[1].tolist() == [0, 1]
    ids, tw = ids.clone(), tw.clone()
    ids[2] = torch.tensor([6, 6])                    # duplicated expert: both slots count
    ids[3] = torch.tensor([2, 2])
    tw[2] = torch.tensor([0.75, 0.25])
    for mine in (torch.tensor([6, 0]), torch.tensor([2, 1, 6])):
        emap = torch.full((E_GLOBAL,), -1, dtype=torch.int32)
        emap[mine] = torch.arange(len(mine), dtype=torch.int32)
        l13, l2 = w13[mine.to(device)], w2[mine.to(device)]
        out = mk.fused_moe(x, l13, l2, tw, ids, backend=backend, expert_map=emap.to(device))
        ref = loop_reference(x, l13, l2, tw, ids, expert_map=emap)
        assert_close_to_reference(out, ref, dtype=torch.float32)
    # Global 3 and 4 both served by local expert 0 (vLLM's EPLB keeps replicas this way).
    emap = torch.tensor([-1, -1, -1, 0, 0, -1, -1, 1], dtype=torch.int32)
    l13, l2 = w13[[3, 7]], w2[[3, 7]]
    ids = torch.tensor([[3, 4], [4, 7], [0, 4], [1, 2], [7, 3], [4, 4]], dtype=torch.int32)
    ids = ids.to(device)
    out = mk.fused_moe(x, l13, l2, tw, ids, backend=backend, expert_map=emap.to(device))
    assert_close_to_reference(out, loop_reference(x, l13, l2, tw, ids, expert_map=emap),
                              dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: case_id(d))
def test_int8_experts_with_expert_map(backend, dtype, device, poison_outputs):
    T, ranks = 13, 2
    w13, w2 = make_experts(E_GLOBAL, HIDDEN, INTER, torch.float32, device)
    q13, s13, q2, s2 = mk.quantize_moe_weights(w13, w2)
    x, tw, ids = make_tokens(T, E_GLOBAL, HIDDEN, dtype, device, seed=5)
    total = torch.zeros(T, HIDDEN, dtype=torch.float64)
    naive_total = torch.zeros(T, HIDDEN, dtype=dtype)
    for mine, emap in split_experts(E_GLOBAL, ranks, seed=7):
        l13, l2, sc = rank_weights(q13, q2, mine.to(device), (s13, s2))
        emap = emap.to(device)
        out = mk.fused_moe(x, l13, l2, tw, ids, backend=backend, expert_map=emap, **sc)
        ref = loop_reference(x, l13, l2, tw, ids, expert_map=emap, **sc)
        naive = None
        if dtype == torch.bfloat16:
            d13 = (l13.float() * sc["w13_scale"][..., None]).to(dtype)
            d2 = (l2.float() * sc["w2_scale"][..., None]).to(dtype)
            naive = naive_bf16(x, d13, d2, tw, ids, emap)
            naive_total += naive
        assert_close_to_reference(out, ref, dtype=dtype, naive=naive, what="one rank")
        total += out.double().cpu()
    full = loop_reference(x, q13, q2, tw, ids, s13, s2)
    assert_close_to_reference(total, full, dtype=dtype,
                              naive=naive_total if dtype == torch.bfloat16 else None)


def _padded(t, pad, expert_major=True):
    """A view of ``t`` whose rows are padded by ``pad`` elements (like ``buf[..., :n]``) and,
    with ``expert_major=False``, whose experts are interleaved (expert stride < row stride)."""
    E, rows, cols = t.shape
    if expert_major:
        buf = torch.full((E, rows, cols + pad), float("nan") if t.is_floating_point() else 99,
                         dtype=t.dtype, device=t.device)
        view = buf[..., :cols]
    else:
        buf = torch.full((rows, E, cols + pad), float("nan") if t.is_floating_point() else 99,
                         dtype=t.dtype, device=t.device)
        view = buf[..., :cols].transpose(0, 1)
    view.copy_(t)
    assert view.stride(-1) == 1 and not view.is_contiguous()
    return view


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quant", [False, True], ids=["bf16", "int8"])
@pytest.mark.parametrize("expert_major", [True, False], ids=["padded-rows", "interleaved-experts"])
def test_padded_stride_weights_are_bitwise_the_contiguous_result(backend, quant, expert_major,
                                                                  device, poison_outputs):
    T = 11
    w13, w2 = make_experts(E_GLOBAL, HIDDEN, INTER, torch.bfloat16, device)
    x, tw, ids = make_tokens(T, E_GLOBAL, HIDDEN, torch.bfloat16, device, seed=11)
    kw = {}
    if quant:
        w13, s13, w2, s2 = mk.quantize_moe_weights(w13, w2)
        kw = dict(w13_scale=s13, w2_scale=s2)
    mine, emap = split_experts(E_GLOBAL, 2)[1]
    for emap_kw in ({}, dict(expert_map=emap.to(device))):
        if emap_kw:
            l13, l2 = w13[mine.to(device)], w2[mine.to(device)]
            lkw = {k: v[mine.to(device)] for k, v in kw.items()}
        else:
            l13, l2, lkw = w13, w2, kw
        want = mk.fused_moe(x, l13, l2, tw, ids, backend=backend, **lkw, **emap_kw)
        p13, p2 = _padded(l13, 16, expert_major), _padded(l2, 8, expert_major)
        scale_layouts = [{}]
        if quant:
            # Scales with padded rows, and transposed with padding (non-unit last stride), each
            # layout once for w13's and once for w2's.
            def rows_padded(s):
                buf = torch.full((s.shape[0], s.shape[1] + 5), float("nan"), device=device)
                return buf[:, :s.shape[1]].copy_(s)

            def transposed(s):
                buf = torch.full((s.shape[1], s.shape[0] + 3), float("nan"), device=device)
                out = buf[:, :s.shape[0]].t().copy_(s)
                assert out.stride() == (1, s.shape[0] + 3)
                return out
            s13, s2 = lkw["w13_scale"], lkw["w2_scale"]
            scale_layouts = [dict(w13_scale=rows_padded(s13), w2_scale=transposed(s2)),
                             dict(w13_scale=transposed(s13), w2_scale=rows_padded(s2))]
        for pkw in scale_layouts:
            got = mk.fused_moe(x, p13, p2, tw, ids, backend=backend, **pkw, **emap_kw)
            assert torch.equal(got, want)


def test_padded_weights_are_not_copied(device, monkeypatch):
    """The Triton path hands the kernels the caller's storage (no .contiguous() copy)."""
    if "triton" not in BACKENDS:
        pytest.skip("no Triton device")
    from mm1_kernels.moe import triton_fused_moe as f
    w13, w2 = make_experts(4, HIDDEN, INTER, torch.float32, device)
    p13, p2 = _padded(w13, 16), _padded(w2, 8)
    x, tw, ids = make_tokens(3, 4, HIDDEN, torch.float32, device)
    seen = {}
    real = f.fused_moe_triton

    def spy(x, w13, w2, *args, **kwargs):
        seen["ptrs"] = (w13.data_ptr(), w13.stride(), w2.data_ptr(), w2.stride())
        return real(x, w13, w2, *args, **kwargs)

    monkeypatch.setattr(f, "fused_moe_triton", spy)
    mk.fused_moe(x, p13, p2, tw, ids, backend="triton")
    assert seen["ptrs"] == (p13.data_ptr(), p13.stride(), p2.data_ptr(), p2.stride())


@pytest.mark.parametrize("make_map,match", [
    pytest.param(lambda m, E: m.clone().fill_(E), r"expert_map must be in \[0, 2\)", id="value-E"),
    pytest.param(lambda m, E: torch.where(m < 0, -2, m).to(m.dtype), r"expert_map must be in", id="value-minus2"),
    pytest.param(lambda m, E: m.float(), "expert_map must have dtype", id="float"),
    pytest.param(lambda m, E: m[None], "expert_map must have 1 dimensions", id="2d"),
    pytest.param(lambda m, E: m[:0], "expert_map must have one entry per global expert", id="empty"),
    pytest.param(lambda m, E: m[:3], r"topk_ids must be in \[0, 3\) \(global expert ids: the length "
                 r"of expert_map\)", id="ids-past-map"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_expert_map_is_refused(make_map, match, backend, device):
    E_local = 2
    w13, w2 = make_experts(E_local, HIDDEN, INTER, torch.float32, device)
    x, tw, ids = make_tokens(4, E_GLOBAL, HIDDEN, torch.float32, device)
    ids = ids.clone()
    ids[0] = torch.tensor([7, 3])
    emap = torch.full((E_GLOBAL,), -1, dtype=torch.int32, device=device)
    emap[3], emap[5] = 0, 1
    with pytest.raises((ValueError, TypeError), match=match):
        mk.fused_moe(x, w13, w2, tw, ids, backend=backend, expert_map=make_map(emap, E_local))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_map_unchecked_gives_nan_rows_only(backend, device):
    """With the host check skipped (graph capture, compile) a bad id or map value poisons only
    its own token, never reads out of bounds; a -1 still contributes zero."""
    T = 6
    w13, w2 = make_experts(2, HIDDEN, INTER, torch.float32, device)
    x, tw, ids = make_tokens(T, E_GLOBAL, HIDDEN, torch.float32, device)
    emap = torch.full((E_GLOBAL,), -1, dtype=torch.int32)
    emap[3], emap[5], emap[6] = 0, 1, 2              # 2 is not a local expert
    ids = torch.tensor([[3, 5],
                        [6, 3],                      # a bad map value
                        [3, E_GLOBAL],               # an id past the map
                        [0, 1],                      # nothing local: zero, not NaN
                        [-1, 5],                     # a negative id
                        [5, 3]], dtype=ids.dtype, device=device)
    out = mk.fused_moe(x, w13, w2, tw, ids, backend=backend, check_ids=False,
                       expert_map=emap.to(device))
    bad = torch.zeros(T, dtype=torch.bool)
    bad[[1, 2, 4]] = True
    assert bool(out[bad].isnan().all()) and bool(out[~bad].isfinite().all())


def test_backends_agree_and_compile_with_expert_map(device):
    if "triton" not in BACKENDS:
        pytest.skip("no Triton device")
    T = 10
    w13, w2 = make_experts(E_GLOBAL, HIDDEN, INTER, torch.float32, device)
    x, tw, ids = make_tokens(T, E_GLOBAL, HIDDEN, torch.float32, device, seed=2)
    mine, emap = split_experts(E_GLOBAL, 4)[2]
    l13, l2, emap = w13[mine.to(device)], w2[mine.to(device)], emap.to(device)

    def block(x, tw, ids, backend):
        return mk.fused_moe(x, l13, l2, tw, ids, backend=backend, expert_map=emap)

    a = block(x, tw, ids, "triton")
    assert torch.equal(a, block(x, tw, ids, "triton"))  # deterministic
    assert rel_err(a, block(x, tw, ids, "torch")) <= 1e-5
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for backend in BACKENDS:
        torch.testing.assert_close(compiled(x, tw, ids, backend), block(x, tw, ids, backend))


@pytest.mark.gpu
def test_expert_parallel_decode_captures_in_a_cuda_graph():
    """The map is applied on the device: the EP decode step records into a CUDA graph."""
    E, T, hidden, inter = 32, 8, 256, 128
    w13, w2 = make_experts(E, hidden, inter, torch.bfloat16, "cuda")
    mine, emap = split_experts(E, 4)[0]
    l13, l2, emap = w13[mine.cuda()], w2[mine.cuda()], emap.cuda()
    x, tw, ids = make_tokens(T, E, hidden, torch.bfloat16, "cuda")

    def step():
        return mk.fused_moe(x, l13, l2, tw, ids, backend="triton", check_ids=False, expert_map=emap)

    out, expected = graph_replay_and_eager(step)
    assert torch.equal(out, expected)

"""MoE: routing and fused experts against the fp64 reference, on every backend that can run.

On the CPU the Triton kernels run through TRITON_INTERPRET=1 (conftest), so shapes are small
(hidden 64, I 64-96); the same tests compile the kernels on a GPU. Errors are relative
Frobenius errors ‖out − ref‖ / ‖ref‖ against ``fused_moe_reference`` in fp64.
"""
import pytest
import torch
import torch.nn.functional as F
from cuda_graphs import graph_replay_and_eager

import mm1_kernels as mk
from mm1_kernels._dispatch import triton_interpret_enabled
from mm1_kernels.moe import tile_configs
from mm1_kernels.moe.triton_fused_moe import fit_stages, moe_align, moe_config

from numerics import assert_close_to_reference, case_id, rel_err

HAS_TRITON_DEVICE = torch.cuda.is_available() or triton_interpret_enabled()
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON_DEVICE else [])


def make_experts(E, hidden, inter, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Realistic magnitudes: unit-RMS activations, weights scaled so each GEMM keeps unit RMS.
    w13 = torch.randn(E, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(E, hidden, inter, generator=g) / inter ** 0.5
    return w13.to(device, dtype), w2.to(device, dtype)


def make_tokens(T, E, hidden, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, hidden, generator=g).to(device, dtype)
    logits = (2.0 * torch.randn(T, E, generator=g)).to(device)
    return x, logits


def naive_same_precision(x, w13, w2, topk_weights, topk_ids):
    """The block done plainly in the input dtype: the "2× naive error" yardstick."""
    inter = w13.shape[1] // 2
    out = torch.zeros_like(x)
    for j in range(topk_ids.shape[1]):
        for e in topk_ids[:, j].unique().tolist():
            m = topk_ids[:, j] == e
            gu = x[m] @ w13[e].t()
            h = F.silu(gu[:, :inter]) * gu[:, inter:]
            out[m] += (h @ w2[e].t()) * topk_weights[m, j, None].to(x.dtype)
    return out


# ----------------------------------------------------------------------------------- routing

def check_route(w, ids, logits, top_k, renormalize):
    """Equal to softmax → topk → renormalize in fp64 up to ties between probabilities."""
    T, E = logits.shape
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == ids.shape == (T, top_k)
    p = torch.softmax(logits.double().cpu(), dim=-1)
    ref_w, ref_ids = mk.moe_route_reference(logits.double().cpu(), top_k, renormalize)
    ids = ids.cpu().long()
    assert bool(((ids >= 0) & (ids < E)).all())
    # The chosen experts carry the top-k probabilities (an exchange between tied experts is fine)…
    torch.testing.assert_close(p.gather(1, ids), p.gather(1, ref_ids), rtol=1e-6, atol=1e-7)
    # …are distinct, and where no near-tie makes the choice ambiguous, they are the reference's.
    assert bool((ids.sort(dim=1).values.diff(dim=1) != 0).all()) if top_k > 1 else True
    torch.testing.assert_close(w.cpu().double(), ref_w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E", [4, 8, 32], ids=lambda e: f"E{e}")
@pytest.mark.parametrize("T", [1, 3, 64, 257], ids=lambda t: f"T{t}")
def test_route_matches_fp64(backend, E, T, device):
    _, logits = make_tokens(T, E, 8, torch.float32, device, seed=T * 100 + E)
    w, ids = mk.moe_route(logits, top_k=2, renormalize=True, backend=backend)
    check_route(w, ids, logits, 2, True)
    # For top-2 the renormalized weight is sigmoid(l1 - l2).
    l_sel = logits.double().gather(1, ids.long())
    torch.testing.assert_close(w[:, 0].double(), torch.sigmoid(l_sel[:, 0] - l_sel[:, 1]),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k,renormalize", [(1, True), (3, False), (8, True)])
def test_route_top_k_and_renormalize(backend, top_k, renormalize, device):
    _, logits = make_tokens(37, 8, 8, torch.float32, device, seed=top_k)
    w, ids = mk.moe_route(logits, top_k=top_k, renormalize=renormalize, backend=backend)
    check_route(w, ids, logits, top_k, renormalize)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_exact_ties_go_to_lower_index(backend, device):
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0],      # all tied: experts 0, 1
                           [0.0, 3.0, 3.0, 3.0],      # three tied winners: 1, 2
                           [5.0, 2.0, 2.0, 5.0],      # tie for first: 0 then 3
                           [-1.0, 4.0, 0.0, 4.0],     # 1, 3
                           [2.0, 7.0, 2.0, 2.0]],     # 1, then the lowest of three: 0
                          device=device)
    w, ids = mk.moe_route(logits, top_k=2, backend=backend)
    assert ids.cpu().tolist() == [[0, 1], [1, 2], [0, 3], [1, 3], [1, 0]]
    torch.testing.assert_close(w[:4].cpu(), torch.full((4, 2), 0.5))
    check_route(w, ids, logits, 2, True)


def test_route_backends_agree_bitwise_on_ids_and_are_deterministic(device):
    if "triton" not in BACKENDS:
        pytest.skip("no Triton device")
    _, logits = make_tokens(257, 32, 8, torch.float32, device, seed=7)
    logits[:, 5] = logits[:, 9]  # exact ties in every row
    w1, i1 = mk.moe_route(logits, backend="triton")
    w2, i2 = mk.moe_route(logits, backend="triton")
    assert torch.equal(w1, w2) and torch.equal(i1, i2)
    wt, it = mk.moe_route(logits, backend="torch")
    assert torch.equal(i1, it)
    torch.testing.assert_close(w1, wt, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------- permutation metadata

@pytest.mark.skipif(not HAS_TRITON_DEVICE, reason="needs Triton")
@pytest.mark.parametrize("T,E,k,block_m", [
    pytest.param(T, E, k, bm, id=case_id(T=T, E=E, k=k, BM=bm))
    for T, E, k, bm in [(1, 32, 2, 16), (3, 8, 2, 16), (257, 4, 2, 64), (64, 32, 2, 16), (50, 8, 3, 16)]])
def test_moe_align_metadata(T, E, k, block_m, device):
    g = torch.Generator().manual_seed(T + E)
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    if T >= 50:
        ids[: T // 2] = 1  # a heavy expert spanning several tiles
    if T >= 3:  # out-of-range ids (unchecked under graph capture) must never be placed
        ids[1, 0], ids[2, k - 1] = E, -1
    sorted_ids, block_expert, max_blocks = moe_align(ids.to(device), E, block_m)
    sorted_ids, block_expert = sorted_ids.cpu().long(), block_expert.cpu().long()
    n = T * k
    flat = ids.reshape(-1).long()
    assert bool(((block_expert >= -1) & (block_expert < E)).all())
    counts = torch.bincount(flat[(flat >= 0) & (flat < E)], minlength=E)
    padded = (counts + block_m - 1) // block_m * block_m
    total = int(padded.sum())
    assert max_blocks * block_m >= total
    start = 0
    for e in range(E):
        seg = sorted_ids[start:start + padded[e]]
        # The expert's entries in ascending order, then sentinels.
        assert seg[:counts[e]].tolist() == torch.nonzero(flat == e).flatten().tolist()
        assert bool((seg[counts[e]:] == n).all())
        assert bool((block_expert[start // block_m:(start + padded[e]) // block_m] == e).all())
        start += int(padded[e])
    assert bool((sorted_ids[total:] == n).all())
    assert bool((block_expert[total // block_m:] == -1).all())


# ------------------------------------------------------------------------------ fused experts

SLOW = [pytest.mark.slow]
FUSED_CASES = [  # (E, T, hidden, inter)
    pytest.param(E, T, hidden, inter, id=case_id(E=E, T=T, K=hidden, I=inter), marks=SLOW if E * T > 8000 else [])
    for E, T, hidden, inter in [(4, 1, 64, 64), (8, 3, 64, 96), (32, 64, 64, 64), (4, 257, 64, 64),
                                (32, 257, 64, 64)]]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,T,hidden,inter", FUSED_CASES)
def test_fused_moe_matches_fp64(backend, dtype, E, T, hidden, inter, device, poison_outputs):
    w13, w2 = make_experts(E, hidden, inter, dtype, device)
    x, logits = make_tokens(T, E, hidden, dtype, device, seed=T + E)
    topk_w, topk_ids = mk.moe_route(logits, backend=backend)
    out = mk.fused_moe(x, w13, w2, topk_w, topk_ids, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    ref = mk.fused_moe_reference(x.double(), w13.double(), w2.double(), topk_w.double(), topk_ids)
    naive = None if dtype == torch.float32 else naive_same_precision(x, w13, w2, topk_w, topk_ids)
    assert_close_to_reference(out, ref, naive=naive)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["one_expert", "empty_experts", "ties", "fp16_int64_ids"])
def test_fused_moe_routing_edge_cases(backend, case, device, poison_outputs):
    dtype = torch.float16 if case == "fp16_int64_ids" else torch.bfloat16
    E, T, hidden, inter = (32, 3, 64, 64) if case == "empty_experts" else (8, 40, 64, 64)
    w13, w2 = make_experts(E, hidden, inter, dtype, device, seed=3)
    x, logits = make_tokens(T, E, hidden, dtype, device, seed=4)
    if case == "one_expert":      # every token's both slots land on expert 5 (top-2 of two copies)
        topk_ids = torch.full((T, 2), 5, dtype=torch.int32, device=device)
        topk_w = torch.rand(T, 2, device=device)
    else:
        if case == "ties":
            logits = torch.zeros(T, E, device=device)
            logits[::2, 3] = 1.0      # even rows: 3 then the lowest tied 0; odd rows: 0 and 1
        topk_w, topk_ids = mk.moe_route(logits, backend=backend)
        if case == "ties":
            assert topk_ids[0].tolist() == [3, 0] and topk_ids[1].tolist() == [0, 1]
        if case == "fp16_int64_ids":
            topk_ids = topk_ids.long()
    out = mk.fused_moe(x, w13, w2, topk_w, topk_ids, backend=backend)
    ref = mk.fused_moe_reference(x.double(), w13.double(), w2.double(), topk_w.double(), topk_ids)
    if case == "empty_experts":
        assert len(topk_ids.unique()) < E
    assert_close_to_reference(out, ref, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,E,T", [pytest.param(d, E, T, id=case_id(E=E, T=T, dtype=d, w="int8"),
                                                    marks=SLOW if E * T > 8000 else [])
                                       for d, E, T in [(torch.bfloat16, 8, 3), (torch.bfloat16, 32, 257),
                                                       (torch.float32, 4, 64)]])
def test_fused_moe_int8_matches_dequantized_reference(backend, dtype, E, T, device, poison_outputs):
    hidden, inter = 64, 96
    w13, w2 = make_experts(E, hidden, inter, torch.float32, device, seed=5)
    w13[1, 7] = 0.0  # an all-zero channel: scale 0 must dequantize to 0, not NaN
    w13_q, w13_s, w2_q, w2_s = mk.quantize_moe_weights(w13, w2)
    assert w13_q.dtype == w2_q.dtype == torch.int8
    assert w13_s.shape == (E, 2 * inter) and w2_s.shape == (E, hidden)
    assert w13_s.dtype == w2_s.dtype == torch.float32
    # Quantization itself: within half a step of the original weights.
    assert bool(((mk.dequantize_moe_weight(w13_q, w13_s) - w13).abs()
                 <= 0.5 * w13_s[..., None] + 1e-7).all())
    x, logits = make_tokens(T, E, hidden, dtype, device, seed=6)
    topk_w, topk_ids = mk.moe_route(logits, backend=backend)
    out = mk.fused_moe(x, w13_q, w2_q, topk_w, topk_ids, w13_scale=w13_s, w2_scale=w2_s,
                       backend=backend)
    assert out.dtype == dtype
    ref = mk.fused_moe_reference(x.double(), mk.dequantize_moe_weight(w13_q, w13_s, torch.float64),
                                 mk.dequantize_moe_weight(w2_q, w2_s, torch.float64),
                                 topk_w.double(), topk_ids)
    assert_close_to_reference(out, ref, dtype=dtype)


def test_fused_moe_deterministic_and_backends_agree(device):
    if "triton" not in BACKENDS:
        pytest.skip("no Triton device")
    E, T, hidden, inter = 8, 64, 64, 64
    w13, w2 = make_experts(E, hidden, inter, torch.bfloat16, device, seed=8)
    x, logits = make_tokens(T, E, hidden, torch.bfloat16, device, seed=9)
    topk_w, topk_ids = mk.moe_route(logits)
    a = mk.fused_moe(x, w13, w2, topk_w, topk_ids, backend="triton")
    b = mk.fused_moe(x, w13, w2, topk_w, topk_ids, backend="triton")
    assert torch.equal(a, b)
    # A token's output does not depend on the rest of the batch (rows are computed independently)
    # as long as both batch sizes get the same tiles, as T = 5 and 64 do at these widths; tiles
    # follow T's bucket (moe_config), so across buckets the last bits may differ.
    c = mk.fused_moe(x[:5], w13, w2, topk_w[:5], topk_ids[:5], backend="triton")
    assert torch.equal(a[:5], c)
    t = mk.fused_moe(x, w13, w2, topk_w, topk_ids, backend="torch")
    assert rel_err(a, t.double()) <= 1e-2


def test_fused_moe_bad_ids_unchecked_give_nan_rows(device):
    """With the host check skipped (graph capture, compile) a bad id poisons only its token."""
    if "triton" not in BACKENDS:
        pytest.skip("no Triton device")
    E, T, hidden, inter = 4, 6, 64, 64
    w13, w2 = make_experts(E, hidden, inter, torch.float32, device)
    x, logits = make_tokens(T, E, hidden, torch.float32, device)
    topk_w, topk_ids = mk.moe_route(logits)
    topk_ids[2, 1] = E
    topk_ids[4, 0] = -1
    out = mk.fused_moe(x, w13, w2, topk_w, topk_ids, backend="triton", check_ids=False)
    bad = torch.zeros(T, dtype=torch.bool)
    bad[[2, 4]] = True
    assert bool(out[bad].isnan().all()) and bool(out[~bad].isfinite().all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, device):
    w13, w2 = make_experts(4, 64, 64, torch.float32, device)
    x = torch.zeros(0, 64, device=device)
    w, ids = mk.moe_route(torch.zeros(0, 4, device=device), backend=backend)
    assert w.shape == ids.shape == (0, 2)
    assert mk.fused_moe(x, w13, w2, w, ids, backend=backend).shape == (0, 64)


def test_compile_fullgraph(device):
    E, T, hidden, inter = 4, 5, 64, 64
    w13, w2 = make_experts(E, hidden, inter, torch.float32, device)
    x, logits = make_tokens(T, E, hidden, torch.float32, device)

    def block(x, logits, backend):
        w, ids = mk.moe_route(logits, top_k=2, backend=backend)
        return mk.fused_moe(x, w13, w2, w, ids, backend=backend)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for backend in BACKENDS:
        torch.testing.assert_close(compiled(x, logits, backend), block(x, logits, backend))


# ---------------------------------------------------------------------------- argument checks

def test_invalid_arguments_raise(device):
    E, T, hidden, inter = 4, 3, 16, 8
    w13, w2 = make_experts(E, hidden, inter, torch.float32, device)
    x, logits = make_tokens(T, E, hidden, torch.float32, device)
    w, ids = mk.moe_route(logits)
    cases = [
        (TypeError, lambda: mk.moe_route(logits.long())),
        (ValueError, lambda: mk.moe_route(logits[0])),
        (ValueError, lambda: mk.moe_route(logits, top_k=5)),
        (ValueError, lambda: mk.moe_route(logits, top_k=0)),
        (TypeError, lambda: mk.moe_route(logits, top_k=2.0)),
        (ValueError, lambda: mk.moe_route(logits, backend="nope")),
        (TypeError, lambda: mk.fused_moe(x.bfloat16(), w13, w2, w, ids)),        # dtype mismatch
        (TypeError, lambda: mk.fused_moe(x, w13, w2.bfloat16(), w, ids)),
        (ValueError, lambda: mk.fused_moe(x[:, :8], w13, w2, w, ids)),            # hidden mismatch
        (ValueError, lambda: mk.fused_moe(x, w13, w2[:3], w, ids)),               # expert counts
        (ValueError, lambda: mk.fused_moe(x, w13[:, :-1], w2, w, ids)),           # odd 2I
        (ValueError, lambda: mk.fused_moe(x, w13, w2[..., :4], w, ids)),          # I mismatch
        (ValueError, lambda: mk.fused_moe(x, w13, w2, w[:2], ids)),               # token count
        (ValueError, lambda: mk.fused_moe(x, w13, w2, w, ids[:2])),
        (TypeError, lambda: mk.fused_moe(x, w13, w2, w, ids.float())),
        (ValueError, lambda: mk.fused_moe(x, w13, w2, w, ids + E)),               # ids range
        (ValueError, lambda: mk.fused_moe(x, w13, w2, w, ids - E)),
        (ValueError, lambda: mk.fused_moe(x, w13.transpose(1, 2), w2, w, ids)),   # layout
        (TypeError, lambda: mk.fused_moe(x, w13, w2, w, ids, check_ids=1)),
    ]
    q13, s13, q2, s2 = mk.quantize_moe_weights(w13, w2)
    cases += [
        (ValueError, lambda: mk.fused_moe(x, q13, q2, w, ids)),                   # missing scales
        (ValueError, lambda: mk.fused_moe(x, q13, q2, w, ids, w13_scale=s13, w2_scale=s2[:3])),
        (TypeError, lambda: mk.fused_moe(x, q13, q2, w, ids, w13_scale=s13.half(), w2_scale=s2)),
        (ValueError, lambda: mk.fused_moe(x, w13, w2, w, ids, w13_scale=s13, w2_scale=s2)),
        (TypeError, lambda: mk.fused_moe(x, q13, w2, w, ids, w13_scale=s13, w2_scale=s2)),
        (ValueError, lambda: mk.quantize_moe_weights(w13, w2[:, :, :3])),
    ]
    for i, (exc, call) in enumerate(cases):
        with pytest.raises(exc):
            call()
            pytest.fail(f"case {i} did not raise")


def test_tile_configs_cover_m1_tensor_parallel_widths():
    for tp in (1, 2, 4, 8):
        inter = 9216 // tp
        table = tile_configs.load_table(str(tile_configs.DEFAULT_FILE))
        assert inter in table["configs"] and len(table["configs"][inter]) == len(table["buckets"])
        for tokens in (1, 2, 16, 17, 64, 65, 512, 513, 8192):
            cfg = moe_config(inter, 6144, tokens)
            for key in ("BLOCK_M", "BLOCK_N1", "BLOCK_K1", "BLOCK_N2", "BLOCK_K2"):
                v = cfg[key]
                assert v >= 16 and v & (v - 1) == 0, (inter, tokens, key, v)
            # The bf16 tiles fit shared memory at the table's own pipeline depth.
            for bn, bk, tiles in ((cfg["BLOCK_N1"], cfg["BLOCK_K1"], 2), (cfg["BLOCK_N2"], cfg["BLOCK_K2"], 1)):
                assert fit_stages(cfg["num_stages"], cfg["BLOCK_M"], bn, bk, tiles, 2, 2) == cfg["num_stages"]
            if tokens <= 64:  # decode: the tensor-core minimum, weights read once per tile
                assert cfg["BLOCK_M"] == 16
            if tokens <= 16:
                # Enough programs with only 2 experts touched (T = 1) to keep 132 H100 SMs busy.
                assert 2 * inter // cfg["BLOCK_N1"] >= 132
                assert 2 * 6144 // cfg["BLOCK_N2"] >= 132


@pytest.mark.parametrize("dtype,quant,ep", [("bf16", False, False), ("fp32", False, True), ("bf16", True, True)])
def test_decode_direct_path_is_the_aligned_arithmetic(dtype, quant, ep, device, monkeypatch):
    """Decode (T·k ≤ DIRECT_MAX_ENTRIES) skips the alignment and fuses the combine: two
    launches, and bitwise the output of the four-launch aligned path with the same tiles."""
    if "triton" not in BACKENDS:
        pytest.skip("no Triton device")
    from mm1_kernels.moe import triton_fused_moe as F_

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    E, T, hidden, inter = 8, 6, 64, 96
    w13, w2 = make_experts(E, hidden, inter, dt, device, seed=3)
    x, logits = make_tokens(T, E, hidden, dt, device, seed=4)
    topk_w, topk_ids = mk.moe_route(logits)
    topk_ids[3] = torch.tensor([5, 5], dtype=topk_ids.dtype)  # one token's two slots on one expert
    kw = {}
    if quant:
        w13, s13, w2, s2 = mk.quantize_moe_weights(w13, w2)
        kw = dict(w13_scale=s13, w2_scale=s2)
    if ep:  # experts 0, 2, 5 are local to this rank
        emap = torch.full((E,), -1, dtype=torch.int32, device=device)
        emap[torch.tensor([0, 2, 5])] = torch.arange(3, dtype=torch.int32, device=device)
        keep = torch.tensor([0, 2, 5])
        w13, w2 = w13[keep], w2[keep]
        kw = {k: v[keep] for k, v in kw.items()}
        kw["expert_map"] = emap
    launches = []
    for name in ("moe_align", "moe_combine_kernel", "moe_down_kernel", "moe_gate_up_kernel",
                 "moe_down_combine_kernel"):
        orig = getattr(F_, name)
        if name == "moe_align":
            def spy(*a, _o=orig, **k):
                launches.append("align")
                return _o(*a, **k)
            monkeypatch.setattr(F_, name, spy)
        else:
            class Spy:
                def __init__(self, kernel, tag):
                    self.kernel, self.tag = kernel, tag

                def __getitem__(self, grid):
                    launches.append(self.tag)
                    return self.kernel[grid]
            monkeypatch.setattr(F_, name, Spy(orig, name))
    direct = mk.fused_moe(x, w13, w2, topk_w, topk_ids, backend="triton", **kw)
    assert launches == ["moe_gate_up_kernel", "moe_down_combine_kernel"], launches
    launches.clear()
    monkeypatch.setattr(F_, "DIRECT_MAX_ENTRIES", 0)
    aligned = mk.fused_moe(x, w13, w2, topk_w, topk_ids, backend="triton", **kw)
    assert launches == ["align", "moe_gate_up_kernel", "moe_down_kernel", "moe_combine_kernel"], launches
    assert torch.equal(direct, aligned)
    if not quant and not ep:
        ref = mk.fused_moe_reference(x.double(), w13.double(), w2.double(), topk_w.double(), topk_ids)
        assert_close_to_reference(direct, ref, naive=naive_same_precision(x, w13, w2, topk_w, topk_ids))


def test_decode_direct_path_bad_ids_give_nan_rows(device):
    if "triton" not in BACKENDS:
        pytest.skip("no Triton device")
    E, T, hidden, inter = 4, 3, 64, 64
    w13, w2 = make_experts(E, hidden, inter, torch.float32, device)
    x, logits = make_tokens(T, E, hidden, torch.float32, device)
    topk_w, topk_ids = mk.moe_route(logits)
    topk_ids[1, 1] = E
    out = mk.fused_moe(x, w13, w2, topk_w, topk_ids, backend="triton", check_ids=False)
    assert bool(out[1].isnan().all()) and bool(out[[0, 2]].isfinite().all())


def _write_table(path, inter, cfg, buckets=(1, None)):
    doc = {"token_buckets": list(buckets), "configs": {str(inter): [cfg] * len(buckets)}}
    path.write_text(__import__("json").dumps(doc))
    return str(path)


def test_tile_table_lookup_user_file_device_file_and_errors(tmp_path, monkeypatch):
    """Which table decides (MM1_MOE_CONFIG, then the device's file, then the default), and a
    malformed table is an error naming the file, never a silent fallback."""
    base = dict(BLOCK_M=32, BLOCK_N1=32, BLOCK_K1=32, BLOCK_N2=32, BLOCK_K2=32, num_warps=2, num_stages=2,
                GROUP_M=4)
    default = moe_config(9216, 6144, 8192)
    monkeypatch.setattr(tile_configs, "CONFIG_DIR", tmp_path)
    dev = tile_configs.device_file("NVIDIA H200", "bf16")
    assert dev.parent == tmp_path and dev.name == "device_name=NVIDIA_H200,dtype=bf16.json"
    _write_table(dev, 9216, dict(base, GROUP_M=5))
    tile_configs._resolve.cache_clear()
    assert moe_config(9216, 6144, 8192, "NVIDIA H200")["GROUP_M"] == 5
    assert moe_config(9216, 6144, 8192, "NVIDIA H200", "int8") == default  # no int8 file: the default
    assert moe_config(1152, 6144, 8192, "NVIDIA H200") == moe_config(1152, 6144, 8192)  # width not listed
    user = _write_table(tmp_path / "mine.json", 9216, dict(base, GROUP_M=7))
    monkeypatch.setenv("MM1_MOE_CONFIG", user)
    assert moe_config(9216, 6144, 8192, "NVIDIA H200")["GROUP_M"] == 7
    bad = tmp_path / "bad.json"
    for doc in ({"configs": {}}, {"token_buckets": [1, 16], "configs": {}},
                {"token_buckets": [1, None], "configs": {"64": [base]}},
                {"token_buckets": [None], "configs": {"64": [dict(base, BLOCK_M=0)]}},
                {"token_buckets": [16, 16, None], "configs": {}},
                # tiles the kernels cannot compile: tl.dot needs powers of two ≥ 16
                {"token_buckets": [None], "configs": {"64": [dict(base, BLOCK_N1=48)]}},
                {"token_buckets": [None], "configs": {"64": [dict(base, BLOCK_M=8)]}},
                {"token_buckets": [None], "configs": {"64": [dict(base, BLOCK_M=True)]}},
                {"token_buckets": [None], "configs": {"64": [dict(base, num_warps=3)]}},
                "{not json"):
        bad.write_text(doc if isinstance(doc, str) else __import__("json").dumps(doc))
        tile_configs.load_table.cache_clear()
        monkeypatch.setenv("MM1_MOE_CONFIG", str(bad))
        with pytest.raises(ValueError, match="bad.json"):
            moe_config(64, 64, 1)
    monkeypatch.setenv("MM1_MOE_CONFIG", str(tmp_path / "missing.json"))
    tile_configs.load_table.cache_clear()
    with pytest.raises(ValueError, match="missing.json.*MM1_MOE_CONFIG"):
        moe_config(64, 64, 1)
    with pytest.raises(ValueError, match="weight_dtype"):
        tile_configs.device_file("x", "fp8")
    tile_configs.load_table.cache_clear()
    tile_configs._resolve.cache_clear()


def test_default_tile_table_file_is_formatted_by_format_table():
    """default.json is what format_table writes (so the tuner's files diff cleanly against it)."""
    import json
    text = tile_configs.DEFAULT_FILE.read_text()
    doc = json.loads(text)
    table = tile_configs.load_table(str(tile_configs.DEFAULT_FILE))
    configs = {str(k): v for k, v in table["configs"].items()}
    assert tile_configs.format_table(configs, table["buckets"], doc["_comment"]) == text


@pytest.mark.gpu
def test_fused_moe_64bit_offsets():
    """T·hidden and T·k·I past 2^31: offsets must not wrap (needs ~10 GB of GPU memory)."""
    E, hidden, inter = 4, 8192, 64
    T = (1 << 31) // hidden + 1024
    w13, w2 = make_experts(E, hidden, inter, torch.bfloat16, "cuda")
    x = torch.randn(T, hidden, device="cuda", dtype=torch.bfloat16)
    topk_ids = torch.randint(0, E, (T, 2), device="cuda", dtype=torch.int32)
    topk_w = torch.rand(T, 2, device="cuda")
    out = mk.fused_moe(x, w13, w2, topk_w, topk_ids, backend="triton")
    tail = slice(T - 64, T)
    ref = mk.fused_moe_reference(x[tail].double(), w13.double(), w2.double(),
                                 topk_w[tail].double(), topk_ids[tail])
    assert rel_err(out[tail], ref) <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("quantized", [False, True])
def test_decode_step_captures_in_a_cuda_graph(quantized):
    """Routing + fused experts for a decode batch: no host sync, so the step records into a
    CUDA graph and replays to the same bits as the eager call."""
    E, T, hidden, inter = 32, 8, 256, 128
    w13, w2 = make_experts(E, hidden, inter, torch.bfloat16, "cuda")
    scales = {}
    if quantized:
        w13, s13, w2, s2 = mk.quantize_moe_weights(w13, w2)
        scales = dict(w13_scale=s13, w2_scale=s2)
    x, logits = make_tokens(T, E, hidden, torch.bfloat16, "cuda")

    def step():
        w, ids = mk.moe_route(logits, top_k=2, backend="triton")
        return mk.fused_moe(x, w13, w2, w, ids, backend="triton", check_ids=False, **scales)

    out, expected = graph_replay_and_eager(step)
    assert torch.equal(out, expected)

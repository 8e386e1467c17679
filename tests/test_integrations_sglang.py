"""mm1_kernels.integrations.sglang against SGLang's semantics, computed independently here in fp64.

References are per-token loops written from SGLang's fused_moe.py (fused_experts_impl,
filter_expert) and seg_la.py (seg_la_d / seg_la_p / seg_la_mtp kernels).
"""
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mm1_kernels._dispatch import triton_interpret_enabled
from mm1_kernels.integrations import sglang as shim

from numerics import assert_close_to_reference

BACKENDS = ["torch"] + (["triton"] if torch.cuda.is_available() or triton_interpret_enabled() else [])


# ----------------------------------------------------------------------------- fused_experts

def ref_experts(x, w1, w2, w, ids, combine=True, factor=1.0):
    """SGLang's fused_experts in fp64: local ids, -1 = another rank's expert (adds 0)."""
    x, w = x.double(), w.double()
    inter = w1.shape[1] // 2
    T, k = ids.shape
    per = torch.zeros(T, k, x.shape[1], dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            if e < 0:
                continue
            gu = w1[e].double() @ x[t]
            per[t, j] = w[t, j] * (w2[e].double() @ (F.silu(gu[:inter]) * gu[inter:]))
    return per.sum(1) * factor if combine else per


def make_moe(T=6, E=4, H=32, inter=24, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w1 = torch.randn(E, 2 * inter, H, generator=g) / H ** 0.5
    w2 = torch.randn(E, H, inter, generator=g) / inter ** 0.5
    w = torch.rand(T, k, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return x, w1, w2, w, ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_experts_default_config_is_inplace_and_drops_minus_one(backend):
    x, w1, w2, w, ids = make_moe()
    ids[0, 1] = -1          # one slot on another rank
    ids[2] = -1             # a token with no local expert: exactly zero
    ref = ref_experts(x, w1, w2, w, ids)
    topk_output = SimpleNamespace(topk_weights=w, topk_ids=ids, router_logits=None)
    out = shim.fused_experts(x, w1, w2, topk_output, backend=backend)
    assert out is x, "MoeRunnerConfig defaults to inplace=True"
    assert_close_to_reference(out, ref, tol=1e-4)
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_fused_experts_no_combine_and_scaling_factor():
    x, w1, w2, w, ids = make_moe()
    cfg = SimpleNamespace(inplace=False, no_combine=True)
    per = shim.fused_experts(x, w1, w2, (w, ids, None), cfg, backend="torch")
    assert per.shape == (6, 2, 32)
    assert_close_to_reference(per, ref_experts(x, w1, w2, w, ids, combine=False), tol=1e-4)
    cfg = SimpleNamespace(inplace=False, routed_scaling_factor=2.5)
    out = shim.fused_experts(x, w1, w2, (w, ids), cfg, backend="torch")
    assert_close_to_reference(out, ref_experts(x, w1, w2, w, ids, factor=2.5), tol=1e-4)
    with pytest.raises(ValueError, match="no_combine"):
        shim.fused_experts(x, w1, w2, (w, ids), SimpleNamespace(inplace=True, no_combine=True))


@pytest.mark.parametrize("kwargs, name", [
    (dict(b1=torch.zeros(4, 48)), "b1"),
    (dict(moe_runner_config=SimpleNamespace(gemm1_alpha=1.702)), "gemm1_alpha"),
    (dict(moe_runner_config=SimpleNamespace(activation="gelu")), "activation"),
    (dict(use_fp8_w8a8=True), "use_fp8_w8a8"),
])
def test_fused_experts_unsupported_options_name_the_argument(kwargs, name):
    x, w1, w2, w, ids = make_moe()
    with pytest.raises(NotImplementedError, match=name):
        shim.fused_experts(x, w1, w2, (w, ids), **kwargs)


# ----------------------------------------------------------------------------- seg_la

H, D = 2, 16
SLOPES = torch.tensor([0.05, 0.6])


def step(S, q, k, v, scale):
    """One token of seg_la's recurrence (fp64, "kv" layout): S = λ S + kᵀv, o = scale · q S."""
    lam = torch.exp(-SLOPES.double())[:, None, None]
    S = lam * S + k.double()[:, :, None] * v.double()[:, None, :]
    return S, scale * torch.einsum("hd,hde->he", q.double(), S)


def qkv(L, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.3 * torch.randn(L, H, D, generator=g), 0.3 * torch.randn(L, H, D, generator=g),
            torch.randn(L, H, D, generator=g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [None, 1.0])
def test_seg_la_decode_with_padding(backend, scale):
    q, k, v = qkv(3)
    s = torch.randn(4, H, D, D)
    before = s.clone()
    meta = SimpleNamespace(batch_size=3, s_offsets=torch.tensor([2, -1, 0]), q_offsets=torch.arange(4),
                           q_lengths=torch.ones(3, dtype=torch.long), s_scales=torch.ones(3), mask=None)
    o = shim.seg_la_fwd(q, k, v, s, SLOPES, meta, softmax_scale=scale, backend=backend)
    sc = D ** -0.5 if scale is None else scale   # SGLang's default scale is 1/sqrt(D)
    for b, slot in ((0, 2), (2, 0)):
        S, ref = step(before[slot].double(), q[b], k[b], v[b], sc)
        assert_close_to_reference(o[b], ref, tol=1e-5)
        assert_close_to_reference(s[slot], S, tol=1e-5)
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert torch.equal(s[1], before[1]) and torch.equal(s[3], before[3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_seg_la_speculative_verify_per_token_states(backend):
    bs, n = 3, 3                                   # 3 requests (one padding) x 3 draft tokens
    q, k, v = qkv(bs * n, seed=1)
    s = torch.randn(5, H, D, D)
    before = s.clone()
    slots = torch.tensor([4, 1, -1])
    caches = torch.full((3, n, H, D, D), 7.0)
    meta = SimpleNamespace(batch_size=bs, s_offsets=slots, q_offsets=torch.arange(0, bs * n + 1, n),
                           q_lengths=torch.full((bs,), n), s_scales=torch.ones(bs), mask=None)
    cache_indices = torch.tensor([2, 0, 1])
    o = shim.seg_la_fwd(q, k, v, s, SLOPES, meta, caches=caches, cache_indices=cache_indices,
                        softmax_scale=1.0, backend=backend)
    assert torch.equal(s, before), "verify reads the slots and must not advance them"
    for b in range(2):
        S = before[int(slots[b])].double()
        for t in range(n):
            S, ref = step(S, q[b * n + t], k[b * n + t], v[b * n + t], 1.0)
            assert_close_to_reference(o[b * n + t], ref, tol=1e-5)
            assert_close_to_reference(caches[int(cache_indices[b]), t], S, tol=1e-5)
    assert torch.equal(o[2 * n:], torch.zeros_like(o[2 * n:]))
    assert torch.equal(caches[1], torch.full_like(caches[1], 7.0)), "the padding request writes nothing"
    # Commit the accepted prefix (2 of 3 tokens of request 0), as SGLang does after verify, then
    # decode the next token from it: equal to the recurrence over the accepted tokens.
    s[4] = caches[2, 1]
    q1, k1, v1 = qkv(1, seed=2)
    meta1 = SimpleNamespace(batch_size=1, s_offsets=torch.tensor([4]), q_offsets=torch.arange(2),
                            q_lengths=torch.ones(1), s_scales=torch.ones(1), mask=None)
    o1 = shim.seg_la_fwd(q1, k1, v1, s, SLOPES, meta1, softmax_scale=1.0, backend=backend)
    S = before[4].double()
    for t in range(2):
        S, _ = step(S, q[t], k[t], v[t], 1.0)
    S, ref = step(S, q1[0], k1[0], v1[0], 1.0)
    assert_close_to_reference(o1[0], ref, tol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_seg_la_varlen_prefill_fresh_and_continued(backend, layout):
    lens = [5, 3, 4]
    q, k, v = qkv(sum(lens), seed=3)
    base = torch.randn(4, H, D, D)
    base[3] = float("nan")  # the fresh request's slot holds garbage; SGLang never reads it
    if layout == "strided":
        buf = torch.randn(4, H, D, D + 8)
        buf[..., :D] = base
        s = buf[..., :D]
    else:
        s = base.clone()
    before = base.clone()
    slots = torch.tensor([3, 0, -1])
    offsets = torch.tensor([0, 5, 8, 12])
    # Request 0 is a new sequence (s_scales 0: its slot's old contents are ignored); 1 continues.
    meta = SimpleNamespace(batch_size=3, s_offsets=slots, q_offsets=offsets, q_lengths=offsets.diff(),
                           s_scales=torch.tensor([0, 1, 1]), mask=None)
    o = shim.seg_la_fwd(q, k, v, s, SLOPES, meta, softmax_scale=1.0, backend=backend)
    for b, init in ((0, torch.zeros(H, D, D, dtype=torch.float64)), (1, before[0].double())):
        S = init
        for t in range(int(offsets[b]), int(offsets[b + 1])):
            S, ref = step(S, q[t], k[t], v[t], 1.0)
            assert_close_to_reference(o[t], ref, tol=1e-5)
        assert_close_to_reference(s[int(slots[b])], S, tol=1e-5)
    assert torch.equal(s[1], before[1]) and torch.equal(s[2], before[2])


def test_seg_la_check_ids_false_skips_the_host_check():
    """Duplicate slots are refused by the default host check; check_ids=False (a serving loop
    that vouches for SGLang's metadata) does no host work, so it cannot see them."""
    q, k, v = qkv(2, seed=5)
    s = torch.zeros(4, H, D, D)
    meta = SimpleNamespace(batch_size=2, s_offsets=torch.tensor([1, 1]), q_offsets=torch.arange(3), mask=None)
    with pytest.raises(ValueError, match="slot_ids must be distinct"):
        shim.seg_la_fwd(q, k, v, s, SLOPES, meta, softmax_scale=1.0)
    ok = SimpleNamespace(batch_size=2, s_offsets=torch.tensor([1, 3]), q_offsets=torch.arange(3), mask=None)
    o = shim.seg_la_fwd(q, k, v, s, SLOPES, ok, softmax_scale=1.0, check_ids=False)
    assert torch.isfinite(o).all()


def test_seg_la_rejects_tree_mask_and_vk_layout():
    q, k, v = qkv(4)
    s = torch.zeros(2, H, D, D)
    meta = SimpleNamespace(batch_size=2, s_offsets=torch.tensor([0, 1]), q_offsets=torch.tensor([0, 2, 4]),
                           q_lengths=torch.tensor([2, 2]), s_scales=torch.ones(2), mask=torch.ones(2, 2, 2))
    with pytest.raises(NotImplementedError, match="meta.mask"):
        shim.seg_la_fwd(q, k, v, s, SLOPES, meta)
    meta.mask = None
    with pytest.raises(NotImplementedError, match="state_layout"):
        shim.seg_la_fwd(q, k, v, s, SLOPES, meta, state_layout="vk")


def test_minimax_backend_decode_is_vllms():
    # SGLang's "minimax" linear backend calls a copy of vLLM's linear_decode_forward_triton.
    from mm1_kernels.integrations import vllm
    assert shim.linear_decode_forward_triton is vllm.linear_decode_forward_triton


def test_import_does_not_import_sglang():
    code = ("import sys; import mm1_kernels.integrations.sglang; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('sglang', 'vllm')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)

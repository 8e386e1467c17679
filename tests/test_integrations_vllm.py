"""mm1_kernels.integrations.vllm against vLLM's semantics, computed independently here in fp64.

Each reference below is a per-token loop written from vLLM's source (fused_moe.py's
fused_experts_impl; lightning_attn.py's lightning_attention / linear_decode_forward_triton),
not from this package's kernels.
"""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mm1_kernels as mk
from mm1_kernels._dispatch import triton_interpret_enabled
from mm1_kernels.integrations import vllm as shim

from numerics import assert_close_to_reference, rel_err

BACKENDS = ["torch"] + (["triton"] if torch.cuda.is_available() or triton_interpret_enabled() else [])


# ----------------------------------------------------------------------------- fused_experts

def ref_fused_experts(x, w1, w2, topk_weights, topk_ids, expert_map=None, on_input=False,
                      w1_scale=None, w2_scale=None):
    """vLLM's fused_experts per token and slot in fp64: global id -> expert_map -> local expert
    (-1: the slot adds nothing), silu(gate = rows [0, I)) * up (rows [I, 2I)), weight on the
    output (or, apply_router_weight_on_input, on the input)."""
    x, tw = x.double(), topk_weights.double()
    w1 = w1.double() * (1 if w1_scale is None else w1_scale.double().reshape(w1.shape[0], -1, 1))
    w2 = w2.double() * (1 if w2_scale is None else w2_scale.double().reshape(w2.shape[0], -1, 1))
    inter = w1.shape[1] // 2
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if expert_map is not None:
                e = int(expert_map[e])
            if e < 0:
                continue
            xin = x[t] * tw[t, j] if on_input else x[t]
            gu = w1[e] @ xin
            y = w2[e] @ (F.silu(gu[:inter]) * gu[inter:])
            out[t] += y if on_input else tw[t, j] * y
    return out


def make_moe(T=7, E=4, H=32, inter=24, k=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w1 = (torch.randn(E, 2 * inter, H, generator=g) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, inter, generator=g) / inter ** 0.5).to(dtype)
    w = torch.rand(T, k, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return x, w1, w2, w, ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_experts_matches_fp64(backend, dtype):
    x, w1, w2, w, ids = make_moe(dtype=dtype)
    out = shim.fused_experts(x, w1, w2, w, ids, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_to_reference(out, ref_fused_experts(x, w1, w2, w, ids), dtype=dtype, tol=1e-4 if dtype ==
                              torch.float32 else 1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_experts_expert_map_ranks_sum_to_full(backend):
    # 8 global experts over two ranks of 4; each rank's map sends the other rank's experts to -1.
    x, w1, w2, w, _ = make_moe(T=6, E=8)
    ids = torch.tensor([[0, 5], [1, 2], [3, 4], [5, 6], [7, 0], [6, 7]])
    maps = [torch.tensor([0, 1, 2, 3, -1, -1, -1, -1]), torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3])]
    outs = []
    for r, m in enumerate(maps):
        local1, local2 = w1[4 * r:4 * r + 4], w2[4 * r:4 * r + 4]
        out = shim.fused_experts(x, local1, local2, w, ids, global_num_experts=8, expert_map=m, backend=backend)
        assert_close_to_reference(out, ref_fused_experts(x, local1, local2, w, ids, expert_map=m), tol=1e-4)
        outs.append(out)
    # A token whose both experts are remote gets exactly zero on this rank.
    assert torch.equal(outs[1][1], torch.zeros_like(outs[1][1]))
    assert_close_to_reference(outs[0] + outs[1], ref_fused_experts(x, w1, w2, w, ids), tol=1e-4)


def test_fused_experts_global_num_experts_must_match_map():
    x, w1, w2, w, ids = make_moe()
    with pytest.raises(ValueError, match="global_num_experts"):
        shim.fused_experts(x, w1, w2, w, ids, global_num_experts=6, expert_map=torch.arange(4))


def test_fused_experts_repeated_expert_in_a_row_counts_twice():
    # Ties in routing can pick one expert in two slots; vLLM then adds it twice.
    x, w1, w2, w, _ = make_moe(T=3)
    ids = torch.tensor([[2, 2], [0, 0], [1, 3]])
    out = shim.fused_experts(x, w1, w2, w, ids, backend="torch")
    assert_close_to_reference(out, ref_fused_experts(x, w1, w2, w, ids), tol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_experts_padded_stride_weights(backend):
    # VLLM_MOE_PADDING: weights allocated 128 wider then sliced, so strides exceed the shapes.
    x, w1, w2, w, ids = make_moe()
    buf1 = torch.randn(w1.shape[0], w1.shape[1], w1.shape[2] + 8)
    buf2 = torch.randn(w2.shape[0], w2.shape[1], w2.shape[2] + 8)
    buf1[..., :w1.shape[2]] = w1
    buf2[..., :w2.shape[2]] = w2
    p1, p2 = buf1[..., :w1.shape[2]], buf2[..., :w2.shape[2]]
    assert not p1.is_contiguous() and not p2.is_contiguous()
    out = shim.fused_experts(x, p1, p2, w, ids, backend=backend)
    assert_close_to_reference(out, ref_fused_experts(x, w1, w2, w, ids), tol=1e-4)


@pytest.mark.parametrize("scale_shape", ["EN", "EN1"])
def test_fused_experts_int8_w8a16(scale_shape):
    x, w1, w2, w, ids = make_moe(dtype=torch.bfloat16)
    q1, s1, q2, s2 = mk.quantize_moe_weights(w1.float(), w2.float())
    if scale_shape == "EN1":
        s1, s2 = s1[..., None], s2[..., None]
    out = shim.fused_experts(x, q1, q2, w, ids, use_int8_w8a16=True, w1_scale=s1, w2_scale=s2, backend="torch")
    ref = ref_fused_experts(x, q1, q2, w, ids, w1_scale=s1, w2_scale=s2)
    assert_close_to_reference(out, ref, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="use_int8_w8a16"):
        shim.fused_experts(x, q1, q2, w, ids, backend="torch")


@pytest.mark.parametrize("k", [1, 2])
def test_fused_experts_router_weight_on_input(k):
    x, w1, w2, w, ids = make_moe(k=k)
    out = shim.fused_experts(x, w1, w2, w, ids, apply_router_weight_on_input=True, backend="torch")
    assert_close_to_reference(out, ref_fused_experts(x, w1, w2, w, ids, on_input=True), tol=1e-4)


def test_fused_experts_inplace_returns_hidden_states():
    x, w1, w2, w, ids = make_moe()
    ref = ref_fused_experts(x, w1, w2, w, ids)
    out = shim.fused_experts(x, w1, w2, w, ids, inplace=True, backend="torch")
    assert out is x
    assert_close_to_reference(x, ref, tol=1e-4)


@pytest.mark.parametrize("kwargs, name", [
    (dict(activation="gelu"), "activation"),
    (dict(use_fp8_w8a8=True), "use_fp8_w8a8"),
    (dict(use_int4_w4a16=True), "use_int4_w4a16"),
    (dict(a1_scale=torch.ones(1)), "a1_scale"),
    (dict(block_shape=[128, 128]), "block_shape"),
    (dict(quant_config=type("Q", (), {"use_fp8_w8a8": True})()), "quant_config.use_fp8_w8a8"),
])
def test_fused_experts_unsupported_options_name_the_argument(kwargs, name):
    x, w1, w2, w, ids = make_moe()
    with pytest.raises(NotImplementedError, match=name):
        shim.fused_experts(x, w1, w2, w, ids, **kwargs)


# ----------------------------------------------------------------------------- lightning

def recurrence(q, k, v, s, S0):
    """The fp64 recurrence on head-first [B, H, T, D]: S_t = λ S_{t-1} + k_tᵀ v_t, o_t = q_t S_t.
    Returns o and the state after each token ([B, H, T, D, E])."""
    q, k, v, S = q.double(), k.double(), v.double(), S0.double().clone()
    lam = torch.exp(-s.double())[None, :, None, None]
    B, H, T, _ = q.shape
    o = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    states = []
    for t in range(T):
        S = lam * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        o[:, :, t] = torch.einsum("bhd,bhde->bhe", q[:, :, t], S)
        states.append(S.clone())
    return o, torch.stack(states, dim=2)


def blockwise(q, k, v, s, S0, C=256, cross_exponent_offset=1):
    """The chunked form of docs/m1_math.md §3.3 with the cross-block term λ^(j + offset).

    offset 1 is the release (equal to the recurrence); offset 0 is what vLLM's Triton prefill
    computes (its ``q_decay = exp(-s * j)``, docs/m1_math.md §3.4).
    """
    q, k, v, S = q.double(), k.double(), v.double(), S0.double().clone()
    lam = torch.exp(-s.double())
    B, H, T, _ = q.shape
    o = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for c in range(0, T, C):
        m = min(C, T - c)
        j = torch.arange(m, dtype=torch.float64)
        for h in range(H):
            decay = lam[h] ** (j[:, None] - j[None, :]).clamp_min(0) * (j[:, None] >= j[None, :])
            qh, kh, vh = q[:, h, c:c + m], k[:, h, c:c + m], v[:, h, c:c + m]
            o[:, h, c:c + m] = ((qh @ kh.transpose(-1, -2)) * decay) @ vh
            o[:, h, c:c + m] += lam[h] ** (j + cross_exponent_offset)[:, None] * (qh @ S[:, h])
            S[:, h] = lam[h] ** m * S[:, h] + (kh * (lam[h] ** (m - 1 - j))[:, None]).transpose(-1, -2) @ vh
    return o


def make_lightning(B=2, H=2, T=20, D=16, E=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = (0.3 * torch.randn(B, H, T, D, generator=g)).to(dtype)
    k = (0.3 * torch.randn(B, H, T, D, generator=g)).to(dtype)
    v = torch.randn(B, H, T, E, generator=g).to(dtype)
    slopes = torch.tensor([0.02, 0.4, 0.1, 0.9][:H])
    return q, k, v, slopes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [20, 300])
def test_lightning_attention_head_first_with_history(backend, T):
    q, k, v, slopes = make_lightning(T=T)
    hist = torch.randn(2, 2, 16, 16)
    hist_copy = hist.clone()
    o, kv = shim.lightning_attention(q, k, v, slopes, 256, hist, backend=backend)
    ref_o, ref_states = recurrence(q, k, v, slopes, hist)
    assert o.shape == (2, 2, T, 16) and o.is_contiguous() and o.dtype == q.dtype
    assert_close_to_reference(o, ref_o, tol=1e-4)
    nb = -(-T // 256)
    assert kv.shape == (2, 2, nb + 1, 16, 16) and kv.dtype == torch.float32
    # kv[:, :, i] is the state before token 256 i (i < NB); the last entry the final state.
    assert torch.equal(kv[:, :, 0], hist)
    for i in range(1, nb):
        assert_close_to_reference(kv[:, :, i], ref_states[:, :, 256 * i - 1], tol=1e-4)
    assert_close_to_reference(kv[:, :, -1], ref_states[:, :, -1], tol=1e-4)
    assert torch.equal(hist, hist_copy), "vLLM clones kv_history: the argument must not change"
    # ed as vLLM's MiniMax layer stores it ([H, 1, 1]); one-call mode keeps only the final state.
    o1, kv1 = shim.lightning_attention(q, k, v, slopes.view(2, 1, 1), 256, hist, block_states=False,
                                       backend=backend)
    assert kv1.shape == (2, 2, 1, 16, 16)
    assert_close_to_reference(o1, ref_o, tol=1e-4)
    assert_close_to_reference(kv1[:, :, -1], ref_states[:, :, -1], tol=1e-4)


def test_lightning_attention_follows_release_not_vllm_cross_block_decay():
    # vLLM's own Triton prefill applies λ^j instead of λ^(j+1) to q·S_in in every block after the
    # first (docs/m1_math.md §3.4; its test, T=16 with atol 0.15, never crosses a block). The shim
    # computes the release's recurrence: it matches offset 1 and measurably differs from offset 0.
    q, k, v, slopes = make_lightning(T=300)
    hist = torch.zeros(2, 2, 16, 16)
    ref_o, _ = recurrence(q, k, v, slopes, hist)
    assert rel_err(blockwise(q, k, v, slopes, hist), ref_o) < 1e-12  # the chunked form is exact
    vllm_like = blockwise(q, k, v, slopes, hist, cross_exponent_offset=0)
    o, _ = shim.lightning_attention(q, k, v, slopes, 256, hist, backend="torch")
    assert rel_err(o, ref_o) < 1e-5
    assert rel_err(vllm_like, ref_o) > 1e-3


def decode_reference(q, k, v, cache, slopes, slots):
    """vLLM's decode step, per row, on the slot slot_idx[b] (fp64)."""
    cache = cache.double().clone()
    B, H, _, D = q.shape
    out = torch.zeros(B, H * v.shape[-1], dtype=torch.float64)
    lam = torch.exp(-slopes.double())
    for b in range(B):
        s = int(slots[b])
        if s == -1:
            continue
        for h in range(H):
            S = lam[h] * cache[s, h] + torch.outer(k[b, h, 0].double(), v[b, h, 0].double())
            cache[s, h] = S
            out[b, h * v.shape[-1]:(h + 1) * v.shape[-1]] = q[b, h, 0].double() @ S
    return out, cache


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "bf16"])
def test_linear_decode_slot_indexed_with_padding(backend, layout):
    # Note: vLLM's own test reference (reference_linear_decode in
    # tests/kernels/attention/test_lightning_attn.py) reads and writes kv_caches[b] — the batch
    # row — instead of kv_caches[slot_idx[b]]; its tests only use slot_idx = arange(B) (or with a
    # -1), where the two coincide. The kernel, and this reference, use the slot.
    q, k, v, slopes = make_lightning(B=3, T=1)
    slots = torch.tensor([3, -1, 0])
    base = torch.randn(5, 2, 16, 16)
    if layout == "strided":  # a view of a larger buffer, as vLLM's cache is
        buf = torch.randn(5, 2, 16, 24)
        buf[..., :16] = base
        cache = buf[..., :16]
        pad = buf[..., 16:].clone()
    elif layout == "bf16":
        cache = base.to(torch.bfloat16)
        base = cache.float()
    else:
        cache = base.clone()
    before = cache.clone()
    out = shim.linear_decode_forward_triton(q, k, v, cache, slopes, slots, 32, backend=backend)
    ref_out, ref_cache = decode_reference(q, k, v, base, slopes, slots)
    assert out.shape == (3, 32) and out.dtype == q.dtype
    tol = 1e-2 if layout == "bf16" else 1e-5
    assert_close_to_reference(out[[0, 2]], ref_out[[0, 2]], tol=tol)
    assert torch.equal(out[1], torch.zeros_like(out[1])), "padding rows are zero here"
    for s in (0, 3):
        assert_close_to_reference(cache[s].float(), ref_cache[s], tol=tol)
    for s in (1, 2, 4):  # untouched: the padding row's clamped slot and unused slots
        assert torch.equal(cache[s], before[s])
    if layout == "strided":
        assert torch.equal(buf[..., 16:], pad), "the buffer's padding columns must stay untouched"


def test_linear_decode_writes_slot_not_batch_row():
    # The case vLLM's reference_linear_decode gets wrong: rows 0, 1 use slots 2, 0.
    q, k, v, slopes = make_lightning(B=2, T=1)
    cache = torch.randn(3, 2, 16, 16)
    before = cache.clone()
    slots = torch.tensor([2, 0])
    shim.linear_decode_forward_triton(q, k, v, cache, slopes, slots, backend="torch")
    _, ref_cache = decode_reference(q, k, v, before, slopes, slots)
    assert_close_to_reference(cache, ref_cache, tol=1e-5)
    assert torch.equal(cache[1], before[1])


def test_import_does_not_import_vllm():
    code = ("import sys; import mm1_kernels.integrations.vllm; "
            "bad = [m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)

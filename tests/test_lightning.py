"""Lightning attention: Triton and torch backends against the fp64 recurrence."""
import math

import pytest
import torch

import mm1_kernels as mk
from mm1_kernels import BackendUnavailableError
from mm1_kernels.lightning import reference as ref
from mm1_kernels.lightning.triton_prefill import lightning_prefill_triton

from numerics import TOL, assert_close_to_reference, bf16_ulp, case_id, rel_err

BACKENDS = ["triton", "torch"]


def make_qkv(B, T, H, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # silu-activated, as in the model: q/k/v are silu(x @ W_qkv^T)
    qkv = [torch.nn.functional.silu(torch.randn(B, T, H, D, generator=g)).to(device, dtype) for _ in range(3)]
    return qkv


def make_state(N, H, D, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(N, H, D, D, generator=g)).to(device)


def lightning_naive(q, k, v, slopes, initial_state=None, cu_seqlens=None, chunk=64):
    """Lightning attention done naively in the input dtype: the 2×-naive yardstick (DESIGN.md).

    "Naive in the input dtype" here means the same chunked computation a plain tensor-core
    implementation does: every matmul takes its operands in the input dtype (q, k, v as given;
    the fp32 state, the decayed scores and the decayed keys rounded to it, round-to-nearest) with
    exact products and fp32 accumulation; the state stays fp32 between chunks (the contract
    keeps it fp32 everywhere) and o is rounded once to the input dtype. This is what the prefill
    would be without its bf16 hi + lo split. A bf16 *state* (the fp64 recurrence run in bf16)
    is not the yardstick: its error grows with T until the 2× bound says nothing. For fp32
    inputs the rounding is the identity, so this is the plain fp32 chunked form.
    Decode is the T = 1 case from the cached state. Returns (o in q's dtype, fp32 final state).
    """
    dt = q.dtype
    rnd = lambda x: x.to(dt).float()                                      # noqa: E731
    q, k, v = (x.detach().cpu() for x in (q, k, v))
    B, T, H, D = q.shape
    s = slopes.detach().cpu().float()
    seqs = ([(b, 0, T) for b in range(B)] if cu_seqlens is None else
            [(0, a, e) for a, e in zip(cu_seqlens.tolist()[:-1], cu_seqlens.tolist()[1:])])
    pos = torch.arange(chunk, dtype=torch.float32)
    diff = pos[:, None] - pos[None, :]
    intra = torch.where(diff >= 0, torch.exp(-s[:, None, None] * diff.clamp(min=0)), 0.0)
    o = torch.zeros(B, T, H, v.shape[-1], dtype=dt)
    final = torch.zeros(len(seqs), H, D, v.shape[-1])
    for n, (b, start, end) in enumerate(seqs):
        S = (initial_state[n].detach().cpu().float().clone() if initial_state is not None
             else torch.zeros(H, D, v.shape[-1]))
        for c in range(start, end, chunk):
            m = min(chunk, end - c)
            qc, kc, vc = (x[b, c:c + m].float().transpose(0, 1) for x in (q, k, v))
            scores = (qc @ kc.transpose(1, 2)) * intra[:, :m, :m]
            inter = (qc @ rnd(S)) * torch.exp(-s[:, None, None] * (pos[:m] + 1)[None, :, None])
            o[b, c:c + m] = (rnd(scores) @ vc + inter).transpose(0, 1).to(dt)
            kd = kc * torch.exp(-s[:, None, None] * (m - 1 - pos[:m])[None, :, None])
            S = torch.exp(-s * m)[:, None, None] * S + rnd(kd).transpose(1, 2) @ vc
        final[n] = S
    return o, final


def check_output(o, ref_o, q, k, v, slopes, init=None, cu_seqlens=None, what="o"):
    """o against the fp64 truth: the dtype's bound and, for 16-bit inputs, ≤ 2 × the naive error."""
    naive = None
    if q.dtype != torch.float32:
        naive = lightning_naive(q, k, v, slopes, init, cu_seqlens)[0]
    return assert_close_to_reference(o.cpu(), ref_o, dtype=q.dtype, naive=naive, what=what)


# --------------------------------------------------------------------------- slopes

def test_slopes_power_of_two_m1():
    s0 = mk.lightning_slopes(64, 0, 80)
    expected = torch.tensor([2.0 ** (-(h + 1) / 8) * (1 + 1e-5) for h in range(64)], dtype=torch.float64)
    assert s0.dtype == torch.float32 and s0.shape == (64,)
    torch.testing.assert_close(s0.double(), expected, rtol=1e-7, atol=0)
    assert abs(s0[0].item() - 0.917) < 1e-3                         # M1_REFERENCE: λ ≈ 0.40
    s78 = mk.lightning_slopes(64, 78, 80)
    assert abs(s78[63].item() - 2.0 ** -8 * (1 - 78 / 79 + 1e-5)) < 1e-9
    assert 4.8e-5 < s78[63].item() < 5.0e-5


@pytest.mark.parametrize("H", [6, 12, 40, 48])
def test_slopes_not_power_of_two(H):
    def base(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]
    p = 2 ** int(math.floor(math.log2(H)))
    expected = base(p) + base(2 * p)[0::2][: H - p]
    factor = 1 - 39 / 79 + 1e-5
    got = mk.lightning_slopes(H, 39, 80)
    assert got.shape == (H,)
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64) * factor,
                               rtol=1e-7, atol=0)


def test_slopes_bad_args():
    with pytest.raises(ValueError):
        mk.lightning_slopes(0, 0, 80)
    with pytest.raises(ValueError):
        mk.lightning_slopes(64, 80, 80)
    with pytest.raises(ValueError):
        mk.lightning_slopes(64, 0, 1)


# --------------------------------------------------------------------------- prefill

def prefill_case(B, T, H, D, layer, dtype, with_init, slow=False):
    return pytest.param(B, T, H, D, layer, dtype, with_init,
                        id=case_id(B=B, T=T, H=H, D=D, L=layer, dtype=dtype, init=with_init),
                        marks=[pytest.mark.slow] if slow else [])


PREFILL_CASES = [
    # (B, T, H, D, layer, dtype, with_initial_state)
    prefill_case(2, 1, 2, 64, 0, torch.float32, False),
    prefill_case(1, 17, 2, 64, 39, torch.float32, True),
    prefill_case(2, 63, 2, 64, 78, torch.float32, False),
    prefill_case(1, 64, 2, 128, 39, torch.float32, True),
    prefill_case(2, 65, 2, 64, 0, torch.bfloat16, True),
    prefill_case(1, 257, 3, 64, 78, torch.bfloat16, False),
    prefill_case(1, 1000, 2, 64, 78, torch.float32, True),
    prefill_case(1, 1000, 1, 128, 0, torch.bfloat16, True),
    prefill_case(1, 65, 64, 128, 39, torch.float32, True, slow=True),     # M1 head count and width
    prefill_case(1, 33, 64, 128, 0, torch.bfloat16, False, slow=True),
    prefill_case(2, 40, 2, 64, 39, torch.float16, True),
    prefill_case(1, 20, 2, 48, 39, torch.float32, True),                  # head dim not a power of two
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,T,H,D,layer,dtype,with_init", PREFILL_CASES)
def test_prefill_matches_fp64_recurrence(backend, B, T, H, D, layer, dtype, with_init, device, poison_outputs):
    q, k, v = make_qkv(B, T, H, D, dtype, device)
    slopes = mk.lightning_slopes(H, layer, 80).to(device)
    init = make_state(B, H, D, device) if with_init else None
    o, final = mk.lightning_attention(q, k, v, slopes, initial_state=init, output_final_state=True,
                                      backend=backend)
    ref_o, ref_final = ref.lightning_recurrence(q.cpu(), k.cpu(), v.cpu(), slopes.cpu(),
                                                None if init is None else init.cpu())
    assert o.dtype == dtype and o.shape == (B, T, H, D)
    assert final.dtype == torch.float32 and final.shape == (B, H, D, D)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    check_output(o, ref_o, q, k, v, slopes, init)
    # The state is fp32 whatever the input dtype; only the inputs were rounded.
    assert_close_to_reference(final.cpu(), ref_final, tol=1e-5, what="final state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("segment_len", [64, 128], ids=["seg64", "seg128"])
def test_prefill_segmented_matches_recurrence(dtype, segment_len, device, poison_outputs):
    """The multi-segment path (local states, scan, output pass) that long sequences take."""
    B, T, H, D = 2, 300, 2, 64
    q, k, v = make_qkv(B, T, H, D, dtype, device, seed=3)
    slopes = mk.lightning_slopes(H, 78, 80).to(device)
    init = make_state(B, H, D, device)
    o, final = lightning_prefill_triton(q, k, v, slopes, init, None, True, segment_len=segment_len)
    ref_o, ref_final = ref.lightning_recurrence(q.cpu(), k.cpu(), v.cpu(), slopes.cpu(), init.cpu())
    check_output(o, ref_o, q, k, v, slopes, init)
    assert_close_to_reference(final.cpu(), ref_final, tol=1e-5, what="final state")


def varlen_case(lengths, H, D, dtype, device, seed=5):
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    q, k, v = make_qkv(1, int(cu[-1]), H, D, dtype, device, seed)
    return q, k, v, cu


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_varlen(backend, dtype, device, poison_outputs):
    lengths = [1, 70, 0, 1, 130, 64]
    H, D = 2, 64
    q, k, v, cu = varlen_case(lengths, H, D, dtype, device)
    slopes = mk.lightning_slopes(H, 39, 80).to(device)
    init = make_state(len(lengths), H, D, device)
    o, final = mk.lightning_attention(q, k, v, slopes, initial_state=init, output_final_state=True,
                                      cu_seqlens=cu, backend=backend)
    ref_o, ref_final = ref.lightning_recurrence(q.cpu(), k.cpu(), v.cpu(), slopes.cpu(), init.cpu(),
                                                cu_seqlens=cu.cpu())
    assert final.shape == (len(lengths), H, D, D)
    check_output(o, ref_o, q, k, v, slopes, init, cu)
    assert_close_to_reference(final.cpu(), ref_final, tol=1e-5, what="final state")
    # An empty sequence passes its initial state through untouched.
    torch.testing.assert_close(final[2].cpu(), init[2].cpu(), rtol=0, atol=0)


def test_prefill_varlen_segmented(device, poison_outputs):
    lengths = [1, 200, 3, 129]
    H, D = 2, 64
    q, k, v, cu = varlen_case(lengths, H, D, torch.float32, device)
    slopes = mk.lightning_slopes(H, 78, 80).to(device)
    init = make_state(len(lengths), H, D, device)
    o, final = lightning_prefill_triton(q, k, v, slopes, init, cu, True, segment_len=64)
    ref_o, ref_final = ref.lightning_recurrence(q.cpu(), k.cpu(), v.cpu(), slopes.cpu(), init.cpu(),
                                                cu_seqlens=cu.cpu())
    assert rel_err(o.cpu(), ref_o) <= 1e-5
    assert rel_err(final.cpu(), ref_final) <= 1e-5


def lightning_magnitudes(q, k, v, slopes, initial_state=None):
    """The fp64 recurrence on |q|, |k|, |v|, |S_0|: per element of o and of the final state, the
    sum of the magnitudes of the terms that make it up — the scale of a rounding error bound."""
    return ref.lightning_recurrence(q.abs().cpu(), k.abs().cpu(), v.abs().cpu(), slopes.cpu(),
                                    None if initial_state is None else initial_state.abs().cpu())


# Per element, the bf16 prefill's error beyond the final rounding of o must stay under
# SPLIT_BOUND × the magnitude of its terms with precision="high", which feeds each fp32 operand of
# a bf16 matmul (Q × S, decayed scores × V, decayed K^T × V) as a bf16 pair hi + lo (the default
# mode keeps the pair only for the decayed keys of the state update; the 2×-naive checks above
# bound its o, and the 1e-5 checks its state): ≥ 16 significant bits
# (2^-17 relative with round-to-nearest, under 2^-14 with the interpreter's truncation),
# then fp32 accumulation. Measured through the interpreter: ≤ 5e-7 × |terms| on o and ≤ 3e-6
# on the state. Without lo (hi alone, 8 bits, as in the naive form) it is 1e-4 … 6e-4 on o and
# ~1e-3 on the state: a flat relative bound on the bf16 o cannot see that (the storage rounding,
# ~2e-3, hides it), which is why this looks at each element and at the fp32 state.
SPLIT_BOUND = 2.0 ** -15


@pytest.mark.parametrize("T,H,layer,segment_len", [
    pytest.param(128, 1, 78, None, id="T128-H1-L78-bf16-init"),
    pytest.param(192, 2, 39, 64, id="T192-H2-L39-bf16-init-seg64"),
])
def test_prefill_bf16_split_keeps_fp32_accuracy(T, H, layer, segment_len, device, poison_outputs):
    """Fails if precision="high" drops the low half of a bf16 hi/lo split (``_dot_fp32_lhs``/``_rhs``)."""
    D = 64
    q, k, v = make_qkv(1, T, H, D, torch.bfloat16, device, seed=T + layer)
    slopes = mk.lightning_slopes(H, layer, 80).to(device)
    init = make_state(1, H, D, device, seed=T)
    if segment_len is None:
        o, final = mk.lightning_attention(q, k, v, slopes, initial_state=init, output_final_state=True,
                                          backend="triton", precision="high")
    else:  # local-state, scan and output passes
        o, final = lightning_prefill_triton(q, k, v, slopes, init, None, True, segment_len=segment_len,
                                            precision="high")
    ref_o, ref_final = ref.lightning_recurrence(q.cpu(), k.cpu(), v.cpu(), slopes.cpu(), init.cpu())
    mag_o, mag_final = lightning_magnitudes(q, k, v, slopes, init)
    # o: within one bf16 spacing of the truth (either rounding mode) plus the compute bound.
    excess = ((o.cpu().double() - ref_o).abs() - bf16_ulp(ref_o)) / mag_o
    assert excess.max().item() <= SPLIT_BOUND, \
        f"o: error beyond the bf16 rounding reaches {excess.max().item():.2e} × |terms| > {SPLIT_BOUND:.1e}"
    state_err = (final.cpu().double() - ref_final).abs() / mag_final
    assert state_err.max().item() <= SPLIT_BOUND, \
        f"final state: error {state_err.max().item():.2e} × |terms| > {SPLIT_BOUND:.1e}"
    assert_close_to_reference(final.cpu(), ref_final, tol=1e-5, what="final state")


@pytest.mark.parametrize("segment_len", [None, 64], ids=["one-pass", "seg64"])
def test_prefill_precision_modes(segment_len, device, poison_outputs):
    """precision="default" (one bf16 product per fp32 operand, except the state update's decayed
    keys) stays within 2× the naive bf16 error and keeps the fp32 state; "high" is at least as
    accurate on o; fp32 and fp16 inputs ignore the option (bitwise), as does the torch backend."""
    T, H, D = 200, 2, 64
    slopes = mk.lightning_slopes(H, 39, 80).to(device)
    init = make_state(1, H, D, device, seed=7)
    q, k, v = make_qkv(1, T, H, D, torch.bfloat16, device, seed=11)
    ref_o, ref_final = ref.lightning_recurrence(q.cpu(), k.cpu(), v.cpu(), slopes.cpu(), init.cpu())
    err = {}
    for precision in ("default", "high"):
        o, final = lightning_prefill_triton(q, k, v, slopes, init, None, True, segment_len=segment_len,
                                            precision=precision)
        err[precision] = check_output(o, ref_o, q, k, v, slopes, init, what=f"o ({precision})")
        assert_close_to_reference(final.cpu(), ref_final, tol=1e-5, what=f"final state ({precision})")
    assert err["high"] <= err["default"] * 1.001, err
    for dtype in (torch.float16, torch.float32):
        q, k, v = make_qkv(1, T, H, D, dtype, device, seed=11)
        outs = [lightning_prefill_triton(q, k, v, slopes, init, None, True, segment_len=segment_len,
                                         precision=p) for p in ("default", "high")]
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), dtype
    q, k, v = make_qkv(1, 70, H, D, torch.bfloat16, device, seed=11)
    outs = [mk.lightning_attention(q, k, v, slopes, backend="torch", precision=p)[0] for p in ("default", "high")]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefill_precision_is_validated(backend, device):
    q, k, v, slopes = _good(device)
    for bad in ("fast", "HIGH", None, 1):
        with pytest.raises(ValueError, match="precision"):
            mk.lightning_attention(q, k, v, slopes, backend=backend, precision=bad)
    with pytest.raises(ValueError, match="precision"):  # the op itself, called directly
        torch.ops.mm1.lightning_attention(q, k, v, slopes, None, None, False, backend, "fast")
    cache = torch.zeros(2, 2, 32, 32, device=device)
    with pytest.raises(ValueError, match="precision"):
        torch.ops.mm1.lightning_attention_cached(q, k, v, slopes, cache, torch.tensor([0], device=device),
                                                 None, False, backend, "fast")


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_strided_views_of_fused_qkv(backend, device):
    """M1 splits a per-head interleaved qkv tensor: q, k, v are strided views, not copies."""
    B, T, H, D = 2, 70, 2, 64
    qkv = torch.nn.functional.silu(torch.randn(B, T, H, 3 * D)).to(device)
    q, k, v = qkv.split(D, dim=-1)
    slopes = mk.lightning_slopes(H, 39, 80).to(device)
    o, _ = mk.lightning_attention(q, k, v, slopes, backend=backend)
    ref_o, _ = ref.lightning_recurrence(q.cpu(), k.cpu(), v.cpu(), slopes.cpu())
    assert rel_err(o.cpu(), ref_o) <= 1e-5


def test_prefill_no_final_state_and_determinism(device):
    q, k, v = make_qkv(1, 130, 2, 64, torch.bfloat16, device)
    slopes = mk.lightning_slopes(2, 0, 80).to(device)
    o1, f1 = mk.lightning_attention(q, k, v, slopes, backend="triton")
    o2, _ = mk.lightning_attention(q, k, v, slopes, backend="triton")
    assert f1 is None
    assert torch.equal(o1, o2)


# --------------------------------------------------------------------------- decode

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_matches_recurrence_with_padding(backend, dtype, device, poison_outputs):
    B, H, D, S = 4, 3, 64, 6
    slopes = mk.lightning_slopes(H, 39, 80).to(device)
    cache = make_state(S, H, D, device)
    before = cache.clone()
    q, k, v = (t[:, 0] for t in make_qkv(B, 1, H, D, dtype, device))
    slots = torch.tensor([5, -1, 0, 2], dtype=torch.int32, device=device)
    o = mk.lightning_decode(q, k, v, slopes, cache, slots, backend=backend)
    assert o.shape == (B, H, D) and o.dtype == dtype
    lam = torch.exp(-slopes.double().cpu())[:, None, None]
    for b, slot in enumerate(slots.tolist()):
        if slot < 0:
            assert torch.equal(o[b].cpu(), torch.zeros(H, D, dtype=dtype))
            continue
        S_new = lam * before[slot].double().cpu() + k[b].double().cpu()[:, :, None] * v[b].double().cpu()[:, None, :]
        assert rel_err(cache[slot].cpu(), S_new) <= 1e-6
        o_ref = torch.einsum("hd,hde->he", q[b].double().cpu(), S_new)
        check_output(o[b][None, None], o_ref[None, None], q[b][None, None], k[b][None, None],
                     v[b][None, None], slopes, before[slot][None], what=f"o of row {b}")
    for untouched in (1, 3, 4):  # slots no row points at, including the padding row's
        assert torch.equal(cache[untouched], before[untouched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_accepts_b1hd_and_default_slots(backend, device):
    B, H, D = 2, 2, 64
    slopes = mk.lightning_slopes(H, 0, 80).to(device)
    cache = torch.zeros(3, H, D, D, device=device)
    q, k, v = make_qkv(B, 1, H, D, torch.float32, device)
    o = mk.lightning_decode(q, k, v, slopes, cache, backend=backend)
    assert o.shape == (B, 1, H, D)
    expected = torch.einsum("bhd,bhd,bhe->bhe", q[:, 0].double(), k[:, 0].double(), v[:, 0].double())
    assert rel_err(o[:, 0].cpu(), expected.cpu()) <= 1e-6
    assert torch.equal(cache[2], torch.zeros(H, D, D, device=device))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_then_decode_equals_longer_prefill(backend, dtype, device):
    """Prefill T1 tokens, decode T2 more through the slot cache == prefill of T1 + T2."""
    lengths, T2, H, D = [5, 70], 6, 2, 64
    slopes = mk.lightning_slopes(H, 78, 80).to(device)
    full = [make_qkv(1, n + T2, H, D, dtype, device, seed=10 + i) for i, n in enumerate(lengths)]
    # Prefill the prompts as one varlen batch.
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32, device=device)
    packed = [torch.cat([full[i][j][:, :lengths[i]] for i in range(2)], dim=1) for j in range(3)]
    _, states = mk.lightning_attention(*packed, slopes, output_final_state=True, cu_seqlens=cu, backend=backend)
    cache = torch.full((4, H, D, D), float("nan"), device=device)
    slots = torch.tensor([3, 1], dtype=torch.int32, device=device)
    cache[slots.long()] = states
    outs = []
    for t in range(T2):
        q, k, v = (torch.cat([full[i][j][:, lengths[i] + t] for i in range(2)]) for j in range(3))
        outs.append(mk.lightning_decode(q, k, v, slopes, cache, slots, backend=backend))
    for i in range(2):
        o_full, s_full = mk.lightning_attention(*full[i], slopes, output_final_state=True, backend=backend)
        decoded = torch.stack([o[i] for o in outs])
        assert rel_err(decoded.float(), o_full[0, lengths[i]:].float()) <= TOL[dtype]
        assert rel_err(cache[slots[i]], s_full[0]) <= 1e-5


# --------------------------------------------------------------------------- dispatch and compile

def test_auto_backend_and_env_override(device, monkeypatch):
    q, k, v = make_qkv(1, 10, 2, 32, torch.float32, device)
    slopes = mk.lightning_slopes(2, 0, 80).to(device)
    ref_o, _ = ref.lightning_recurrence(q.cpu(), k.cpu(), v.cpu(), slopes.cpu())
    o, _ = mk.lightning_attention(q, k, v, slopes)
    assert rel_err(o.cpu(), ref_o) <= 1e-5
    monkeypatch.setenv("MM1_BACKEND", "triton")
    o, _ = mk.lightning_attention(q, k, v, slopes)
    assert rel_err(o.cpu(), ref_o) <= 1e-5
    monkeypatch.setenv("MM1_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="MM1_BACKEND"):
        mk.lightning_attention(q, k, v, slopes)


def test_unavailable_backends_raise(monkeypatch):
    q, k, v = make_qkv(1, 4, 2, 32, torch.float32, "cpu")
    slopes = mk.lightning_slopes(2, 0, 80)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        mk.lightning_attention(q, k, v, slopes, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        mk.lightning_attention(q, k, v, slopes, backend="tpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        mk.lightning_attention(q, k, v, slopes, backend="triton")
    if q.device.type == "cpu":  # interpreter set after import: the kernels may be GPU-defined
        import mm1_kernels._dispatch as dispatch
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(dispatch, "INTERPRET_AT_IMPORT", False)
        with pytest.raises(BackendUnavailableError, match="set after mm1_kernels was imported"):
            mk.lightning_attention(q, k, v, slopes, backend="triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    H, D = 2, 32
    slopes = mk.lightning_slopes(H, 39, 80).to(device)

    def step(q, k, v, cache, slots):
        o, final = mk.lightning_attention(q, k, v, slopes, output_final_state=True, backend=backend)
        cache[slots.long()] = final
        return o, mk.lightning_decode(q[:, -1], k[:, -1], v[:, -1], slopes, cache, slots, backend=backend)

    q, k, v = make_qkv(2, 9, H, D, torch.float32, device)
    slots = torch.tensor([1, 0], dtype=torch.int32, device=device)
    cache_a = torch.zeros(2, H, D, D, device=device)
    cache_b = cache_a.clone()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    o_c, d_c = compiled(q, k, v, cache_a, slots)
    o_e, d_e = step(q, k, v, cache_b, slots)
    torch.testing.assert_close(o_c, o_e)
    torch.testing.assert_close(d_c, d_e)
    torch.testing.assert_close(cache_a, cache_b)


# --------------------------------------------------------------------------- invalid inputs

def _good(device="cpu"):
    q, k, v = make_qkv(1, 8, 2, 32, torch.float32, device)
    return q, k, v, mk.lightning_slopes(2, 0, 80).to(device)


@pytest.mark.parametrize("mutate,exc", [
    (lambda a: a.update(q=a["q"].int()), TypeError),
    (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), TypeError),
    (lambda a: a.update(k=a["k"].bfloat16()), TypeError),
    (lambda a: a.update(q="not a tensor"), TypeError),
    (lambda a: a.update(q=a["q"][0]), ValueError),
    (lambda a: a.update(k=a["k"][:, :4]), ValueError),
    (lambda a: a.update(v=a["v"][:, :, :1]), ValueError),
    (lambda a: a.update(q=a["q"].transpose(-1, -2).contiguous().transpose(-1, -2)), ValueError),
    (lambda a: a.update(slopes=a["slopes"].double()), TypeError),
    (lambda a: a.update(slopes=a["slopes"][:1]), ValueError),
    (lambda a: a.update(slopes=a["slopes"].to("meta")), ValueError),
    (lambda a: a.update(initial_state=torch.zeros(1, 2, 32, 16)), ValueError),
    (lambda a: a.update(initial_state=torch.zeros(1, 2, 32, 32, dtype=torch.bfloat16)), TypeError),
    (lambda a: a.update(initial_state=torch.zeros(1, 2, 32, 32).transpose(2, 3)), ValueError),
    (lambda a: a.update(cu_seqlens=torch.tensor([1, 8], dtype=torch.int32)), ValueError),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), ValueError),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.float32)), TypeError),
    (lambda a: a.update(cu_seqlens=torch.tensor([0], dtype=torch.int32)), ValueError),
    (lambda a: a.update(q=a["q"].expand(2, -1, -1, -1), k=a["k"].expand(2, -1, -1, -1),
                        v=a["v"].expand(2, -1, -1, -1), cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)),
     ValueError),
    (lambda a: a.update(output_final_state="yes"), TypeError),
])
def test_prefill_rejects_bad_input(mutate, exc):
    q, k, v, slopes = _good()
    args = dict(q=q, k=k, v=v, slopes=slopes)
    mutate(args)
    with pytest.raises(exc):
        mk.lightning_attention(backend="torch", **args)


@pytest.mark.parametrize("mutate,exc", [
    (lambda a: a.update(slot_ids=torch.tensor([0, 4], dtype=torch.int32)), ValueError),
    (lambda a: a.update(slot_ids=torch.tensor([0.0, 1.0])), TypeError),
    (lambda a: a.update(slot_ids=torch.tensor([0], dtype=torch.int32)), ValueError),
    (lambda a: a.update(state_cache=torch.zeros(4, 2, 32, 16)), ValueError),
    (lambda a: a.update(state_cache=torch.zeros(4, 2, 32, 32, dtype=torch.bfloat16)), TypeError),
    (lambda a: a.update(state_cache=torch.zeros(4, 2, 32, 32).transpose(2, 3)), ValueError),
    (lambda a: a.update(state_cache=torch.zeros(1, 2, 32, 32), slot_ids=None), ValueError),
    (lambda a: a.update(q=a["q"][:, None, None]), ValueError),
    (lambda a: a.update(k=a["k"][:1]), ValueError),
    (lambda a: a.update(v=a["v"].half()), TypeError),
])
def test_decode_rejects_bad_input(mutate, exc):
    q, k, v, slopes = _good()
    args = dict(q=q[0, :2], k=k[0, :2], v=v[0, :2], slopes=slopes,
                state_cache=torch.zeros(4, 2, 32, 32), slot_ids=torch.tensor([0, 3], dtype=torch.int32))
    mutate(args)
    cache_before = args["state_cache"].clone()
    with pytest.raises(exc):
        mk.lightning_decode(backend="triton", **args)
    assert torch.equal(args["state_cache"], cache_before)


def test_decode_kernel_guards_out_of_range_slot_when_host_check_skipped(device, monkeypatch):
    """During graph capture the host check is skipped: the kernel must not write out of bounds."""
    import mm1_kernels.lightning.api as api
    monkeypatch.setattr(api, "check_slot_ids", lambda *a, **k: None)
    q, k, v, slopes = _good(device)
    cache = torch.zeros(3, 2, 32, 32, device=device)
    guard = torch.zeros(2, 2, 32, 32, device=device)  # not part of the cache
    o = mk.lightning_decode(q[0, :2], k[0, :2], v[0, :2], slopes, cache,
                            torch.tensor([7, 1], dtype=torch.int32, device=device), backend="triton")
    assert torch.isnan(o[0]).all()
    assert torch.isfinite(o[1]).all()
    assert torch.equal(cache[0], torch.zeros_like(cache[0])) and torch.equal(guard, torch.zeros_like(guard))


@pytest.mark.parametrize("H", [64, 8], ids=["H64", "H8-TP8"])
def test_one_million_token_plan_fills_gpu_within_scratch_budget(H, monkeypatch):
    """The static plan for one 1,048,576-token sequence at M1 shape (all 64 heads, or the 8 of
    one GPU at TP=8) on a 132-SM H100."""
    from mm1_kernels.lightning import triton_prefill as tp
    monkeypatch.setattr(tp, "_num_sms", lambda device: 132)
    T, D = 1 << 20, 128
    nv = D // tp.prefill_tiles(D, D, torch.bfloat16)[0]
    state_bytes = H * D * D * 4
    L = tp.choose_segment_len(T, 1, H, nv, state_bytes, torch.device("cuda"))
    assert L is not None and L % tp.CHUNK == 0
    cu = torch.tensor([0, T])
    meta, first, last = tp.build_segments(cu[:-1], cu[1:], torch.zeros(1, dtype=torch.int64), T, L)
    G = meta.shape[0]
    assert G * state_bytes <= 2 << 30                      # scratch beyond inputs/outputs/states
    active = meta[:, 0] >= 0
    # One program per SM (8 warps, the register file's worth; triton_prefill.PROGRAMS_PER_SM):
    # the nearest multiple of H · nv to 132, within one wave.
    programs = int(active.sum()) * H * nv
    assert 0.9 * 132 * tp.PROGRAMS_PER_SM <= programs <= 132 * tp.PROGRAMS_PER_SM, programs
    # Segments tile the sequence exactly, in order.
    spans = meta[active][:, 2:4]
    assert spans[0, 0] == 0 and spans[-1, 1] == T and torch.equal(spans[1:, 0], spans[:-1, 1])
    assert int(first[0]) == 0 and int(last[0]) == int(active.sum()) - 1


def test_value_checks_rerun_after_in_place_change():
    """The host-side value check is memoized per tensor, but an in-place write invalidates it."""
    q, k, v, slopes = _good()
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    mk.lightning_attention(q, k, v, slopes, cu_seqlens=cu, backend="torch")
    cu[1] = 9
    with pytest.raises(ValueError, match="non-decreasing"):
        mk.lightning_attention(q, k, v, slopes, cu_seqlens=cu, backend="torch")
    cache = torch.zeros(4, 2, 32, 32)
    slots = torch.tensor([0, 3], dtype=torch.int32)
    mk.lightning_decode(q[0, :2], k[0, :2], v[0, :2], slopes, cache, slots, backend="torch")
    slots[1] = 4
    with pytest.raises(ValueError, match="slot"):
        mk.lightning_decode(q[0, :2], k[0, :2], v[0, :2], slopes, cache, slots, backend="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])
def test_decode_and_varlen_prefill_capture_in_a_cuda_graph(backend):
    """No host synchronization: both ops record into a CUDA graph and replay correctly."""
    H, D = 4, 128
    slopes = mk.lightning_slopes(H, 39, 80).cuda()
    q, k, v = (t[:, 0] for t in make_qkv(6, 1, H, D, torch.bfloat16, "cuda"))
    slots = torch.tensor([3, -1, 0, 5, 2, 1], dtype=torch.int32, device="cuda")
    state = make_state(8, H, D, "cuda")
    pq, pk, pv = make_qkv(1, 300, H, D, torch.bfloat16, "cuda", seed=4)
    cu = torch.tensor([0, 1, 130, 300], dtype=torch.int32, device="cuda")
    ref_state = state.clone()
    ref_o = mk.lightning_decode(q, k, v, slopes, ref_state, slots, backend=backend)
    ref_p, ref_f = mk.lightning_attention(pq, pk, pv, slopes, output_final_state=True, cu_seqlens=cu,
                                          backend=backend)
    work = state.clone()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # warm-up (compilation) outside the capture
        mk.lightning_decode(q, k, v, slopes, work, slots, backend=backend)
        mk.lightning_attention(pq, pk, pv, slopes, output_final_state=True, cu_seqlens=cu, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    work.copy_(state)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o = mk.lightning_decode(q, k, v, slopes, work, slots, backend=backend)
        p, f = mk.lightning_attention(pq, pk, pv, slopes, output_final_state=True, cu_seqlens=cu,
                                      backend=backend)
    work.copy_(state)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(o, ref_o) and torch.equal(work, ref_state)
    assert torch.equal(p, ref_p) and torch.equal(f, ref_f)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 8, 2, 32), (2, 0, 2, 32)], ids=["B0", "T0"])
def test_empty_batch_or_sequence(backend, shape):
    """No tokens: empty outputs, the initial state (here zeros) as the final state, zero gradients;
    no planner division by zero (an empty batch has no programs to split)."""
    q = torch.randn(*shape, requires_grad=True)
    slopes = torch.rand(shape[2])
    o, final = mk.lightning_attention(q, q, q, slopes, output_final_state=True, backend=backend)
    assert o.shape == shape and final.shape == (shape[0], shape[2], shape[3], shape[3])
    assert bool((final == 0).all())
    (o.sum() + final.sum()).backward()
    assert q.grad.shape == shape and bool((q.grad == 0).all())

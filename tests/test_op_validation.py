"""Every op refuses bad input loudly, and non-finite input never becomes a quiet wrong answer
(issue 10 §4, ops): a ValueError/TypeError that names the argument, in-range ids with NaN
weights, and causality that survives a NaN in a later token."""
import pytest
import torch

import mm1_kernels as mk
from mm1_kernels.moe import reference as mref

NAN, INF = float("nan"), float("inf")
# NaN/inf inputs are the point here; numpy's warnings about them inside the interpreter are not.
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning:mm1_kernels._triton_interpret")]


def backends_of(op):
    """One param per backend the op implements; those that cannot run here are skipped."""
    return [pytest.param(b, id=b) for b in mk.available_backends(op)]


def runnable(op, backend, device):
    if backend not in mk.available_backends(op, device):
        pytest.skip(f"{op}: backend {backend!r} cannot run on {device}")


# --------------------------------------------------------------------------- lightning_decode

def _decode_args(B, S=4, H=2, D=16, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.nn.functional.silu(torch.randn(B, H, D, generator=g)).to(device) for _ in range(3))
    slopes = mk.lightning_slopes(H, 0, 4).to(device)
    cache = (0.1 * torch.randn(S, H, D, D, generator=g)).to(device)
    return q, k, v, slopes, cache


@pytest.mark.parametrize("backend", backends_of("lightning_decode"))
@pytest.mark.parametrize("slots", [
    pytest.param([0, 0], id="two-rows-one-slot"),
    pytest.param([1, -1, 3, 1], id="repeat-around-padding"),
    pytest.param([2, 0, 1, 0], id="repeat-far-apart"),
])
def test_decode_refuses_duplicate_slots(slots, backend, device):
    runnable("lightning_decode", backend, device)
    q, k, v, slopes, cache = _decode_args(len(slots), device=device)
    before = cache.clone()
    with pytest.raises(ValueError, match="slot_ids must be distinct"):
        mk.lightning_decode(q, k, v, slopes, cache, torch.tensor(slots, dtype=torch.int32, device=device),
                            backend=backend)
    assert torch.equal(cache, before)


@pytest.mark.parametrize("backend", backends_of("lightning_decode"))
def test_decode_padding_ids_may_repeat(backend, device):
    runnable("lightning_decode", backend, device)
    q, k, v, slopes, cache = _decode_args(4, device=device)
    slots = torch.tensor([-1, 2, -1, -5], dtype=torch.int64, device=device)
    o = mk.lightning_decode(q, k, v, slopes, cache, slots, backend=backend)
    assert torch.equal(o[[0, 2, 3]], torch.zeros_like(o[[0, 2, 3]])) and torch.isfinite(o[1]).all()


def test_decode_duplicate_check_reruns_after_in_place_change():
    """The slot check is memoized per tensor (one host sync for all layers), but an in-place
    write that creates a duplicate is caught on the next call."""
    q, k, v, slopes, cache = _decode_args(2)
    slots = torch.tensor([0, 3], dtype=torch.int32)
    mk.lightning_decode(q, k, v, slopes, cache, slots, backend="torch")
    mk.lightning_decode(q, k, v, slopes, cache, slots, backend="torch")  # memo hit
    slots[1] = 0
    with pytest.raises(ValueError, match="slot_ids must be distinct"):
        mk.lightning_decode(q, k, v, slopes, cache, slots, backend="torch")


# --------------------------------------------------------------------------- lightning prefill: causality under NaN

def _prefill_inputs(T, H=2, D=16, device="cpu", seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.nn.functional.silu(torch.randn(1, T, H, D, generator=g)).to(device, dtype) for _ in range(3))
    return q, k, v, mk.lightning_slopes(H, 1, 8).to(device)


CAUSAL_CASES = [
    # (T, poisoned token, cu_seqlens or None)
    pytest.param(37, 36, None, id="T37-last-token"),
    pytest.param(37, 5, None, id="T37-same-chunk"),
    pytest.param(70, 66, None, id="T70-second-chunk"),
    pytest.param(70, 40, [0, 30, 70], id="T70-varlen-later-sequence"),
]


def _check_prefix_unaffected(poison, T, bad, cu, backend, device, dtype=torch.float32):
    q, k, v, slopes = _prefill_inputs(T, device=device, dtype=dtype)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    clean, _ = mk.lightning_attention(q, k, v, slopes, cu_seqlens=cu_t, backend=backend)
    poisoned = {"q": q, "k": k, "v": v}
    poisoned[poison] = poisoned[poison].clone()
    poisoned[poison][0, bad, 0, 3] = NAN
    o, _ = mk.lightning_attention(poisoned["q"], poisoned["k"], poisoned["v"], slopes, cu_seqlens=cu_t,
                                  backend=backend)
    assert torch.isfinite(o[:, :bad]).all(), (
        f"a NaN in {poison} of token {bad} reached earlier tokens "
        f"{torch.nonzero((~torch.isfinite(o[0, :bad])).flatten(1).any(-1)).flatten().tolist()}")
    torch.testing.assert_close(o[:, :bad], clean[:, :bad], rtol=1e-6, atol=1e-6)
    assert not torch.isfinite(o[0, bad]).all()  # the poisoned token itself is loud


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", backends_of("lightning_attention"))
@pytest.mark.parametrize("T,bad,cu", CAUSAL_CASES)
def test_prefill_nan_in_later_k_stays_out_of_earlier_outputs(T, bad, cu, backend, dtype, device):
    # Each input dtype takes its own code path in the kernels (bf16: the hi/lo split products).
    runnable("lightning_attention", backend, device)
    _check_prefix_unaffected("k", T, bad, cu, backend, device, dtype)


@pytest.mark.parametrize("T,bad,cu", CAUSAL_CASES)
def test_prefill_nan_in_later_v_stays_out_of_earlier_outputs_torch(T, bad, cu, device):
    """v as well (``0 · NaN`` inside ``scores @ v``); the torch backend only for now: the
    Triton and CUDA kernels form P·V with a dense MMA over the diagonal tile."""
    _check_prefix_unaffected("v", T, bad, cu, "torch", device)


# --------------------------------------------------------------------------- moe_route

ROW_KINDS = {
    "one-nan": lambda r: r.index_fill_(0, torch.tensor([3]), NAN),
    "all-nan": lambda r: r.fill_(NAN),
    "one-pos-inf": lambda r: r.index_fill_(0, torch.tensor([5]), INF),
    "all-neg-inf": lambda r: r.fill_(-INF),
    "pos-and-neg-inf": lambda r: r.index_fill_(0, torch.tensor([1]), INF).index_fill_(0, torch.tensor([2]), -INF),
}


@pytest.mark.parametrize("backend", backends_of("moe_route"))
@pytest.mark.parametrize("renormalize", [pytest.param(True, id="renorm"), pytest.param(False, id="no-renorm")])
@pytest.mark.parametrize("kind", [pytest.param(k, id=k) for k in ROW_KINDS])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_moe_route_non_finite_row_gives_in_range_ids_and_nan_weights(kind, renormalize, dtype, backend, device):
    runnable("moe_route", backend, device)
    T, E, k = 5, 8, 3
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(0))
    logits[1, 4] = -INF  # a finite row with one -inf logit routes normally
    ROW_KINDS[kind](logits[2])
    logits = logits.to(device, dtype)
    w, ids = mk.moe_route(logits, top_k=k, renormalize=renormalize, backend=backend)
    assert ids.dtype == torch.int32 and bool(((ids >= 0) & (ids < E)).all())
    assert torch.equal(ids[2].cpu(), torch.arange(k, dtype=torch.int32))
    assert torch.isnan(w[2]).all()
    good = [0, 1, 3, 4]
    assert torch.isfinite(w[good]).all()
    w_ref, ids_ref = mref.moe_route_reference(logits.double(), k, renormalize)
    assert torch.equal(ids.long().cpu(), ids_ref.cpu())
    torch.testing.assert_close(w[good].double().cpu(), w_ref[good].cpu(), rtol=1e-5, atol=1e-7)
    assert torch.isnan(w_ref[2]).all()
    assert not bool((ids[1] == 4).any())  # the -inf expert of a finite row is never picked


# --------------------------------------------------------------------------- head: temperature and NaN logits

def _head_inputs(T=4, V=40, K=16, max_logit=50.0, device="cpu"):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(T, K, generator=g)
    w = torch.randn(V, K, generator=g)
    h = h * (max_logit / (h @ w.T).abs().max())
    targets = torch.randint(0, V, (T,), generator=g)
    return h.to(device), w.to(device), targets.to(device)


# max |logit| is 50: 50 / 1e-37 = 5e38 overflows fp32 (3.4e38); 50 / 1e-35 = 5e36 is within the
# documented safe range (max|logit| / temperature <= 1e37).
OVERFLOWING_T = 1e-37
TINY_BUT_SAFE_T = 1e-35


@pytest.mark.parametrize("backend", backends_of("head_logprobs"))
def test_head_logprobs_refuses_overflowing_temperature(backend, device):
    runnable("head_logprobs", backend, device)
    h, w, t = _head_inputs(device=device)
    with pytest.raises(ValueError, match="temperature=1e-37 is too small"):
        mk.head_logprobs(h, w, t, temperature=OVERFLOWING_T, backend=backend)


@pytest.mark.parametrize("backend", backends_of("head_logprobs"))
def test_head_logprobs_accepts_tiny_temperature_that_does_not_overflow(backend, device):
    runnable("head_logprobs", backend, device)
    h, w, t = _head_inputs(device=device)
    out = mk.head_logprobs(h, w, t, temperature=TINY_BUT_SAFE_T, backend=backend)
    assert all(torch.isfinite(x).all() for x in out)


@pytest.mark.parametrize("backend", backends_of("head_cispo_loss"))
def test_head_cispo_loss_refuses_overflowing_temperature(backend, device):
    runnable("head_cispo_loss", backend, device)
    h, w, t = _head_inputs(device=device)
    zeros = torch.zeros(t.shape, device=device)
    with pytest.raises(ValueError, match="temperature"):
        mk.head_cispo_loss(h, w, t, zeros, zeros + 1, temperature=OVERFLOWING_T, backend=backend)


@pytest.mark.parametrize("backend", backends_of("head_sample"))
def test_head_sample_refuses_overflowing_temperature_but_greedy_works(backend, device):
    runnable("head_sample", backend, device)
    h, w, _ = _head_inputs(device=device)
    with pytest.raises(ValueError, match="temperature=1e-37 is too small"):
        mk.head_sample(h, w, temperature=OVERFLOWING_T, backend=backend)
    tokens, lp = mk.head_sample(h, w, temperature=0.0, backend=backend)
    assert torch.equal(tokens, (h.double() @ w.double().T).argmax(-1)) and torch.isfinite(lp).all()


@pytest.mark.parametrize("backend", backends_of("head_sample"))
def test_head_sample_accepts_tiny_temperature_that_does_not_overflow(backend, device):
    runnable("head_sample", backend, device)
    h, w, _ = _head_inputs(device=device)
    tokens, lp = mk.head_sample(h, w, temperature=TINY_BUT_SAFE_T, backend=backend)
    # At this temperature the distribution is one-hot on the argmax.
    assert torch.equal(tokens, (h.double() @ w.double().T).argmax(-1)) and torch.isfinite(lp).all()


@pytest.mark.parametrize("temperature,exc,match", [
    pytest.param(1e-39, ValueError, "temperature must be finite and >=", id="reciprocal-overflows"),
    pytest.param(-0.5, ValueError, "temperature must be", id="negative"),
    pytest.param(NAN, ValueError, "temperature must be", id="nan"),
    pytest.param(INF, ValueError, "temperature must be", id="inf"),
    pytest.param("1.0", TypeError, "temperature must be a float", id="string"),
    pytest.param(True, TypeError, "temperature must be a float", id="bool"),
])
@pytest.mark.parametrize("op", [pytest.param("head_logprobs", id="logprobs"), pytest.param("head_sample", id="sample")])
def test_head_refuses_bad_temperature_value(op, temperature, exc, match):
    h, w, t = _head_inputs()
    with pytest.raises(exc, match=match):
        if op == "head_logprobs":
            mk.head_logprobs(h, w, t, temperature=temperature, backend="torch")
        else:
            mk.head_sample(h, w, temperature=temperature, backend="torch")


@pytest.mark.parametrize("backend", backends_of("head_sample"))
@pytest.mark.parametrize("temperature", [pytest.param(0.0, id="greedy"), pytest.param(0.7, id="T0.7"),
                                         pytest.param(1.0, id="T1")])
@pytest.mark.parametrize("poison", [pytest.param("hidden", id="nan-hidden"), pytest.param("weight", id="nan-weight"),
                                    pytest.param("inf-hidden", id="inf-hidden")])
def test_head_sample_refuses_non_finite_logits(poison, temperature, backend, device):
    runnable("head_sample", backend, device)
    h, w, _ = _head_inputs(device=device)
    if poison == "hidden":
        h[2, 1] = NAN
    elif poison == "weight":
        w[7, 0] = NAN
    else:
        h[1, 0] = INF
    with pytest.raises(ValueError, match="cannot sample.*hidden or weight holds non-finite values"):
        mk.head_sample(h, w, temperature=temperature, generator=torch.Generator(device).manual_seed(0),
                       backend=backend)


@pytest.mark.parametrize("backend", backends_of("head_logprobs"))
def test_head_logprobs_passes_nan_hidden_through_at_any_temperature(backend, device):
    """NaN inputs give NaN rows (the NaN is the error signal), at T < 1 exactly as at T = 1; only
    an overflow that the temperature causes is refused."""
    runnable("head_logprobs", backend, device)
    h, w, t = _head_inputs(device=device)
    h[1, 2] = NAN
    for temperature in (1.0, 0.5):
        lp, lse, _ = mk.head_logprobs(h, w, t, temperature=temperature, backend=backend)
        assert torch.isnan(lse[1]) and torch.isfinite(lse[[0, 2, 3]]).all()


# --------------------------------------------------------------------------- other arguments

def test_quantize_refuses_odd_w13_rows():
    w13, w2 = torch.randn(2, 7, 8), torch.randn(2, 8, 3)
    with pytest.raises(ValueError, match="w13"):
        mk.quantize_moe_weights(w13, w2)


@pytest.mark.parametrize("bad,exc,match", [
    pytest.param(lambda ids: ids.float(), TypeError, "topk_ids must have dtype", id="float-ids"),
    pytest.param(lambda ids: ids.masked_fill(ids == ids[0, 0], 8), ValueError, r"topk_ids must be in \[0, 8\)",
                 id="id-equal-E"),
    pytest.param(lambda ids: ids - 5, ValueError, r"topk_ids must be in \[0, 8\)", id="negative-id"),
])
def test_fused_moe_refuses_bad_topk_ids(bad, exc, match):
    T, H, I, E = 3, 16, 8, 8
    x = torch.randn(T, H)
    w13, w2 = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    w, ids = mk.moe_route(torch.randn(T, E), top_k=2, backend="torch")
    with pytest.raises(exc, match=match):
        mk.fused_moe(x, w13, w2, w, bad(ids), backend="torch")


@pytest.mark.parametrize("targets,exc,match", [
    pytest.param([0, 40, 1, 2], ValueError, r"targets must be in \[0, 40\)", id="target-equal-V"),
    pytest.param([0, -1, 1, 2], ValueError, r"targets must be in \[0, 40\)", id="negative-not-ignore"),
    pytest.param([0.0, 1.0, 2.0, 3.0], TypeError, "targets must have dtype", id="float-targets"),
])
def test_head_logprobs_refuses_bad_targets(targets, exc, match):
    h, w, _ = _head_inputs()
    with pytest.raises(exc, match=match):
        mk.head_logprobs(h, w, torch.tensor(targets), backend="torch")


@pytest.mark.parametrize("args,exc,match", [
    pytest.param((2.5, 0, 4), TypeError, "num_heads must be an int", id="float-heads"),
    pytest.param((4, 1.0, 4), TypeError, "layer_idx must be an int", id="float-layer"),
    pytest.param((4, 0, True), TypeError, "num_layers must be an int", id="bool-layers"),
    pytest.param((4, 4, 4), ValueError, "layer_idx must be in", id="layer-out-of-range"),
    pytest.param((0, 0, 4), ValueError, "num_heads must be positive", id="zero-heads"),
])
def test_lightning_slopes_refuses_bad_sizes(args, exc, match):
    with pytest.raises(exc, match=match):
        mk.lightning_slopes(*args)


@pytest.mark.parametrize("bad", [pytest.param([-0.1, 0.2], id="negative"), pytest.param([float("nan"), 0.2], id="nan"),
                                 pytest.param([0.1, float("inf")], id="inf")])
def test_lightning_refuses_slopes_outside_the_decay_range(bad, device):
    q, k, v, _ = _prefill_inputs(5, device=device)
    slopes = torch.tensor(bad, device=device)
    with pytest.raises(ValueError, match="slopes must be finite and >= 0"):
        mk.lightning_attention(q, k, v, slopes)
    with pytest.raises(ValueError, match="slopes must be finite and >= 0"):
        mk.lightning_decode(q[:, 0], k[:, 0], v[:, 0], slopes, torch.zeros(1, 2, 16, 16, device=device))

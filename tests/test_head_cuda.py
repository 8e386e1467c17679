"""The head's CUDA C++ backend (csrc/head/, backend="cuda").

Without the extension (CI): the dispatcher refuses backend="cuda" with a reason, and
backend=None never picks it. With the extension on a GPU: forward statistics, stored logits
and gradients against fp64, batch invariance and run-to-run bitwise equality, sampling, the
fakes under torch.compile. The kernels' arithmetic and control flow are also checked on the
CPU by tests/test_cuda_emulation_head.py.
"""
from __future__ import annotations

import pytest
import torch
from test_head import TOL, make_inputs, max_err, naive_fp32_err

import mm1_kernels as mk
import mm1_kernels.head.reference as R
from mm1_kernels._dispatch import CUDA_EXTENSION_IMPORT_ERROR, cuda_op_registered

from numerics import rel_err

BUILT = CUDA_EXTENSION_IMPORT_ERROR is None and cuda_op_registered("head_forward_cuda")
needs_ext = pytest.mark.skipif(not BUILT, reason=f"CUDA extension without the head ops: {CUDA_EXTENSION_IMPORT_ERROR}")
HEAD_OPS = ("head_logprobs", "head_sample", "head_logits", "head_cispo_loss")


def test_overlapping_hidden_rows_are_copied():
    """The C API refuses rows closer than the width (an expanded [T, K] view has row stride 0):
    the Python glue copies exactly those, and passes every other layout through untouched."""
    from mm1_kernels.head.cuda_ops import _rows
    expanded = torch.randn(1, 8).expand(5, 8)
    fixed = _rows(expanded)
    assert fixed.stride(0) == 8 and torch.equal(fixed, expanded)
    strided = torch.randn(5, 12)[:, :8]
    assert _rows(strided) is strided
    one = torch.randn(1, 8).expand(1, 8)
    assert _rows(one) is one


def test_cuda_backend_refused_with_a_reason():
    h, w, t = make_inputs(3, 50, 16, torch.float32, 5.0)
    with pytest.raises(mk.BackendUnavailableError, match="head_logprobs.*needs CUDA tensors"):
        mk.head_logprobs(h, w, t, backend="cuda")
    if not BUILT:  # on a CUDA device the reason is the missing extension or op
        with pytest.raises(mk.BackendUnavailableError, match="cuda.*cannot run"):
            mk.resolve_backend("head_logprobs", "cuda", "cuda")
    for op in HEAD_OPS:  # never the automatic choice, on any device
        assert mk.available_backends(op)[-1] == "cuda"
        assert mk.resolve_backend(op, None, "cpu") == "torch"


def _cuda(*xs):
    return [x.cuda() for x in xs]


@pytest.mark.parametrize("T, V, K, dtype, max_logit, temp, ign", [
    (1, 1000, 32, torch.bfloat16, 20.0, 1.0, 0),
    (37, 4099, 64, torch.bfloat16, 30.0, 0.7, 5),      # 3 splits, partial tiles, ignored rows
    (130, 2048 * 3 + 1, 72, torch.float16, 20.0, 1.3, 4),  # a 1-id last split, K tail
    (70, 1000, 64, torch.bfloat16, 100.0, 1.0, 0),     # |logit| 100
    (17, 3000, 40, torch.float32, 20.0, 1.3, 3),       # fp32: the 3-way bf16 split
    (65, 2100, 45, torch.float32, 100.0, 1.0, 0),      # K not a multiple of 4: element staging
])
@pytest.mark.gpu
@needs_ext
def test_forward_against_fp64(T, V, K, dtype, max_logit, temp, ign):
    h, w, t = make_inputs(T, V, K, dtype, max_logit, "spike" if max_logit > 50 else "normal", ign, seed=T + V)
    out = mk.head_logprobs(*_cuda(h, w, t), temperature=temp, backend="cuda")
    errs = max_err([o.cpu() for o in out], R.head_reference(h, w, t, temp))
    tol = TOL if max_logit <= 50 else max(TOL, 2 * max(naive_fp32_err(h, w, t, temp)))
    assert max(errs) <= tol, errs
    z = mk.head_logits(*_cuda(h, w), temperature=temp, backend="cuda").cpu().double()
    zr = (h.double() @ w.double().T) / temp
    assert (z - zr).abs().max() <= 4 * torch.finfo(torch.float32).eps * max(1.0, zr.abs().max().item())


@pytest.mark.gpu
@needs_ext
def test_batch_invariant_and_deterministic():
    h, w, t = _cuda(*make_inputs(200, 5000, 96, torch.bfloat16, 30.0, ignore_every=6))
    full = mk.head_logprobs(h, w, t, backend="cuda")
    again = mk.head_logprobs(h, w, t, backend="cuda")
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    for rows in ([0], [63], [64], [199], [3, 130, 131]):
        sub = mk.head_logprobs(h[rows], w, t[rows], backend="cuda")
        assert all(torch.equal(a, b[rows]) for a, b in zip(sub, full)), rows
    # the sampling logits are the statistics' logits: the logprob of the argmax agrees bitwise
    tok, lp = mk.head_sample(h[:9], w, temperature=0.0, backend="cuda")
    assert torch.equal(lp, mk.head_logprobs(h[:9], w, tok, backend="cuda").logprobs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@needs_ext
def test_gradients_against_fp64_autograd(dtype):
    T, V, K, temp = 70, 4099, 48, 0.8
    h, w, t = make_inputs(T, V, K, dtype, 20.0, ignore_every=4, seed=3)
    g = torch.Generator().manual_seed(5)
    gl = [torch.randn(T, generator=g) for _ in range(3)]
    hk, wk = (x.cuda().requires_grad_() for x in (h, w))
    out = mk.head_logprobs(hk, wk, t.cuda(), temperature=temp, backend="cuda")
    (out.logprobs * gl[0].cuda() + out.lse * gl[1].cuda() + out.entropy * gl[2].cuda()).sum().backward()
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    ref = R.head_reference(h64, w64, t, temp)
    (ref[0] * gl[0] + ref[1] * gl[1] + ref[2] * gl[2]).sum().backward()
    tol = 2e-5 if dtype == torch.float32 else 6e-3
    assert rel_err(hk.grad.cpu(), h64.grad) <= tol and rel_err(wk.grad.cpu(), w64.grad) <= tol


@pytest.mark.gpu
@needs_ext
def test_compile_fullgraph():
    h, w, t = _cuda(*make_inputs(20, 900, 32, torch.bfloat16, 10.0))
    f = torch.compile(lambda h, w, t: mk.head_logprobs(h, w, t, backend="cuda"), fullgraph=True)
    assert all(torch.equal(a, b) for a, b in zip(f(h, w, t), mk.head_logprobs(h, w, t, backend="cuda")))
    torch.library.opcheck(torch.ops.mm1.head_forward_cuda.default, (h, w, t, 1.0, True))


@pytest.mark.gpu
@needs_ext
def test_precision_is_ignored():
    """The CUDA kernels always add each K block with a two-sum, so precision="high" changes
    nothing on this backend: bitwise the same statistics, logits, samples and gradients."""
    h, w, t = _cuda(*make_inputs(33, 2100, 96, torch.bfloat16, 100.0, "spike", seed=7))
    out = {}
    for p in ("default", "high"):
        hk = h.clone().requires_grad_()
        o = mk.head_logprobs(hk, w, t, backend="cuda", precision=p)
        (o.logprobs.sum() + o.entropy.sum()).backward()
        g = torch.Generator(device="cuda").manual_seed(0)
        out[p] = (*o, hk.grad, mk.head_logits(h, w, 0.9, backend="cuda", precision=p),
                  *mk.head_sample(h, w, 0.9, generator=g, backend="cuda", precision=p))
    assert all(torch.equal(a, b) for a, b in zip(out["default"], out["high"]))

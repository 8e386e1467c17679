"""CISPO objective (M1_REFERENCE §6): value, closed-form gradient, explicit bounds.

The fused head_cispo_loss is tested in test_head.py, beside the head it fuses.
"""
import pytest
import torch

import mm1_kernels as mk


def _closed_form(lp, old, adv, valid, lo, hi):
    r = torch.exp(lp.double() - old.double())
    r_hat = r if lo is None and hi is None else r.clamp(min=lo, max=hi)
    n = max(int(valid.sum()), 1)
    loss = -(torch.where(valid, r_hat * adv.double() * lp.double(), 0.0)).sum() / n
    grad = -torch.where(valid, r_hat * adv.double(), 0.0) / n   # r_hat is a constant
    return loss, grad, r


@pytest.mark.parametrize("eps_low,eps_high", [(None, 0.2), (0.1, 0.28), (None, None), (0.2, None)])
def test_cispo_value_and_gradient_closed_form(eps_low, eps_high):
    g = torch.Generator().manual_seed(0)
    B, L = 4, 9
    lp = -torch.rand(B, L, generator=g) * 3
    old = lp + torch.randn(B, L, generator=g)           # ratios from ~0.1 to ~10: both clips bite
    adv = torch.randn(B, 1, generator=g)                # one advantage per response, broadcast
    mask = torch.rand(B, L, generator=g) > 0.25
    lpk = lp.clone().requires_grad_()
    loss = mk.cispo_loss(lpk, old, adv, mask, eps_low=eps_low, eps_high=eps_high)
    loss.backward()
    lo = None if eps_low is None else 1 - eps_low
    hi = None if eps_high is None else 1 + eps_high
    want_loss, want_grad, r = _closed_form(lp, old, adv.expand(B, L), mask, lo, hi)
    if hi is not None:
        assert (r[mask] > hi).any()  # the test really exercises the upper clip
    if lo is not None:
        assert (r[mask] < lo).any()
    assert abs(loss.item() - want_loss.item()) <= 1e-6 * max(1.0, abs(want_loss.item()))
    assert (lpk.grad.double() - want_grad).abs().max() <= 1e-7
    assert (lpk.grad[~mask] == 0).all() and (lpk.grad[mask] != 0).all()  # no valid token dropped


def test_cispo_float_mask_and_no_valid_tokens():
    lp = (-torch.rand(6)).requires_grad_()
    old, adv = lp.detach() - 0.1, torch.randn(6)
    m = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    a = mk.cispo_loss(lp, old, adv, m)
    b = mk.cispo_loss(lp, old, adv, m.bool())
    assert torch.equal(a, b)
    old_inf = old.clone()
    old_inf[1] = float("-inf")  # a masked-out token with a non-finite old logprob must not poison
    assert torch.isfinite(mk.cispo_loss(lp, old_inf, adv, m.bool()))
    zero = mk.cispo_loss(lp, old, adv, torch.zeros(6, dtype=torch.bool))
    zero.backward()
    assert zero.item() == 0.0 and (lp.grad == 0).all()


def test_cispo_masked_non_finite_inputs_keep_gradients_finite():
    """Padding tokens may carry -inf/NaN old logprobs or NaN advantages: masked out, they must
    give neither a NaN loss nor a NaN gradient (0 · inf in the product's backward)."""
    lp = (-torch.rand(6)).requires_grad_()
    old, adv = lp.detach() - 0.1, torch.randn(6)
    old[1], old[4], adv[2] = float("-inf"), float("nan"), float("nan")
    mask = torch.tensor([True, False, False, True, False, True])
    for eps_high in (0.2, None):  # None: the -inf old logprob's ratio stays inf
        lp.grad = None
        loss = mk.cispo_loss(lp, old, adv, mask, eps_high=eps_high)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
        assert (lp.grad[~mask] == 0).all() and (lp.grad[mask] != 0).all()


def test_cispo_invalid_inputs():
    lp, old, adv, m = torch.zeros(5), torch.zeros(5), torch.zeros(5), torch.ones(5, dtype=torch.bool)
    with pytest.raises(ValueError):
        mk.cispo_loss(lp, old, adv, m, eps_high=-0.1)
    with pytest.raises(ValueError):
        mk.cispo_loss(lp, old[:4], adv, m)
    with pytest.raises(ValueError):
        mk.cispo_loss(lp, old, torch.zeros(3), m)
    with pytest.raises(ValueError):  # broadcasts, but to [2, 5]: would count each token twice
        mk.cispo_loss(lp, old, torch.zeros(2, 5), m)
    with pytest.raises(mk.BackendUnavailableError):
        mk.cispo_loss(lp, old, adv, m, backend="triton")

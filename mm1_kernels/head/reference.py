"""Reference math for the FP32 LM head and the CISPO objective (docs/m1_math.md §6).

``head_reference`` is the truth: fp64 logits from the same inputs, then logprob of the target,
logsumexp and entropy of the tempered distribution. It materializes ``[T, V]`` and is meant for
tests and diagnostics at small sizes. The production backends live elsewhere: the torch
backend (fp32 logits a block at a time) in ``torch_head.py``, the Triton kernels in
``triton_head.py``, and the backward driver both share in ``backward.py``.

Definitions, per token t with tempered logits ``z = (hidden @ weight.T) / temperature``:
    lse      = log Σ_j exp(z_j)
    logprob  = z_target - lse            (0 for target == IGNORE_INDEX)
    entropy  = lse - Σ_j p_j z_j         (p = softmax(z)), i.e. of the tempered distribution
"""
from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100


def head_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0, dtype: torch.dtype = torch.float64):
    """(logprobs, lse, entropy) ``[T]`` in ``dtype`` (fp64 by default), differentiable.

    hidden ``[T, K]``, weight ``[V, K]``, targets ``[T]`` (IGNORE_INDEX rows get logprob 0).
    """
    z = (hidden.to(dtype) @ weight.to(dtype).T) / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse[:, None]
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    lp = logp.gather(1, safe[:, None])[:, 0]
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    return lp, lse, entropy


def cispo_reference(logprobs, old_logprobs, advantages, mask, eps_low: Optional[float],
                    eps_high: Optional[float]):
    """CISPO loss, docs/m1_math.md §6, token-level normalization over all valid tokens.

    r = exp(logp - logp_old); r_hat = clip(r, 1 - eps_low, 1 + eps_high), stop-gradient;
    loss = -Σ mask · r_hat · A · logp / Σ mask (0 when no token is valid).
    ``eps_low=None``: no lower bound; ``eps_high=None``: no upper bound.
    """
    valid = mask if mask.dtype == torch.bool else mask != 0
    ratio = torch.exp(logprobs.detach() - old_logprobs)
    lo = None if eps_low is None else 1.0 - eps_low
    hi = None if eps_high is None else 1.0 + eps_high
    if lo is not None or hi is not None:
        ratio = ratio.clamp(min=lo, max=hi)
    # where, not multiply, twice: a masked-out token may carry a non-finite old logprob or
    # advantage (padding). Zeroing only the product would still send 0 · inf = NaN into its
    # logprob gradient (the product's backward multiplies by the coefficient), and from there
    # into every hidden/weight gradient of the head; a zero coefficient keeps it at 0.
    coef = torch.where(valid, ratio * advantages, torch.zeros_like(ratio))
    per_token = torch.where(valid, coef * logprobs, torch.zeros_like(logprobs))
    denom = valid.sum().clamp(min=1).to(logprobs.dtype)
    return -per_token.sum() / denom

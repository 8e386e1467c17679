"""The head's ``torch`` backend: fp32 logits a block of rows (and, in the backward, a block of
vocabulary) at a time, so memory stays bounded; the backward recomputes logits instead of
storing them. bf16/fp16 inputs are upcast before the matmul, so every product is exact and
only fp32 accumulation rounds, which is what a bf16 tensor core with fp32 output computes.
"""
from __future__ import annotations

import torch

from ..dense.invariant import invariant_sum
from .backward import BACKWARD_VOCAB_CHUNK, TORCH_BLOCK_ELEMENTS, head_backward_blocks
from .reference import IGNORE_INDEX


def rows_per_logits_block(vocab: int) -> int:
    """Rows of a ``[rows, vocab]`` fp32 logits block within ``TORCH_BLOCK_ELEMENTS``."""
    return max(1, TORCH_BLOCK_ELEMENTS // max(vocab, 1))


def logit_stats(z: torch.Tensor, targets: torch.Tensor):
    """(logprobs, lse, entropy) fp32 from an fp32 tempered-logits block ``[rows, V]``.

    Entropy is formed as ``log S - Σ e (z - m) / S`` with ``m`` the row max and
    ``e = exp(z - m)``: no cancellation between two ~|z| sized numbers.

    The two sums over the vocabulary are pairwise trees of elementwise adds
    (``invariant_sum``), not ``Tensor.sum``: torch splits a long reduction across threads when
    few rows share the call (one row of V = 200,064 alone sums in a different order than the
    same row among eight others), which would make a token's result depend on its batch.
    """
    m = z.amax(dim=-1, keepdim=True)  # exact in any order
    d = z - m
    e = d.exp()
    s = invariant_sum(e)
    log_s = s.log()
    lse = m[:, 0] + log_s
    entropy = log_s - invariant_sum(e * d) / s
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    lp = d.gather(1, safe[:, None])[:, 0] - log_s
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    return lp, lse, entropy


def tempered_logits_fp32(hidden: torch.Tensor, weight: torch.Tensor, temperature: float,
                         vocab_chunk: int = BACKWARD_VOCAB_CHUNK) -> torch.Tensor:
    """fp32 ``[rows, V]`` tempered logits ``(hidden @ weight.T) / temperature``.

    Computed in fp64 and rounded once, so every logit is the correctly rounded fp32 value
    (the torch backend is the truth the kernels are held to, and an fp32 GEMM drifts by a few
    ulps at logits of ~100). The weight is upcast one vocabulary chunk at a time, so the extra
    memory is ``vocab_chunk × K`` fp64, not a copy of the whole head. (On an H100, fp64
    tensor-core GEMMs run at the same 67 TFLOP/s as IEEE fp32 ones.)
    """
    V = weight.shape[0]
    h64 = hidden.double()
    z = torch.empty(hidden.shape[0], V, dtype=torch.float32, device=hidden.device)
    for v0 in range(0, V, vocab_chunk):
        v1 = min(V, v0 + vocab_chunk)
        zc = h64 @ weight[v0:v1].double().T
        if temperature != 1.0:
            zc = zc / temperature
        z[:, v0:v1] = zc
    return z


def head_forward_torch(hidden, weight, targets, temperature: float):
    """torch backend forward: fp32 (logprobs, lse, entropy), ``[rows, V]`` blocks of rows."""
    T, V = hidden.shape[0], weight.shape[0]
    outs = [torch.empty(T, dtype=torch.float32, device=hidden.device) for _ in range(3)]
    step = rows_per_logits_block(V)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        z = tempered_logits_fp32(hidden[t0:t1], weight, temperature)
        for o, r in zip(outs, logit_stats(z, targets[t0:t1])):
            o[t0:t1] = r
    return tuple(outs)


def dlogits_from_z(z, targets, v0, g_lp, g_lse, g_ent, lse, entropy, temperature: float):
    """Gradient w.r.t. the *untempered* logits of one fp32 block ``z [rows, cols]`` (tempered).

    With p = softmax(z), log p_j = z_j - lse and H the entropy:
        d logprob / dz_j = onehot_j - p_j            (zero for ignored rows)
        d lse     / dz_j = p_j
        d H       / dz_j = -p_j (z_j - Σ p z) = -p_j (log p_j + H)
    and dz/d(logit) = 1 / temperature. ``v0`` is the block's first vocabulary id.
    """
    logp = z - lse[:, None]
    p = logp.exp()
    g = p * (g_lse - g_lp)[:, None] - (g_ent[:, None] * p) * (logp + entropy[:, None])
    cols = torch.arange(v0, v0 + z.shape[1], device=z.device)
    onehot = (targets[:, None] == cols[None, :]) & (targets != IGNORE_INDEX)[:, None]
    g = g + torch.where(onehot, g_lp[:, None], torch.zeros((), device=z.device))
    if temperature != 1.0:
        g = g * (1.0 / temperature)
    return g


def head_backward_torch(g_lp, g_lse, g_ent, hidden, weight, targets, lse, entropy,
                        temperature: float, need_dweight: bool = True):
    """torch backend backward: recomputes fp32 logits block by block."""
    rows = max(1, TORCH_BLOCK_ELEMENTS // BACKWARD_VOCAB_CHUNK)

    def dz_block(t0, t1, v0, v1):
        z = tempered_logits_fp32(hidden[t0:t1], weight[v0:v1], temperature)
        return dlogits_from_z(z, targets[t0:t1], v0, g_lp[t0:t1], g_lse[t0:t1], g_ent[t0:t1],
                              lse[t0:t1], entropy[t0:t1], temperature)

    return head_backward_blocks(hidden, weight, dz_block, rows, need_dweight=need_dweight)

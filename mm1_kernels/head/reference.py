"""Reference math for the FP32 LM head and the CISPO objective (M1_REFERENCE.md §6).

``head_reference`` is the truth: fp64 logits from the same inputs, then logprob of the target,
logsumexp and entropy of the tempered distribution. It materializes ``[T, V]`` and is meant for
tests and diagnostics at small sizes.

``head_forward_torch`` / ``head_backward_torch`` are the ``torch`` backend: fp32 logits
computed a block of rows (and, in the backward, a block of vocabulary) at a time, so memory
stays bounded; the backward recomputes logits instead of storing them. bf16/fp16 inputs are
upcast to fp32 before the matmul, so every product is exact and only fp32 accumulation rounds,
which is what a bf16 tensor core with fp32 output computes.

Definitions, per token t with tempered logits ``z = (hidden @ weight.T) / temperature``:
    lse      = log Σ_j exp(z_j)
    logprob  = z_target - lse            (0 for target == IGNORE_INDEX)
    entropy  = lse - Σ_j p_j z_j         (p = softmax(z)), i.e. of the tempered distribution
"""
from __future__ import annotations

from typing import Optional

import torch

IGNORE_INDEX = -100
# Elements of a [rows, V] fp32 logits block the torch backend allows itself (256 MiB).
TORCH_BLOCK_ELEMENTS = 1 << 26
# Vocabulary columns per backward block (both backends); the backward's scratch is
# rows × BACKWARD_VOCAB_CHUNK fp32, independent of V.
BACKWARD_VOCAB_CHUNK = 4096


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


def rows_per_logits_block(vocab: int) -> int:
    """Rows of a ``[rows, vocab]`` fp32 logits block within ``TORCH_BLOCK_ELEMENTS``."""
    return max(1, TORCH_BLOCK_ELEMENTS // max(vocab, 1))


def logit_stats(z: torch.Tensor, targets: torch.Tensor):
    """(logprobs, lse, entropy) fp32 from an fp32 tempered-logits block ``[rows, V]``.

    Entropy is formed as ``log S - Σ e (z - m) / S`` with ``m`` the row max and
    ``e = exp(z - m)``: no cancellation between two ~|z| sized numbers.
    """
    m = z.amax(dim=-1, keepdim=True)
    d = z - m
    e = d.exp()
    s = e.sum(-1)
    log_s = s.log()
    lse = m[:, 0] + log_s
    entropy = log_s - (e * d).sum(-1) / s
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


def _tensor_core_gradients(hidden: torch.Tensor) -> bool:
    """16-bit inputs on a GPU whose torch has ``mm`` with an fp32 ``out_dtype`` (torch >= 2.8)."""
    return (hidden.device.type == "cuda" and hidden.dtype in (torch.bfloat16, torch.float16)
            and "dtype" in torch.ops.aten.mm.overloads())


def head_backward_blocks(hidden, weight, dz_block, rows_per_block: int,
                         vocab_chunk: int = BACKWARD_VOCAB_CHUNK, need_dweight: bool = True):
    """Shared backward driver: (dhidden, dweight) in the inputs' dtypes.

    ``dz_block(t0, t1, v0, v1)`` returns the fp32 gradient w.r.t. the logits of that block.
    Blocks are visited in a fixed order (vocabulary chunks outer, rows inner) and both
    gradients accumulate in fp32, so the result is deterministic; scratch is one block, the
    fp32 ``[T, K]`` hidden gradient and one fp32 ``[vocab_chunk, K]`` slice of the weight and of
    its gradient, never ``[T, V]``.

    GEMM precision: fp32 inputs, and any input on the CPU, take the fp32 block as it is (IEEE
    fp32 unless the caller enabled TF32 for torch matmuls). 16-bit inputs on a GPU round the
    block to the input dtype and accumulate in fp32 on tensor cores (``torch.mm(...,
    out_dtype=float32)``): on an H100 that is ~15x the fp32 CUDA-core rate (the backward's two
    GEMMs are 4·T·V·K FLOPs, ~40 TFLOP at 8k tokens × M1's head) for one extra rounding of dz
    (2^-9 relative), the size of the final rounding of the returned bf16 gradients.
    """
    T, K = hidden.shape
    V = weight.shape[0]
    dh = torch.zeros(T, K, dtype=torch.float32, device=hidden.device)
    # Each vocabulary chunk's weight gradient is complete after its row loop, so it is cast
    # to the weight's dtype right away: no fp32 copy of the whole [V, K] gradient.
    dw = torch.empty(V if need_dweight else 0, K, dtype=weight.dtype, device=hidden.device)
    tensor_cores = _tensor_core_gradients(hidden)
    # Operands of the gradient GEMMs: the input dtype on tensor cores, fp32 otherwise.
    gemm_dtype = hidden.dtype if tensor_cores else torch.float32

    def gemm(a, b):
        return torch.mm(a, b, out_dtype=torch.float32) if tensor_cores else a @ b

    h_cache = (hidden.to(gemm_dtype) if need_dweight and T * K * 4 <= (1 << 30) else None)
    for v0 in range(0, V, vocab_chunk):
        v1 = min(V, v0 + vocab_chunk)
        w_chunk = weight[v0:v1].to(gemm_dtype)
        dwc = torch.zeros(v1 - v0, K, dtype=torch.float32, device=hidden.device) if need_dweight else None
        for t0 in range(0, T, rows_per_block):
            t1 = min(T, t0 + rows_per_block)
            dz = dz_block(t0, t1, v0, v1).to(gemm_dtype)
            dh[t0:t1] += gemm(dz, w_chunk)
            if need_dweight:
                h = h_cache[t0:t1] if h_cache is not None else hidden[t0:t1].to(gemm_dtype)
                dwc += gemm(dz.T, h)
        if need_dweight:
            dw[v0:v1] = dwc
    return dh.to(hidden.dtype), (dw if need_dweight else dw.reshape(0))


def head_backward_torch(g_lp, g_lse, g_ent, hidden, weight, targets, lse, entropy,
                        temperature: float, need_dweight: bool = True):
    """torch backend backward: recomputes fp32 logits block by block."""
    rows = max(1, TORCH_BLOCK_ELEMENTS // BACKWARD_VOCAB_CHUNK)

    def dz_block(t0, t1, v0, v1):
        z = tempered_logits_fp32(hidden[t0:t1], weight[v0:v1], temperature)
        return dlogits_from_z(z, targets[t0:t1], v0, g_lp[t0:t1], g_lse[t0:t1], g_ent[t0:t1],
                              lse[t0:t1], entropy[t0:t1], temperature)

    return head_backward_blocks(hidden, weight, dz_block, rows, need_dweight=need_dweight)


def cispo_reference(logprobs, old_logprobs, advantages, mask, eps_low: Optional[float],
                    eps_high: Optional[float]):
    """CISPO loss, M1_REFERENCE §6, token-level normalization over all valid tokens.

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

"""The M1 MoE block, the plain math (docs/m1_math.md §5). This file is the truth.

For each token y (one row of x) with router logits l [E]::

    p       = softmax(l)                         # fp32 at least (fp64 when given fp64)
    w, ids  = topk(p, k)                         # ties: the lower expert index wins
    w       = w / sum(w)                         # renormalize (for k = 2: sigmoid(l1 - l2))
    out     = Σ_j w_j · W2[ids_j] (silu(W1[ids_j] y) * W3[ids_j] y)

``w13[e]`` stacks W1 (gate, rows ``[0, I)``) over W3 (up, rows ``[I, 2I)``); ``w2[e]`` is W2
``[hidden, I]``. int8 weight-only experts store ``w_q`` with fp32 per-output-channel scales,
``w ≈ w_q * scale[..., None]``.

Everything here computes in fp32, or fp64 when the inputs (or ``compute_dtype``) say so;
tests run it in fp64 as the truth, the ``torch`` backend runs it in fp32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def moe_route_reference(router_logits: torch.Tensor, top_k: int = 2, renormalize: bool = True,
                        compute_dtype: Optional[torch.dtype] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """softmax → top-k → renormalize. Returns ``(weights [T, k], ids [T, k] int64)``.

    Weights are in ``compute_dtype`` (default fp32, fp64 for fp64 logits). A *stable*
    descending sort, not ``torch.topk``, picks the experts: topk's order among equal
    probabilities is unspecified, the stable sort keeps the lower expert index first.

    A row whose softmax is undefined (a NaN or +inf logit, or every logit -inf) routes to
    experts ``0, 1, ..., k-1`` with NaN weights: the ids stay in range and the NaN reaches the
    MoE output instead of a finite weight hiding it.
    """
    dtype = compute_dtype or _compute_dtype(router_logits)
    logits = router_logits.to(dtype)
    p = torch.softmax(logits, dim=-1)
    values, ids = torch.sort(p, dim=-1, descending=True, stable=True)
    w, ids = values[:, :top_k], ids[:, :top_k]
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    if logits.shape[-1]:
        # amax propagates NaN: this is "a NaN, a +inf, or every logit -inf".
        bad = ~torch.isfinite(logits.amax(dim=-1, keepdim=True))
        w = torch.where(bad, torch.full_like(w, float("nan")), w)
        ids = torch.where(bad, torch.arange(top_k, device=ids.device, dtype=ids.dtype), ids)
    return w, ids


def dequantize_moe_weight(w_q: torch.Tensor, scale: torch.Tensor,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w_q [..., N, K]`` int8 and ``scale [..., N]`` → ``w_q * scale[..., None]`` in ``dtype``."""
    return w_q.to(dtype) * scale.to(dtype)[..., None]


def quantize_moe_weights_reference(w13: torch.Tensor, w2: torch.Tensor):
    """Symmetric int8 per output channel: ``scale = amax(|w|, over K) / 127``, ``q = round(w / scale)``.

    Returns ``(w13_q int8 [E, 2I, hidden], w13_scale fp32 [E, 2I], w2_q int8 [E, hidden, I],
    w2_scale fp32 [E, hidden])``. An all-zero channel gets scale 0 and q 0 (dequantizes to 0).
    """
    out = []
    for w in (w13, w2):
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scale = torch.empty(w.shape[:-1], dtype=torch.float32, device=w.device)
        for e in range(w.shape[0]):  # one expert at a time: M1's w13 is 14 GB in fp32
            wf = w[e].to(torch.float32)
            s = wf.abs().amax(dim=-1) / 127.0
            safe = torch.where(s > 0, s, torch.ones_like(s))
            q[e] = torch.round(wf / safe[:, None]).clamp_(-127, 127).to(torch.int8)
            scale[e] = s
        out += [q, scale]
    return tuple(out)


def _expert_groups(topk_ids: torch.Tensor, E: int, expert_map: Optional[torch.Tensor]):
    """The (token, slot) entries grouped by local expert, as both references walk them.

    Returns ``(invalid, groups)``: ``invalid [T·k]`` marks an id (or map value) out of range —
    its row is NaN — and ``groups`` is a list of ``(e, entries)`` for every local expert that
    received entries, entries ascending. With ``expert_map`` (global id → local index, -1 = on
    another rank) ids are mapped first; entries of other ranks' experts are in no group and not
    invalid (they contribute exactly zero). Synchronizes the host (a reference, not a kernel)."""
    flat_ids = topk_ids.reshape(-1).to(torch.int64)
    if expert_map is not None:
        G = expert_map.shape[0]
        known = (flat_ids >= 0) & (flat_ids < G)
        mapped = expert_map.to(torch.int64)[flat_ids.clamp(0, max(G - 1, 0))]
        flat_ids = torch.where(known, mapped, torch.full_like(flat_ids, -2))
        flat_ids = torch.where(flat_ids >= -1, flat_ids, -2)  # -1: another rank's expert
    else:
        flat_ids = torch.where(flat_ids >= 0, flat_ids, -2)
    placed = (flat_ids >= 0) & (flat_ids < E)
    invalid = ~placed & (flat_ids != -1)
    flat_ids = torch.where(placed, flat_ids, E)  # sorts last, counted in an extra bin
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=E + 1).tolist()[:E]
    groups, start = [], 0
    for e, n in enumerate(counts):
        if n:
            groups.append((e, order[start:start + n]))
        start += n
    return invalid, groups


def fused_moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                        topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        w13_scale: Optional[torch.Tensor] = None,
                        w2_scale: Optional[torch.Tensor] = None,
                        compute_dtype: Optional[torch.dtype] = None,
                        expert_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The expert computation and the weighted top-k sum.

    Args:
        x ``[T, hidden]``; w13 ``[E, 2I, hidden]``; w2 ``[E, hidden, I]`` (float, or int8 with
        w13_scale ``[E, 2I]`` / w2_scale ``[E, hidden]``); topk_weights ``[T, k]``;
        topk_ids ``[T, k]`` integer in ``[0, E)``, or global ids in ``[0, G)`` with
        ``expert_map``.
        compute_dtype: default fp32 (fp64 if any float input is fp64).
        expert_map: optional ``[G]`` integer, expert parallelism as in vLLM: global id → index
            into this rank's ``w13``/``w2``, or -1 when the expert lives on another rank. Such a
            slot contributes exactly zero (its weight and row are never used).

    An id (or map value) out of range gives that token a NaN row, as the Triton kernels do.

    Returns ``[T, hidden]`` in ``compute_dtype`` (callers cast).

    Loops over the experts that received tokens only (one ``nonzero`` per call, so this
    synchronizes the host; it is the reference, the kernels do not). Each (token, slot) row is
    computed once, then the k slots of a token are summed in slot order, so the result is
    deterministic on every device (no ``index_add`` with float atomics).
    """
    dtype = compute_dtype or _compute_dtype(x, w13, w2, topk_weights)
    T, hidden = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    k = topk_ids.shape[1]
    xf = x.to(dtype)
    flat_w = topk_weights.reshape(-1).to(dtype)
    rows = torch.zeros(T * k, hidden, dtype=dtype, device=x.device)
    invalid, groups = _expert_groups(topk_ids, E, expert_map)
    rows[invalid] = float("nan")  # an invalid id or map value
    for e, entries in groups:
        if w13.dtype == torch.int8:
            g_u = dequantize_moe_weight(w13[e], w13_scale[e], dtype)
            down = dequantize_moe_weight(w2[e], w2_scale[e], dtype)
        else:
            g_u, down = w13[e].to(dtype), w2[e].to(dtype)
        xe = xf.index_select(0, entries // k)
        gate_up = xe @ g_u.t()
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        rows[entries] = (h @ down.t()) * flat_w[entries, None]
    return rows.view(T, k, hidden).sum(dim=1)


def moe_block_reference(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor,
                        w2: torch.Tensor, top_k: int = 2, renormalize: bool = True,
                        compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The whole block, route then experts, in ``compute_dtype`` (fp64 by default)."""
    w, ids = moe_route_reference(router_logits, top_k, renormalize, compute_dtype)
    return fused_moe_reference(x, w13, w2, w, ids, compute_dtype=compute_dtype)


# ------------------------------------------------------------------------------------ backward

def moe_route_backward_reference(grad_weights: torch.Tensor, router_logits: torch.Tensor,
                                 topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                                 renormalize: bool = True,
                                 compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``d loss / d router_logits [T, E]`` from ``grad_weights = d loss / d topk_weights [T, k]``.

    The ids are a piecewise-constant function of the logits (not differentiable); the weights
    are differentiated with the experts the forward chose held fixed, ties included (the
    lower expert, as :func:`moe_route_reference`'s stable sort picks it). With ``w`` the
    forward's weights, ``g`` their gradient and ``c = Σ_j g_j w_j``:

    - renormalized: ``w_j = exp(l_{id_j}) / Σ_m exp(l_{id_m})`` is a softmax over the chosen
      logits only, so ``dl_{id_j} = w_j (g_j - c)`` and every other logit gets exactly 0;
    - not renormalized: ``w_j = p_{id_j}`` with ``p = softmax(l)``, so
      ``dl_e = p_e (g_e - c)``, where ``g_e`` is g scattered to the chosen experts (0 elsewhere).

    The k ids of a row are distinct, so the scatter writes each element once: deterministic.
    A row with no softmax has NaN weights, hence a NaN gradient where it depends on them.
    Returns ``[T, E]`` in ``compute_dtype`` (default fp32, fp64 for fp64 inputs).
    """
    dtype = compute_dtype or _compute_dtype(router_logits, grad_weights)
    g = grad_weights.to(dtype)
    w = topk_weights.to(dtype)
    ids = topk_ids.to(torch.int64)
    c = (g * w).sum(dim=-1, keepdim=True)
    if renormalize:
        return torch.zeros(router_logits.shape, dtype=dtype,
                           device=router_logits.device).scatter(1, ids, w * (g - c))
    p = torch.softmax(router_logits.to(dtype), dim=-1)
    g_full = torch.zeros_like(p).scatter(1, ids, g)
    return p * (g_full - c)


def fused_moe_backward_reference(grad_out: torch.Tensor, x: torch.Tensor, w13: torch.Tensor,
                                 w2: torch.Tensor, topk_weights: torch.Tensor,
                                 topk_ids: torch.Tensor, w13_scale: Optional[torch.Tensor] = None,
                                 w2_scale: Optional[torch.Tensor] = None,
                                 compute_dtype: Optional[torch.dtype] = None,
                                 expert_map: Optional[torch.Tensor] = None,
                                 need_weight_grads: bool = True):
    """Gradients of :func:`fused_moe_reference`: ``(dx, dw13, dw2, dtopk_weights)``.

    Per (token t, slot j) entry with local expert e, ``a = x[t]``, ``g = W1 a``, ``u = W3 a``,
    ``h = silu(g)·u``, ``o = W2 h``, routing weight ``w`` and ``dy = grad_out[t]``::

        d w      = <o, dy>
        dh       = w · W2ᵀ dy
        dg       = dh · u · silu'(g),  silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
        du       = dh · silu(g)
        dx[t]   += W1ᵀ dg + W3ᵀ du
        dW13[e] += [dg; du] aᵀ          dW2[e] += (w·dy) hᵀ

    Slots whose expert the map places on another rank contribute nothing (zero gradient for
    their weight); an invalid id or map value gives NaN in that token's dx row and weight
    gradient, as the forward gives a NaN output row. int8 experts are frozen: dw13/dw2 are
    None (the weights are dequantized for dx). Without ``need_weight_grads`` they are None too.

    Like the forward, each entry is computed once and a token's k slots are summed in slot
    order, and per-expert weight gradients are one matmul each: deterministic, no index_add.
    Returns tensors in ``compute_dtype`` (default fp32; fp64 when an input is fp64).
    """
    dtype = compute_dtype or _compute_dtype(x, w13, w2, topk_weights, grad_out)
    T, hidden = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    k = topk_ids.shape[1]
    quant = w13.dtype == torch.int8
    want_w = need_weight_grads and not quant
    xf, dyf = x.to(dtype), grad_out.to(dtype)
    flat_w = topk_weights.reshape(-1).to(dtype)
    dx_rows = torch.zeros(T * k, hidden, dtype=dtype, device=x.device)
    dw_flat = torch.zeros(T * k, dtype=dtype, device=x.device)
    dw13 = torch.zeros(w13.shape, dtype=dtype, device=x.device) if want_w else None
    dw2 = torch.zeros(w2.shape, dtype=dtype, device=x.device) if want_w else None
    invalid, groups = _expert_groups(topk_ids, E, expert_map)
    dx_rows[invalid] = float("nan")
    dw_flat[invalid] = float("nan")
    for e, entries in groups:
        if quant:
            g_u = dequantize_moe_weight(w13[e], w13_scale[e], dtype)
            down = dequantize_moe_weight(w2[e], w2_scale[e], dtype)
        else:
            g_u, down = w13[e].to(dtype), w2[e].to(dtype)
        xe = xf.index_select(0, entries // k)
        dye = dyf.index_select(0, entries // k)
        we = flat_w[entries, None]
        gate_up = xe @ g_u.t()
        gate, up = gate_up[:, :inter], gate_up[:, inter:]
        sig = torch.sigmoid(gate)
        act = gate * sig
        h = act * up
        dh_unweighted = dye @ down                    # W2ᵀ dy, [n, I]
        dw_flat[entries] = (h * dh_unweighted).sum(dim=-1)   # <W2 h, dy> = <h, W2ᵀ dy>
        dh = we * dh_unweighted
        d_gate_up = torch.cat([dh * up * sig * (1 + gate * (1 - sig)), dh * act], dim=-1)
        dx_rows[entries] = d_gate_up @ g_u
        if want_w:
            dw13[e] = d_gate_up.t() @ xe
            dw2[e] = (we * dye).t() @ h
    dx = dx_rows.view(T, k, hidden).sum(dim=1)
    return dx, dw13, dw2, dw_flat.view(T, k)

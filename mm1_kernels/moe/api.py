"""Public MoE ops: validation, backend dispatch, custom-op registration.

``moe_route`` and ``fused_moe`` are registered as ``torch.ops.mm1.*`` custom ops with fake
implementations, so code calling them compiles with ``torch.compile(fullgraph=True)``; the
backend is a plain string argument of the op, resolved before the call.

Both are differentiable: ``torch.library.register_autograd`` attaches backwards that are
themselves custom ops with fakes (``mm1::moe_route_backward``, ``mm1::fused_moe_backward``),
so torch.compile traces forward and backward as the head's op does.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._checks import FLOAT_DTYPES, INDEX_DTYPES, check_index_range, check_tensor
from .._dispatch import TRITON_IMPORT_ERROR, register_op, resolve_backend
from .._nvtx import annotate
from . import cuda_ops, reference

# "cuda" (csrc/moe) runs only when asked for: no committed GPU measurement shows it faster than
# Triton, so backend=None never picks it (it comes after torch, which always runs).
register_op("moe_route", backends=("torch", "triton", "cuda"), cuda_op="moe_route_cuda",
            gpu_order=("triton", "torch", "cuda"))
register_op("fused_moe", backends=("torch", "triton", "cuda"), cuda_op="fused_moe_cuda",
            gpu_order=("triton", "torch", "cuda"))
# The routing kernel keeps a token's whole row of logits in registers.
MAX_EXPERTS = 1024


@torch.library.custom_op("mm1::moe_route", mutates_args=())
def _moe_route_op(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                  backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if backend == "cuda":
        return cuda_ops.moe_route_cuda(router_logits, top_k, renormalize)
    if backend == "triton":
        from .triton_route import moe_route_triton
        return moe_route_triton(router_logits, top_k, renormalize)
    w, ids = reference.moe_route_reference(router_logits, top_k, renormalize, torch.float32)
    return w.contiguous(), ids.to(torch.int32).contiguous()


@_moe_route_op.register_fake
def _(router_logits, top_k, renormalize, backend):
    T = router_logits.shape[0]
    return (router_logits.new_empty(T, top_k, dtype=torch.float32),
            router_logits.new_empty(T, top_k, dtype=torch.int32))


def _fused_moe_invariant_torch(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, expert_map):
    """The torch backend in consistent mode: ``fused_moe_reference``'s arithmetic with every
    token-count-dependent step made fixed. An expert's rows go through fixed-shape row blocks
    (``invariant_linear``'s torch GEMM), silu through the vectorized path for every element,
    and a token's k slots are added in slot order, as the Triton combine does."""
    from ..dense.api import invariant_linear_torch
    from ..dense.invariant import invariant_pointwise
    T, hidden = x.shape
    E, two_i, _ = w13.shape
    inter, k = two_i // 2, topk_ids.shape[1]
    xf = x.float()
    flat_w = topk_weights.reshape(-1).float()
    rows = torch.zeros(T * k, hidden, dtype=torch.float32, device=x.device)
    invalid, groups = reference._expert_groups(topk_ids, E, expert_map)
    rows[invalid] = float("nan")
    for e, entries in groups:
        if w13.dtype == torch.int8:
            g_u = reference.dequantize_moe_weight(w13[e], w13_scale[e], torch.float32)
            down = reference.dequantize_moe_weight(w2[e], w2_scale[e], torch.float32)
        else:
            g_u, down = w13[e], w2[e]
        gate_up = invariant_linear_torch(xf.index_select(0, entries // k), g_u)
        h = invariant_pointwise(F.silu, gate_up[:, :inter]) * gate_up[:, inter:]
        rows[entries] = invariant_linear_torch(h, down) * flat_w[entries, None]
    rows = rows.view(T, k, hidden)
    out = rows[:, 0]
    for j in range(1, k):
        out = out + rows[:, j]
    return out.to(x.dtype).contiguous()


@torch.library.custom_op("mm1::fused_moe", mutates_args=())
def _fused_moe_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w13_scale: Optional[torch.Tensor],
                  w2_scale: Optional[torch.Tensor], backend: str,
                  expert_map: Optional[torch.Tensor] = None, consistent: bool = False) -> torch.Tensor:
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    if backend == "cuda":  # one tile shape for every T: batch invariant, consistent or not
        return cuda_ops.fused_moe_cuda(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, expert_map)
    if backend == "triton":
        from .tile_configs import CONSISTENT_CONFIG
        from .triton_fused_moe import fused_moe_triton
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, expert_map,
                                config=CONSISTENT_CONFIG if consistent else None)
    if consistent:
        return _fused_moe_invariant_torch(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, expert_map)
    return reference.fused_moe_reference(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale,
                                         compute_dtype=torch.float32,
                                         expert_map=expert_map).to(x.dtype).contiguous()


@_fused_moe_op.register_fake
def _(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, backend, expert_map=None, consistent=False):
    return x.new_empty(x.shape)  # contiguous, as the op returns (fakes must match strides too)


# ------------------------------------------------------------------------------------ autograd

@torch.library.custom_op("mm1::moe_route_backward", mutates_args=())
def _moe_route_backward_op(grad_weights: torch.Tensor, router_logits: torch.Tensor,
                           topk_weights: torch.Tensor, topk_ids: torch.Tensor, renormalize: bool,
                           backend: str) -> torch.Tensor:
    """d router_logits. A handful of elementwise ops on [T, E] (E = 32 in M1), the same on every
    backend: no kernel of its own would pay for its launch."""
    return reference.moe_route_backward_reference(grad_weights, router_logits, topk_weights,
                                                  topk_ids, renormalize,
                                                  torch.float32).to(router_logits.dtype).contiguous()


@_moe_route_backward_op.register_fake
def _(grad_weights, router_logits, topk_weights, topk_ids, renormalize, backend):
    return router_logits.new_empty(router_logits.shape)


def _route_setup_context(ctx, inputs, output):
    router_logits, top_k, renormalize, backend = inputs
    topk_weights, topk_ids = output
    ctx.save_for_backward(router_logits, topk_weights, topk_ids)
    ctx.renormalize = renormalize
    ctx.backend = backend


def _route_backward(ctx, g_weights, g_ids):
    router_logits, topk_weights, topk_ids = ctx.saved_tensors
    if g_weights is None or not ctx.needs_input_grad[0]:
        return None, None, None, None
    d_logits = torch.ops.mm1.moe_route_backward(g_weights.float().contiguous(), router_logits,
                                                topk_weights, topk_ids, ctx.renormalize,
                                                ctx.backend)
    return d_logits, None, None, None


torch.library.register_autograd("mm1::moe_route", _route_backward,
                                setup_context=_route_setup_context)


@torch.library.custom_op("mm1::fused_moe_backward", mutates_args=())
def _fused_moe_backward_op(grad_out: torch.Tensor, x: torch.Tensor, w13: torch.Tensor,
                           w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                           w13_scale: Optional[torch.Tensor], w2_scale: Optional[torch.Tensor],
                           backend: str, expert_map: Optional[torch.Tensor],
                           need_weight_grads: bool
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw13, dw2, dtopk_weights) in the dtypes of x, w13, w2, topk_weights. dw13 and dw2
    are empty ``[0]`` tensors when not needed (frozen or int8 weights)."""
    want_w = need_weight_grads and w13.dtype != torch.int8
    if x.shape[0] == 0:
        return (x.new_zeros(x.shape), w13.new_zeros(w13.shape) if want_w else x.new_empty(0),
                w2.new_zeros(w2.shape) if want_w else x.new_empty(0), topk_weights.new_zeros(topk_weights.shape))
    # The cuda backend has no backward kernels of its own: on its GPU the Triton ones run.
    if backend == "triton" or (backend == "cuda" and TRITON_IMPORT_ERROR is None):
        from .triton_backward import fused_moe_backward_triton
        dx, dw13, dw2, dtw = fused_moe_backward_triton(
            grad_out, x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, expert_map, want_w)
    else:
        dx, dw13, dw2, dtw = reference.fused_moe_backward_reference(
            grad_out, x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale,
            compute_dtype=torch.float32, expert_map=expert_map, need_weight_grads=want_w)
    # Contiguous whatever the inputs' layout (padded or permuted weight views): the fake says so.
    return (dx.to(x.dtype).contiguous(), dw13.to(w13.dtype).contiguous() if want_w else x.new_empty(0),
            dw2.to(w2.dtype).contiguous() if want_w else x.new_empty(0), dtw.to(topk_weights.dtype).contiguous())


@_fused_moe_backward_op.register_fake
def _(grad_out, x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, backend, expert_map,
      need_weight_grads):
    want_w = need_weight_grads and w13.dtype != torch.int8
    return (x.new_empty(x.shape), w13.new_empty(w13.shape) if want_w else x.new_empty(0),
            w2.new_empty(w2.shape) if want_w else x.new_empty(0), topk_weights.new_empty(topk_weights.shape))


def _moe_setup_context(ctx, inputs, output):
    x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, backend, expert_map, _consistent = inputs
    # Only the inputs are kept: the backward recomputes the routing metadata and the gate/up
    # pre-activations (see triton_backward for the memory this saves).
    ctx.save_for_backward(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, expert_map)
    ctx.backend = backend


def _moe_backward(ctx, grad_out):
    x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, expert_map = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw13, dw2, dtw = torch.ops.mm1.fused_moe_backward(
        grad_out.contiguous(), x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale,
        ctx.backend, expert_map, bool(need[1] or need[2]))
    return (dx if need[0] else None, dw13 if need[1] else None, dw2 if need[2] else None,
            dtw if need[3] else None, None, None, None, None, None, None)


torch.library.register_autograd("mm1::fused_moe", _moe_backward, setup_context=_moe_setup_context)


@annotate("mm1.moe_route")
def moe_route(router_logits: torch.Tensor, top_k: int = 2, renormalize: bool = True,
              backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Router: softmax over experts → top-k → (optionally) renormalize, in one kernel.

    Args:
        router_logits: ``[T, E]`` fp32 (bf16/fp16 are upcast first; the softmax is fp32).
        top_k: experts per token, ``1 <= top_k <= E`` (M1: 2).
        renormalize: divide the k probabilities by their sum (M1: True).
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` (the CUDA C++ kernel of ``csrc/moe``;
            only when asked for) or None (automatic; see ``_dispatch``).

    Returns:
        ``(topk_weights, topk_ids)``: fp32 ``[T, k]`` and int32 ``[T, k]``, in decreasing
        probability; among equal probabilities the lower expert index comes first. Deterministic.
        A row with no softmax (a NaN or +inf logit, or every logit -inf) gets ids
        ``0, 1, ..., k-1`` and NaN weights on every backend: ids always stay in ``[0, E)``,
        and the NaN reaches the MoE output rather than hiding behind a finite weight.

    Differentiable w.r.t. ``router_logits`` through ``topk_weights`` (the ids are integers),
    with the chosen experts held fixed, ties resolved to the lower expert as above. With
    ``renormalize`` the weights are a softmax over the k chosen logits only, so the other
    logits get exactly zero gradient; without it every logit gets one through the full
    softmax. See ``reference.moe_route_backward_reference``; bf16/fp16 logits get their
    gradient in their own dtype, computed in fp32.
    """
    check_tensor("router_logits", router_logits, dtypes=FLOAT_DTYPES, ndim=2)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
    E = router_logits.shape[1]
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"router_logits must have between 1 and {MAX_EXPERTS} experts, got {E}")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, E={E}], got {top_k}")
    chosen = resolve_backend("moe_route", backend, router_logits.device)
    return torch.ops.mm1.moe_route(router_logits, top_k, renormalize, chosen)


def _check_moe_args(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, check_ids,
                    expert_map=None):
    check_tensor("x", x, dtypes=FLOAT_DTYPES, ndim=2, last_dim_contiguous=True)
    device = x.device
    T, hidden = x.shape
    # Expert weights are in x's dtype, or int8 weight-only with scales. Any expert and row
    # strides (views of padded buffers): the kernels take strides, nothing is copied.
    check_tensor("w13", w13, dtypes=(x.dtype, torch.int8), ndim=3, device=device,
                 last_dim_contiguous=True)
    quantized = w13.dtype == torch.int8
    E, two_i, w_hidden = w13.shape
    if w_hidden != hidden:
        raise ValueError(f"w13 [E, 2I, hidden] has hidden {w_hidden} but x has hidden {hidden}")
    if two_i == 0 or two_i % 2:
        raise ValueError(f"w13 must stack gate and up rows: its dimension 1 (2I) must be even "
                         f"and positive, got {two_i}")
    inter = two_i // 2
    check_tensor("w2", w2, ndim=3, device=device, last_dim_contiguous=True)
    if w2.dtype != w13.dtype:
        raise TypeError(f"w2 and w13 must share one dtype, got w2={w2.dtype}, w13={w13.dtype}")
    if w2.shape[0] != E:
        raise ValueError(f"w13 has {E} experts but w2 has {w2.shape[0]}")
    check_tensor("w2", w2, shape=(E, hidden, inter))
    if quantized:
        if w13_scale is None or w2_scale is None:
            raise ValueError("int8 expert weights need w13_scale [E, 2I] and w2_scale [E, hidden] "
                             "(see quantize_moe_weights)")
        check_tensor("w13_scale", w13_scale, dtypes=(torch.float32,), shape=(E, two_i),
                     device=device)
        check_tensor("w2_scale", w2_scale, dtypes=(torch.float32,), shape=(E, hidden),
                     device=device)
    elif w13_scale is not None or w2_scale is not None:
        raise ValueError(f"w13_scale / w2_scale are only for int8 expert weights; the weights are "
                         f"{w13.dtype}")
    check_tensor("topk_ids", topk_ids, dtypes=INDEX_DTYPES, ndim=2, device=device)
    if expert_map is not None:
        check_tensor("expert_map", expert_map, dtypes=INDEX_DTYPES, ndim=1, device=device)
        if expert_map.shape[0] == 0:
            raise ValueError("expert_map must have one entry per global expert, got an empty map")
    num_ids = E if expert_map is None else expert_map.shape[0]
    what = "E" if expert_map is None else "len(expert_map)"
    k = topk_ids.shape[1]
    if topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows but x has {T} tokens")
    if not 1 <= k <= num_ids:
        raise ValueError(f"topk_ids picks {k} experts per token; must be in [1, {what}={num_ids}]")
    check_tensor("topk_weights", topk_weights, dtypes=FLOAT_DTYPES, shape=(T, k), device=device)
    if not isinstance(check_ids, bool):
        raise TypeError(f"check_ids must be a bool, got {type(check_ids).__name__}")
    if check_ids:
        if expert_map is None:
            check_index_range("topk_ids", topk_ids, E, "the number of experts")
        else:
            check_index_range("topk_ids", topk_ids, num_ids,
                              "global expert ids: the length of expert_map")
            check_index_range("expert_map", expert_map, E,
                              "local experts: w13's first dimension; -1 = on another rank",
                              ignore_value=-1)


@annotate("mm1.fused_moe")
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale: Optional[torch.Tensor] = None,
              w2_scale: Optional[torch.Tensor] = None, backend: Optional[str] = None,
              check_ids: bool = True, *, expert_map: Optional[torch.Tensor] = None,
              consistent: bool = False) -> torch.Tensor:
    """The experts of an M1 MoE block and the weighted top-k sum.

    ``y[t] = Σ_j topk_weights[t, j] · W2[e] (silu(W1[e] x[t]) * W3[e] x[t])``, ``e = topk_ids[t, j]``.

    Args:
        x: ``[T, hidden]`` bf16, fp16 or fp32, unit stride in the last dimension.
        w13: ``[E, 2I, hidden]``: gate (W1) rows ``[0, I)`` then up (W3) rows ``[I, 2I)``; x's
            dtype, or int8 with ``w13_scale``. Unit stride in the last dimension; the expert and
            row strides are free, so a view of a padded buffer (``buf[..., :hidden]``) is read in
            place, never copied.
        w2: ``[E, hidden, I]``, same dtype as w13, same stride rules.
        topk_weights: ``[T, k]`` float (fp32 from :func:`moe_route`).
        topk_ids: ``[T, k]`` int32/int64 in ``[0, E)``; global ids in ``[0, len(expert_map))``
            when ``expert_map`` is given.
        w13_scale, w2_scale: fp32 ``[E, 2I]`` and ``[E, hidden]`` per-output-channel scales of int8
            weights (:func:`quantize_moe_weights`); ``w ≈ w_q * scale[..., None]``. Any strides.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or None (automatic; see ``_dispatch``).
            ``"cuda"`` (``csrc/moe``: mma.sync grouped GEMMs) runs only when asked for, and needs
            bf16/fp16 ``x`` and 16-byte aligned rows (``cuda_ops.check_fused_moe_cuda_args``);
            its backward runs the Triton kernels.
        check_ids: verify on the host that every id is in ``[0, E)`` (with a map: ids in
            ``[0, len(expert_map))`` and map values in ``[-1, E)``). On a GPU that read is a
            host synchronization per call (80 per forward in M1, one per layer); callers whose
            ids come straight from :func:`moe_route` pass False.
        expert_map: expert parallelism, vLLM's convention (``fused_experts(...,
            expert_map=...)``): int32/int64 ``[G]`` on x's device mapping each *global* expert
            id to its index in this rank's ``w13``/``w2`` (first dimension E), or -1 when the
            expert lives on another rank. A slot whose expert is not local contributes exactly
            zero to ``y`` (its weight is not read), so summing every rank's output gives the
            full MoE. The map is applied on the device inside the alignment kernel: non-local
            slots are dropped before the GEMMs, no host sync, grids still sized from shapes.

        consistent: batch invariant (consistent mode of ``mm1_model``): a token's output does not
            depend on the other tokens or their count. Triton: the fixed tiles of
            ``tile_configs.CONSISTENT_CONFIG`` for every T (its 16-row tiles are also the decode
            path's, so decode and prefill agree); torch: fixed-shape row blocks per expert.

    Returns ``y [T, hidden]`` in x's dtype. Accumulation is fp32; deterministic (no atomics).
    By default not batch invariant in the last bits: the Triton tiles (hence the K accumulation
    order) follow the token-count bucket of ``triton_fused_moe.moe_config``, and the torch GEMMs
    follow each expert's row count; ``consistent=True`` fixes both.

    Differentiable w.r.t. ``x``, ``w13``, ``w2`` and ``topk_weights`` (int8 experts: ``x`` and
    ``topk_weights`` only; the weights are frozen and scales that require grad are an error).
    The forward saves only its inputs; the backward recomputes the routing metadata and the
    gate/up pre-activations (``triton_backward`` states the memory this saves). Gradients
    accumulate in fp32 and come back in each input's dtype; deterministic on both backends.
    An expert that receives no token gets a zero weight gradient; a slot whose expert the map
    places on another rank gets a zero ``topk_weights`` gradient and adds nothing to ``x``'s.

    The id range check is also skipped during CUDA graph capture and torch.compile; both
    backends then give NaN rows for tokens with an out-of-range id or map value (never an
    out-of-bounds access). The same ids tensor, unmodified, is checked once (as lightning's slot ids are).
    """
    _check_moe_args(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, check_ids,
                    expert_map)
    if w13.dtype == torch.int8 and torch.is_grad_enabled():
        # (int8 tensors themselves cannot require grad; their fp32 scales can.)
        for name, scale in (("w13_scale", w13_scale), ("w2_scale", w2_scale)):
            if scale.requires_grad:
                raise ValueError(f"{name} requires grad, but int8 expert weights are frozen: "
                                 f"fused_moe differentiates x and topk_weights only; detach "
                                 f"the scales or train the unquantized weights")
    if not isinstance(consistent, bool):
        raise TypeError(f"consistent must be a bool, got {type(consistent).__name__}")
    chosen = resolve_backend("fused_moe", backend, x.device)
    if chosen == "cuda":
        cuda_ops.check_fused_moe_cuda_args(x, w13, w2)
    return torch.ops.mm1.fused_moe(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, chosen,
                                   expert_map, consistent)


def quantize_moe_weights(w13: torch.Tensor, w2: torch.Tensor):
    """int8 weight-only experts with fp32 per-output-channel scales (symmetric, round to nearest).

    Args: w13 ``[E, 2I, hidden]`` and w2 ``[E, hidden, I]`` float.

    Returns ``(w13_q, w13_scale, w2_q, w2_scale)``: int8 ``[E, 2I, hidden]``, fp32 ``[E, 2I]``,
    int8 ``[E, hidden, I]``, fp32 ``[E, hidden]``; ``w ≈ w_q * scale[..., None]``.
    """
    check_tensor("w13", w13, dtypes=FLOAT_DTYPES + (torch.float64,), ndim=3)
    E, two_i, hidden = w13.shape
    if two_i == 0 or two_i % 2:
        raise ValueError(f"w13 must stack gate and up rows: its dimension 1 (2I) must be even "
                         f"and positive, got {two_i}")
    check_tensor("w2", w2, dtypes=FLOAT_DTYPES + (torch.float64,), shape=(E, hidden, two_i // 2),
                 device=w13.device)
    return reference.quantize_moe_weights_reference(w13, w2)

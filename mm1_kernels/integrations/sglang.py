"""SGLang's call signatures on this package's kernels: ``fused_experts`` and lightning attention.

Semantics follow SGLang as read in ``sgl-project/sglang``:

- ``fused_experts``: ``python/sglang/srt/layers/moe/fused_moe_triton/fused_moe.py`` (the
  ``topk_output`` / ``moe_runner_config`` signature of the v0.5 line; ``MoeRunnerConfig`` fields
  from ``python/sglang/srt/layers/moe/moe_runner/base.py``). The older v0.4 form
  ``fused_experts(hidden_states, w1, w2, topk_weights, topk_ids, inplace, activation, ...)``
  is read at commit ``006fc20223af``. Differences from vLLM: routing arrives as one
  ``topk_output`` (``topk_weights, topk_ids, router_logits``); ids are already *local*, with -1
  for an expert on another rank (``filter_expert``), instead of global ids plus an
  ``expert_map``; ``no_combine`` returns the per-slot outputs; ``routed_scaling_factor``
  scales the combined output; ``inplace`` defaults to True in ``MoeRunnerConfig``.
- Lightning attention: ``python/sglang/srt/layers/attention/linear/lightning_backend.py`` at
  commit ``0405d4129fbe`` (MiniMax and Ling/Bailing models). Its ``"minimax"`` backend calls
  ``linear_decode_forward_triton``, a copy of vLLM's (re-exported from
  :mod:`mm1_kernels.integrations.vllm`); its ``"seg_la"`` backend calls
  ``seg_la_fwd(q, k, v, s, decay_scales, meta, caches, cache_indices, softmax_scale, ...)`` from
  ``python/sglang/srt/layers/attention/linear/seg_la.py`` at commit ``2041c8f67f2b``, which
  covers decode, varlen (chunked) prefill and the multi-token speculative verify (MTP) that
  writes one state per draft token.

Importing this module never imports SGLang.
"""
from __future__ import annotations

from typing import Optional

import torch

import mm1_kernels as mk

from .._checks import check_cu_seqlens, check_slot_ids
from ._common import sentinel_expert_map
from .vllm import (
    _check_activation,
    _expert_scales,
    _not_supported,
    _slopes,
    decode_slots,
    gather_rows,
    linear_decode_forward_triton,
    moe_experts,
    scatter_rows,
)

__all__ = ["fused_experts", "linear_decode_forward_triton", "seg_la_fwd"]

# MoeRunnerConfig's defaults (SGLang's dataclass), used when no config is passed.
_RUNNER_DEFAULTS = dict(activation="silu", is_gated=True, apply_router_weight_on_input=False, inplace=True,
                        no_combine=False, routed_scaling_factor=None, gemm1_alpha=None,
                        gemm1_clamp_limit=None, swiglu_limit=None)

def _topk(topk_output):
    if hasattr(topk_output, "topk_weights"):
        return topk_output.topk_weights, topk_output.topk_ids
    if isinstance(topk_output, (tuple, list)) and len(topk_output) in (2, 3):
        return topk_output[0], topk_output[1]
    raise TypeError("topk_output must be SGLang's StandardTopKOutput or a (topk_weights, topk_ids[, "
                    f"router_logits]) tuple, got {type(topk_output).__name__}")


def fused_experts(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_output,
                  moe_runner_config=None, b1: Optional[torch.Tensor] = None, b2: Optional[torch.Tensor] = None,
                  use_fp8_w8a8: bool = False, use_int8_w8a8: bool = False, use_int8_w8a16: bool = False,
                  use_int4_w4a16: bool = False, per_channel_quant: bool = False,
                  w1_scale: Optional[torch.Tensor] = None, w2_scale: Optional[torch.Tensor] = None,
                  w1_zp: Optional[torch.Tensor] = None, w2_zp: Optional[torch.Tensor] = None,
                  a1_scale: Optional[torch.Tensor] = None, a2_scale: Optional[torch.Tensor] = None,
                  block_shape=None, *, backend: Optional[str] = None, check_ids: bool = True) -> torch.Tensor:
    """SGLang's ``fused_experts`` on :func:`mm1_kernels.fused_moe`.

    Args (SGLang's):
        hidden_states: ``[T, H]``; w1 ``[E, 2I, H]`` (gate rows then up rows), w2 ``[E, H, I]``.
        topk_output: ``StandardTopKOutput(topk_weights, topk_ids, router_logits)`` or a tuple;
            ids are local expert indices, -1 = an expert on another rank (adds exactly 0).
        moe_runner_config: SGLang's ``MoeRunnerConfig`` (read by attribute; None = its defaults,
            which include ``inplace=True``): ``activation`` ("silu" only), ``is_gated``,
            ``apply_router_weight_on_input``, ``inplace``, ``no_combine`` (return the weighted
            per-slot outputs ``[T, k, H]``), ``routed_scaling_factor`` (multiplies the combined
            output). ``gemm1_alpha`` / ``gemm1_clamp_limit`` / ``swiglu_limit`` (gpt-oss's
            clamped SwiGLU) raise NotImplementedError.
        use_int8_w8a16 with per-channel ``w1_scale`` / ``w2_scale``: int8 weight-only experts.
        b1, b2 (expert biases), fp8, int8 w8a8, int4, per-channel or block activation
        quantization, zero points, activation scales: NotImplementedError naming the argument.

    Extra keywords (not SGLang's): ``backend``; ``check_ids`` (default True: a host check of the
    ids once per ids tensor; pass False on a serving path).

    Returns ``[T, H]`` in hidden_states' dtype (``hidden_states`` itself when inplace), or
    ``[T, k, H]`` with ``no_combine``. Accumulation is fp32 and deterministic.
    """
    cfg = dict(_RUNNER_DEFAULTS)
    if moe_runner_config is not None:
        for name in cfg:
            cfg[name] = getattr(moe_runner_config, name, cfg[name])
    for name, value in (("b1", b1), ("b2", b2), ("w1_zp", w1_zp), ("w2_zp", w2_zp),
                        ("a1_scale", a1_scale), ("a2_scale", a2_scale), ("block_shape", block_shape)):
        if value is not None:
            raise _not_supported(name, "<given>" if isinstance(value, torch.Tensor) else value, "SGLang")
    for name, value in (("use_fp8_w8a8", use_fp8_w8a8), ("use_int8_w8a8", use_int8_w8a8),
                        ("use_int4_w4a16", use_int4_w4a16), ("per_channel_quant", per_channel_quant)):
        if value:
            raise _not_supported(name, value, "SGLang")
    for name in ("gemm1_alpha", "gemm1_clamp_limit", "swiglu_limit"):
        if cfg[name] is not None:
            raise _not_supported(f"moe_runner_config.{name}", cfg[name], "SGLang")
    if not cfg["is_gated"]:
        raise _not_supported("moe_runner_config.is_gated", False, "SGLang")
    _check_activation(cfg["activation"], "SGLang")
    inplace, no_combine = bool(cfg["inplace"]), bool(cfg["no_combine"])
    if inplace and no_combine:
        raise ValueError("no_combine with inplace makes no sense (SGLang asserts the same)")
    topk_weights, topk_ids = _topk(topk_output)
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2:
        raise ValueError("hidden_states must be a [T, hidden] tensor")
    w1_scale, w2_scale = _expert_scales(w1, w2, w1_scale, w2_scale, use_int8_w8a16)
    E = w1.shape[0]
    # -1 (another rank's expert) -> index E of an [E + 1] map whose last entry is -1.
    ids = torch.where(topk_ids < 0, torch.full_like(topk_ids, E), topk_ids)
    expert_map = sentinel_expert_map(E, hidden_states.device, ids.dtype)
    on_input = bool(cfg["apply_router_weight_on_input"])
    factor = cfg["routed_scaling_factor"]
    scaled = factor is not None and factor != 1.0 and not no_combine
    weights = topk_weights
    if scaled and not on_input:
        # Σ_j (f·w_j) y_j = f · Σ_j w_j y_j: the factor rides on the fp32 weights, no extra pass.
        weights = topk_weights.float() * factor
    out = moe_experts(hidden_states, w1, w2, weights, ids, w1_scale, w2_scale, expert_map,
                      on_input, not no_combine, backend, check_ids)
    if scaled and on_input:  # the weights scaled the inputs, so the factor goes on the output
        out = (out.float() * factor).to(hidden_states.dtype)
    if inplace:
        hidden_states.copy_(out)
        return hidden_states
    return out


def _meta(meta, name, default=None):
    return getattr(meta, name, default)


def seg_la_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, decay_scales: torch.Tensor,
               meta, caches: Optional[torch.Tensor] = None, cache_indices: Optional[torch.Tensor] = None,
               softmax_scale: Optional[float] = None, decouple: bool = False, state_layout: str = "kv", *,
               backend: Optional[str] = None, check_ids: bool = True) -> torch.Tensor:
    """SGLang's ``seg_la_fwd`` (Ling/Bailing and MiniMax lightning attention) on this package's kernels.

    Args (SGLang's):
        q, k: ``[L, H, D]`` token-major, the requests' tokens packed; v: ``[L, H, Dv]``.
        s: state cache ``[S, H, D, Dv]`` ("kv" layout), any float dtype and strides.
        decay_scales: ``[H]`` (or ``[H, 1, 1]``) slopes; the decay is ``exp(-decay_scales)``.
        meta: SGLang's ``SegLaMeta`` (read by attribute): ``batch_size`` bs, ``s_offsets [bs]``
            the slot of each request (-1 = padding: nothing read or written), ``q_offsets
            [bs + 1]`` token offsets, ``s_scales [bs]`` (prefill: 0 = a fresh sequence starting
            from the zero state, 1 = continue from the slot). ``mask`` (tree verify) raises
            NotImplementedError.
        caches, cache_indices: speculative verify (MTP). With ``caches [N, step, H, D, Dv]``
            each request holds ``step = L // bs`` draft tokens; the state after draft token t
            is written to ``caches[cache_indices[b], t]`` and the slot in ``s`` is NOT updated
            (SGLang commits the accepted prefix's state afterwards).
        softmax_scale: multiplies q; default ``D ** -0.5`` as SGLang. M1 uses no scale: pass
            ``1.0`` (SGLang's backend passes ``layer.scaling``).
        decouple: a kernel variant switch; accepted and ignored.
        state_layout: ``"kv"`` only (``"vk"`` raises NotImplementedError).

    Modes (as SGLang's, chosen by ``ceil(L / bs)``): 1 → decode, one token per request, each
    slot advanced one step in place; more with ``caches`` → MTP verify; more without → varlen
    prefill, final state written to the slot.

    Extra keywords (not SGLang's): ``backend``; ``check_ids`` (default True) checks the slots
    and token offsets on the host: one sync per call, since ``meta``'s tensors are sliced afresh
    each call. A serving loop, whose metadata SGLang builds and vouches for, passes ``False``:
    no host work; the kernels still never read or write out of bounds.

    Returns ``o [L, H, Dv]`` in q's dtype. Padding requests' outputs are 0 in decode and verify
    and unspecified in prefill (SGLang leaves them unwritten in all modes).
    """
    if state_layout != "kv":
        raise _not_supported("state_layout", state_layout, "SGLang")
    if _meta(meta, "mask") is not None:
        raise NotImplementedError("meta.mask (tree-shaped speculative verify) is not supported by "
                                  "mm1_kernels' SGLang shim; SGLang's lightning backend also needs topk=1")
    if q.dim() != 3:
        raise ValueError(f"q must be [L, H, D] (tokens packed), got shape {list(q.shape)}")
    L, H, D = q.shape
    bs = int(meta.batch_size)
    slots = meta.s_offsets[:bs]
    slopes = _slopes(decay_scales, H, "decay_scales")
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    if scale != 1.0:
        q = (q.float() * scale).to(q.dtype)
    check_slot_ids(slots, bs, s.shape[0], slots.device, values=check_ids)  # once, then not per call below
    if L == bs:  # decode: one token per request
        return decode_slots(q, k, v, slopes, s, slots, backend, check_ids=False)
    if caches is not None:  # MTP verify: `step` tokens per request, per-token states to `caches`
        if L % bs:
            raise ValueError(f"speculative verify needs the same number of draft tokens per request: "
                             f"{L} tokens for {bs} requests")
        step = L // bs
        if cache_indices is None:
            raise ValueError("caches needs cache_indices (the row of caches for each request)")
        tmp = gather_rows(s, slots)  # the slot is read, not advanced
        rows = torch.where(slots >= 0, torch.arange(bs, device=slots.device, dtype=slots.dtype),
                           torch.full_like(slots, -1))
        o, states = mk.lightning_decode(q.view(bs, step, H, D), k.view(bs, step, H, D),
                                        v.view(bs, step, H, v.shape[-1]), slopes, tmp, rows,
                                        backend=backend, return_states=True, check_ids=False)
        if caches.shape[1] < step:
            raise ValueError(f"caches holds {caches.shape[1]} states per request, fewer than {step} draft tokens")
        dst = caches if caches.shape[1] == step else caches[:, :step]
        scatter_rows(dst, torch.where(slots >= 0, cache_indices[:bs], torch.full_like(slots, -1)), states)
        return o.reshape(L, H, v.shape[-1])
    # Varlen prefill: request b is tokens q_offsets[b] : q_offsets[b + 1].
    cu = meta.q_offsets[:bs + 1]
    check_cu_seqlens(cu, L, cu.device, values=check_ids)
    fresh = _meta(meta, "s_scales")
    fresh = torch.zeros_like(slots, dtype=torch.bool) if fresh is None else (fresh[:bs] <= 0)
    if s.dtype == torch.float32 and s.is_contiguous():
        # Zero the fresh requests' slots, then read and write the slots in place.
        zero_slots = torch.where(fresh & (slots >= 0), slots, torch.full_like(slots, -1))
        scatter_rows(s, zero_slots, torch.zeros((bs,) + tuple(s.shape[1:]), dtype=s.dtype, device=s.device))
        o, _ = mk.lightning_attention(q[None], k[None], v[None], slopes, cu_seqlens=cu, backend=backend,
                                      state_cache=s, slot_ids=slots, check_ids=False)
        return o[0]
    # Select, not multiply: a fresh request's slot may hold anything (NaN included), and
    # SGLang's kernel never reads it.
    init = torch.where(fresh[:, None, None, None], 0.0, gather_rows(s, slots))
    o, final = mk.lightning_attention(q[None], k[None], v[None], slopes, initial_state=init.contiguous(),
                                      output_final_state=True, cu_seqlens=cu, backend=backend, check_ids=False)
    scatter_rows(s, slots, final)
    return o[0]

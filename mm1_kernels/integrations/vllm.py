"""vLLM's call signatures on this package's kernels: ``fused_experts`` and the lightning entry points.

Semantics follow vLLM as read in ``vllm-project/vllm``:

- ``fused_experts``: ``vllm/model_executor/layers/fused_moe/fused_moe.py`` at commit
  ``000d1458098e`` (the v0.9 line: ``fused_experts(hidden_states, w1, w2, topk_weights, topk_ids,
  inplace, activation, apply_router_weight_on_input, use_*, per_channel_quant,
  global_num_experts, expert_map, w1_scale, w2_scale, ...)``). The later keyword
  ``quant_config`` (v0.11+, ``FusedMoEQuantConfig``) is read for its int8 weight-only case.
- ``lightning_attention`` and ``linear_decode_forward_triton``:
  ``vllm/model_executor/layers/lightning_attn.py`` at commit ``030ea52effcb`` and their caller
  ``vllm/model_executor/layers/mamba/linear/minimax_linear_attn.py`` at ``0195c9ec6ea9``.

Where vLLM's own kernels and this package disagree, this module computes the release's math
(docs/m1_math.md §3.3, §3.4): vLLM's Triton prefill uses ``λ^j`` instead of ``λ^(j+1)`` in its
cross-block term, so its outputs differ from these for sequences longer than one 256-token block.

Importing this module never imports vLLM.
"""
from __future__ import annotations

from typing import Optional

import torch

import mm1_kernels as mk

from .._checks import check_slot_ids

__all__ = ["fused_experts", "lightning_attention", "linear_decode_forward_triton"]

# vLLM's prefill kernel splits sequences into fixed 256-token blocks whatever ``block_size`` says;
# its second return value holds the state before each of those blocks.
VLLM_PREFILL_BLOCK = 256

# Quantization modes with no kernel here: naming one raises NotImplementedError.
_UNSUPPORTED_FLAGS = ("use_fp8_w8a8", "use_int8_w8a8", "use_int4_w4a16", "use_mxfp4_w4a4",
                      "per_channel_quant", "allow_deep_gemm", "allow_cutlass_block_scaled_grouped_gemm")
_UNSUPPORTED_TENSORS = ("w1_zp", "w2_zp", "a1_scale", "a2_scale", "block_shape")
# FusedMoEQuantConfig properties that name a mode other than int8 weight-only.
_QUANT_CONFIG_MODES = ("use_fp8_w8a8", "use_int8_w8a8", "use_int4_w4a16", "use_mxfp4_w4a4",
                       "use_nvfp4_w4a4", "use_fp8_w8a16", "use_nvfp4_w4a16", "use_mxfp4_w4a16")


def _not_supported(name: str, value, engine: str = "vLLM") -> NotImplementedError:
    return NotImplementedError(f"{name}={value!r} is not supported by mm1_kernels' {engine} shim: its "
                               f"kernels cover bf16/fp16/fp32 and int8 weight-only (w8a16) experts "
                               f"with a SiLU-gated MLP")


def _check_activation(activation: str, engine: str = "vLLM") -> None:
    if activation != "silu":
        raise NotImplementedError(f"activation={activation!r} is not supported by mm1_kernels' {engine} "
                                  f"shim: M1's experts use silu(gate) * up ('silu')")


def _expert_scales(w1, w2, w1_scale, w2_scale, use_int8_w8a16: bool):
    """int8 weight-only: vLLM's per-output-channel scales ``[E, N]`` (or ``[E, N, 1]``) as fp32."""
    if not use_int8_w8a16:
        if w1.dtype == torch.int8 or w2.dtype == torch.int8:
            raise ValueError("int8 expert weights need use_int8_w8a16=True (with w1_scale and w2_scale)")
        if w1_scale is not None or w2_scale is not None:
            raise ValueError("w1_scale / w2_scale are only used with use_int8_w8a16=True here")
        return None, None
    if w1.dtype != torch.int8 or w2.dtype != torch.int8:
        raise TypeError(f"use_int8_w8a16=True needs int8 w1 and w2, got {w1.dtype} and {w2.dtype}")
    if w1_scale is None or w2_scale is None:
        raise ValueError("use_int8_w8a16=True needs w1_scale [E, 2I] and w2_scale [E, hidden]")
    scales = []
    for name, s, w in (("w1_scale", w1_scale, w1), ("w2_scale", w2_scale, w2)):
        if s.dim() == 3 and s.shape[-1] == 1:  # [E, N, 1]: one scale per output channel
            s = s[..., 0]
        if tuple(s.shape) != tuple(w.shape[:2]):
            raise ValueError(f"{name} must hold one scale per output channel, shape {list(w.shape[:2])}, "
                             f"got {list(s.shape)} (group-wise scales are not supported)")
        scales.append(s if s.dtype == torch.float32 else s.float())
    return scales[0], scales[1]


def moe_experts(x, w1, w2, topk_weights, topk_ids, w1_scale, w2_scale, expert_map,
                apply_router_weight_on_input: bool, combine: bool, backend, check_ids: bool):
    """The experts through ``mk.fused_moe``: ``[T, H]`` (combine) or per-slot ``[T, k, H]``.

    ``apply_router_weight_on_input`` scales each slot's *input* by its weight (vLLM multiplies
    the first GEMM's output, which is the same linear map) and not its output.
    """
    T, H = x.shape
    k = topk_ids.shape[1]
    if not apply_router_weight_on_input and combine:
        return mk.fused_moe(x, w1, w2, topk_weights, topk_ids, w13_scale=w1_scale, w2_scale=w2_scale,
                            backend=backend, check_ids=check_ids, expert_map=expert_map)
    # One row per (token, slot), so each slot runs on its own input and keeps its own output.
    if apply_router_weight_on_input:
        xs = (x[:, None, :].float() * topk_weights[..., None].float()).to(x.dtype)
        ws = torch.ones(T * k, 1, dtype=torch.float32, device=x.device)
    else:
        xs = x[:, None, :].expand(T, k, H)
        ws = topk_weights.reshape(T * k, 1)
    ys = mk.fused_moe(xs.reshape(T * k, H), w1, w2, ws, topk_ids.reshape(T * k, 1), w13_scale=w1_scale,
                      w2_scale=w2_scale, backend=backend, check_ids=check_ids, expert_map=expert_map)
    ys = ys.view(T, k, H)
    if not combine:
        return ys
    # The k slots of a token added in slot order, in fp32 (as mk.fused_moe does).
    return ys.float().sum(dim=1).to(x.dtype)


def fused_experts(hidden_states: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, inplace: bool = False,
                  activation: str = "silu", apply_router_weight_on_input: bool = False,
                  use_fp8_w8a8: bool = False, use_int8_w8a8: bool = False, use_int8_w8a16: bool = False,
                  use_int4_w4a16: bool = False, use_mxfp4_w4a4: bool = False, per_channel_quant: bool = False,
                  global_num_experts: int = -1, expert_map: Optional[torch.Tensor] = None,
                  w1_scale: Optional[torch.Tensor] = None, w2_scale: Optional[torch.Tensor] = None,
                  w1_zp: Optional[torch.Tensor] = None, w2_zp: Optional[torch.Tensor] = None,
                  a1_scale: Optional[torch.Tensor] = None, a2_scale: Optional[torch.Tensor] = None,
                  block_shape=None, allow_deep_gemm: bool = False,
                  allow_cutlass_block_scaled_grouped_gemm: bool = False, quant_config=None, *,
                  backend: Optional[str] = None, check_ids: bool = True) -> torch.Tensor:
    """vLLM's ``fused_experts`` on :func:`mm1_kernels.fused_moe`.

    ``y[t] = Σ_j topk_weights[t, j] · W2[e] (silu(W1[e] x[t]) * W3[e] x[t])`` with
    ``e = expert_map[topk_ids[t, j]]``; a slot whose expert maps to -1 (another rank's) adds 0.

    Args (vLLM's):
        hidden_states: ``[T, H]`` bf16/fp16/fp32.
        w1: ``[E, 2I, H]``: rows ``[0, I)`` the gate projection, ``[I, 2I)`` the up projection
            (vLLM's ``silu_and_mul`` takes ``silu(x[:, :I]) * x[:, I:]``, the same order as this
            package's w13). w2: ``[E, H, I]``. Unit stride in the last dimension; padded
            strides (vLLM's ``VLLM_MOE_PADDING`` slices ``w[..., :-128]``) are read in place.
        topk_weights, topk_ids: ``[T, k]``; ids are *global* expert ids.
        inplace: write the result into ``hidden_states`` and return it.
        activation: only ``"silu"``.
        apply_router_weight_on_input: weight each slot's input instead of its output.
        use_int8_w8a16 with ``w1_scale [E, 2I]``, ``w2_scale [E, H]`` (or ``[E, N, 1]``): int8
            weight-only experts, ``w ≈ w_q · scale`` per output channel (vLLM's ``experts_int8``).
        global_num_experts: the number of global experts; -1 means ``len(expert_map)`` (or E).
        expert_map: ``[global_num_experts]`` int, global id → local expert index or -1.
        quant_config: a vLLM ``FusedMoEQuantConfig``; only its int8 weight-only mode is served
            (its ``w1_scale`` / ``w2_scale`` are used).
        fp8 / int8 w8a8 / int4 / mxfp4 / block or per-channel activation quantization, zero points
        and activation scales raise NotImplementedError naming the argument.

    Extra keywords (not vLLM's): ``backend`` as in every op; ``check_ids`` (default True) checks
    the ids on the host once per ids tensor, a sync on a GPU: serving code that trusts its
    router passes False.

    Returns ``[T, H]`` in hidden_states' dtype (``hidden_states`` itself when ``inplace``).
    Accumulation is fp32 and deterministic (vLLM rounds each slot's output to the activation
    dtype before summing).
    """
    for name, value in (("use_fp8_w8a8", use_fp8_w8a8), ("use_int8_w8a8", use_int8_w8a8),
                        ("use_int4_w4a16", use_int4_w4a16), ("use_mxfp4_w4a4", use_mxfp4_w4a4),
                        ("per_channel_quant", per_channel_quant), ("allow_deep_gemm", allow_deep_gemm),
                        ("allow_cutlass_block_scaled_grouped_gemm", allow_cutlass_block_scaled_grouped_gemm)):
        if value:
            raise _not_supported(name, value)
    for name, value in (("w1_zp", w1_zp), ("w2_zp", w2_zp), ("a1_scale", a1_scale),
                        ("a2_scale", a2_scale), ("block_shape", block_shape)):
        if value is not None:
            raise _not_supported(name, "<given>" if isinstance(value, torch.Tensor) else value)
    _check_activation(activation)
    if quant_config is not None:
        for name in _QUANT_CONFIG_MODES:
            if getattr(quant_config, name, False):
                raise _not_supported(f"quant_config.{name}", True)
        for name in ("w1_zp", "w2_zp", "a1_scale", "a2_scale", "block_shape"):
            if getattr(quant_config, name, None) is not None:
                raise _not_supported(f"quant_config.{name}", "<given>")
        if getattr(quant_config, "use_int8_w8a16", False):
            use_int8_w8a16 = True
            w1_scale = getattr(quant_config, "w1_scale", None) if w1_scale is None else w1_scale
            w2_scale = getattr(quant_config, "w2_scale", None) if w2_scale is None else w2_scale
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2:
        raise ValueError("hidden_states must be a [T, hidden] tensor")
    w1_scale, w2_scale = _expert_scales(w1, w2, w1_scale, w2_scale, use_int8_w8a16)
    if expert_map is not None:
        if global_num_experts not in (-1, expert_map.shape[0]):
            raise ValueError(f"expert_map has {expert_map.shape[0]} entries but global_num_experts is "
                             f"{global_num_experts}: the map has one entry per global expert")
    elif global_num_experts not in (-1, w1.shape[0]):
        raise ValueError(f"global_num_experts={global_num_experts} differs from the {w1.shape[0]} local "
                         f"experts: pass the expert_map from global to local ids")
    if inplace and not hidden_states.is_contiguous():
        raise ValueError("inplace=True needs a contiguous hidden_states (vLLM requires one)")
    out = moe_experts(hidden_states, w1, w2, topk_weights, topk_ids, w1_scale, w2_scale, expert_map,
                      apply_router_weight_on_input, True, backend, check_ids)
    if inplace:
        hidden_states.copy_(out)
        return hidden_states
    return out


# ----------------------------------------------------------------------------- lightning


def _slopes(ed: torch.Tensor, H: int, name: str) -> torch.Tensor:
    """vLLM passes the per-head rates as ``[H]``, ``[H, 1, 1]`` or ``[1, H, 1, 1]``."""
    if not isinstance(ed, torch.Tensor) or ed.numel() != H:
        raise ValueError(f"{name} must hold one decay rate per head ({H}), got "
                         f"{list(ed.shape) if isinstance(ed, torch.Tensor) else type(ed).__name__}")
    s = ed.reshape(H)
    if s.dtype != torch.float32:
        s = s.float()
    return s.contiguous()


def gather_rows(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """fp32 contiguous copy of ``cache[slots]``; a negative slot reads row 0 (never used)."""
    return cache.index_select(0, slots.long().clamp_min(0)).to(torch.float32).contiguous()


def scatter_rows(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """``cache[slots[b]] = rows[b]`` for every ``slots[b] >= 0``, on the device, no host sync.

    ``index_copy_`` cannot skip rows, so a negative-slot row is redirected to the first valid
    row (same index, same value: duplicate writes of one value are deterministic); with no valid
    row at all, row 0 of the cache is written with its own value.
    """
    valid = slots >= 0
    B = slots.shape[0]
    first = torch.argmax(valid.to(torch.int32))
    src = torch.where(valid, torch.arange(B, device=slots.device), first)
    idx = slots.long().clamp_min(0).index_select(0, src)
    vals = rows.index_select(0, src).to(cache.dtype)
    vals = torch.where(valid.any(), vals, cache.index_select(0, idx))
    cache.index_copy_(0, idx, vals)


def decode_slots(q, k, v, slopes, cache, slots, backend, check_ids=True):
    """One decode step (q, k, v ``[B, H, D]`` or ``[B, T, H, D]``) on a slot-indexed cache of any
    layout: in place when the cache is fp32 and contiguous, else through a gathered copy.

    The caller's ``slots`` are what is checked (memoized per tensor, so a model's layers sharing
    one slot tensor pay one host sync); the rows derived from them are not checked again."""
    if cache.dtype == torch.float32 and cache.is_contiguous():
        return mk.lightning_decode(q, k, v, slopes, cache, slots, backend=backend, check_ids=check_ids)
    check_slot_ids(slots, slots.shape[0], cache.shape[0], slots.device, values=check_ids)
    tmp = gather_rows(cache, slots)
    rows = torch.where(slots >= 0, torch.arange(slots.shape[0], device=slots.device, dtype=slots.dtype),
                       torch.full_like(slots, -1))
    o = mk.lightning_decode(q, k, v, slopes, tmp, rows, backend=backend, check_ids=False)
    scatter_rows(cache, slots, tmp)
    return o


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ed: torch.Tensor,
                        block_size: int = 256, kv_history: Optional[torch.Tensor] = None, *,
                        block_states: bool = True, backend: Optional[str] = None):
    """vLLM's lightning prefill: head-first ``[B, H, T, D]``, ``ed`` = the slopes.

    Args (vLLM's):
        q, k: ``[B, H, T, D]``; v: ``[B, H, T, E]`` (any strides with a unit last one).
        ed: ``[H]`` (or ``[H, 1, 1]``, ``[1, H, 1, 1]``) decay rates; the decay is ``exp(-ed)``.
        block_size: accepted and ignored, as in vLLM (its kernel always uses 256-token blocks).
        kv_history: optional ``[B, H, D, E]`` initial state (any float dtype). Not modified:
            vLLM clones it, and its caller copies ``kv[:, :, -1]`` back into its cache.

    Extra keywords (not vLLM's): ``block_states=False`` runs the whole sequence in one call and
    returns only the final state as ``kv[:, :, 0]`` (vLLM's MiniMax caller reads only
    ``kv[:, :, -1]``); the default runs one call per 256-token block to return every
    block-boundary state as vLLM does. ``backend`` as in every op.

    Returns ``(o, kv)``: o ``[B, H, T, E]`` contiguous in q's dtype; kv fp32
    ``[B, H, NB + 1, D, E]`` with ``NB = ceil(T / 256)``: ``kv[:, :, i]`` is the state before
    token ``256·i`` and ``kv[:, :, NB]`` the final state.

    Math: the release's recurrence (docs/m1_math.md §3.2), not vLLM's kernel, whose cross-block
    term uses ``λ^j`` instead of ``λ^(j+1)`` (§3.4). Unlike vLLM's kernel, any head dim works
    (vLLM's splits D > 128 into 128-wide pieces that each advance the history).
    """
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, T, D] (head first), got shape {list(q.shape)}")
    B, H, T, D = q.shape
    slopes = _slopes(ed, H, "ed")
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    E = v.shape[-1]
    if kv_history is not None:
        if tuple(kv_history.shape) != (B, H, D, E):
            raise ValueError(f"kv_history must be [B, H, D, E] = {[B, H, D, E]}, got {list(kv_history.shape)}")
        state = kv_history.to(torch.float32).contiguous()
    else:
        state = torch.zeros(B, H, D, E, dtype=torch.float32, device=q.device)
    if not block_states or T <= VLLM_PREFILL_BLOCK:
        o, final = mk.lightning_attention(qt, kt, vt, slopes, initial_state=state, output_final_state=True,
                                          backend=backend)
        kv = final[:, :, None] if not block_states else torch.stack([state, final], dim=2)
        return o.transpose(1, 2).contiguous(), kv
    outs, states = [], [state]
    for start in range(0, T, VLLM_PREFILL_BLOCK):
        end = min(start + VLLM_PREFILL_BLOCK, T)
        o_blk, state = mk.lightning_attention(qt[:, start:end], kt[:, start:end], vt[:, start:end], slopes,
                                              initial_state=state, output_final_state=True, backend=backend)
        outs.append(o_blk)
        states.append(state)
    o = torch.cat(outs, dim=1)
    return o.transpose(1, 2).contiguous(), torch.stack(states, dim=2)


def linear_decode_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_caches: torch.Tensor,
                                 slope_rate: torch.Tensor, slot_idx: torch.Tensor, BLOCK_SIZE: int = 32, *,
                                 backend: Optional[str] = None, check_ids: bool = True) -> torch.Tensor:
    """vLLM's lightning decode step on a slot-indexed state cache, updated in place.

    Args (vLLM's):
        q, k: ``[B, H, 1, D]``; v: ``[B, H, 1, E]``.
        kv_caches: ``[S, H, D, E]`` state cache, any strides (vLLM hands a view of a larger
            buffer) and float dtype; row b reads and writes slot ``slot_idx[b]``.
        slope_rate: ``[H]`` (or ``[H, 1, 1]``) decay rates.
        slot_idx: int ``[B]``; -1 (vLLM's ``PAD_SLOT_ID``; here any negative id) marks a padding
            row whose slot is untouched. The non-negative slots must be distinct.
        BLOCK_SIZE: vLLM's tile width; accepted and ignored.

    Returns ``[B, H·E]`` in q's dtype (vLLM's ``rearrange(o, "b h n d -> b n (h d)").squeeze(1)``).
    Padding rows are 0 (vLLM leaves them uninitialized).

    An fp32 contiguous cache is updated in place by the kernel; any other cache goes through a
    gathered fp32 copy of the B slots, scattered back (the update is computed in fp32 and
    rounded once to the cache's dtype).

    Extra keywords (not vLLM's): ``backend``; ``check_ids`` (default True): check ``slot_idx``
    on the host, once per tensor while it is unmodified (vLLM passes one tensor to every layer
    of a step, so one sync per step); ``False`` for none.
    """
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be [B, H, 1, D], got shape {list(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[:3] != q.shape[:3]:
            raise ValueError(f"{name} must be [B, H, 1, *] like q {list(q.shape)}, got {list(t.shape)}")
    B, H = q.shape[:2]
    slopes = _slopes(slope_rate, H, "slope_rate")
    o = decode_slots(q[:, :, 0], k[:, :, 0], v[:, :, 0], slopes, kv_caches, slot_idx, backend, check_ids)
    return o.reshape(B, H * v.shape[-1])

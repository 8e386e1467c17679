"""Public lightning-attention ops: validation, backend dispatch, custom-op registration.

The ops are registered as ``torch.ops.mm1.*`` custom ops with fake implementations, so
code calling them compiles with ``torch.compile(fullgraph=True)``; the backend is a plain
string argument of the op, resolved before the call. ``mm1::lightning_attention_cached`` is the
prefill on a slot-indexed state cache (mutated in place); :func:`lightning_attention` calls it
when ``state_cache`` is given, and it resolves its backend as ``lightning_attention`` (same
backends and CUDA kernel), so the registry keeps one public entry per public function.
"""
from typing import Optional, Tuple

import torch

from .._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    PRECISIONS,
    can_check_device_values,
    check_cu_seqlens,
    check_precision,
    check_same_dtype,
    check_slopes,
    check_slot_ids,
    check_tensor,
)
from .._dispatch import INTERPRET_AT_IMPORT, TRITON_IMPORT_ERROR, register_op, resolve_backend
from .._nvtx import annotate
from . import reference
from .consistent import CHUNK as CONSISTENT_CHUNK

MAX_HEAD_DIM = 256
# How the Triton prefill feeds bf16 inputs to the tensor cores (triton_prefill's docstring):
# "default" rounds the fp32 state and decayed scores to bf16 for their products (one bf16
# matmul each, within 2× the naive bf16 error); "high" splits them into a bf16 hi + lo pair
# (~16 significant bits, two matmuls each). The state update is a pair in both (fp32 state).
# fp32 and fp16 inputs, and the other backends, are unaffected. (PRECISIONS and
# check_precision live in _checks, shared with the FP32 head.)


def cuda_prefill_segment_len(q: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> int:
    """``segment_len`` for the CUDA prefill (0: no split), from static sizes and the SM count.

    The Triton prefill's planner (``triton_prefill.choose_segment_len``, one home for both
    backends) with the CUDA kernels' value tiles (csrc/README.md; at D <= 128: 128 columns in the
    bf16 kernel, 64 in the TF32 one; else 32): one bf16 sequence at H = 8, D = Dv = 128 is 8 CTAs
    and becomes 128 on 132 SMs. Without Triton (the planner's module imports it) the CUDA
    prefill runs unsplit: same results, fewer CTAs.
    """
    if TRITON_IMPORT_ERROR is not None:
        return 0
    from .triton_prefill import choose_segment_len
    B, T, H, D = q.shape
    DV = v.shape[-1]
    n = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    value_tiles = -(-DV // ((128 if q.dtype == torch.bfloat16 else 64) if D <= 128 else 32))
    return choose_segment_len(B * T, n, H, value_tiles, H * D * DV * 4, q.device) or 0


def _cuda_prefill(q, k, v, slopes, initial_state, cu_seqlens, output_final_state, precision):
    """The CUDA prefill with the planned split; ``precision`` as the C API's (0 "default", 1 "high")."""
    return torch.ops.mm1.lightning_prefill_cuda(q, k, v, slopes, initial_state, cu_seqlens, output_final_state,
                                                cuda_prefill_segment_len(q, v, cu_seqlens),
                                                PRECISIONS.index(precision))


# Automatic choice on a GPU: Triton before the CUDA kernels until a GPU run has verified and
# timed the CUDA path (so far it is compile-checked and verified in host emulation only);
# backend="cuda" selects it explicitly.
register_op("lightning_attention", backends=("torch", "triton", "cuda"),
            cuda_op="lightning_prefill_cuda", gpu_order=("triton", "cuda", "torch"))
register_op("lightning_decode", backends=("torch", "triton", "cuda"),
            cuda_op="lightning_decode_cuda", gpu_order=("triton", "cuda", "torch"))
# Consistent mode's cache step has no CUDA-kernel form (the CUDA prefill cannot stop its state at
# a chunk boundary): under backend="cuda" the model's step runs Triton, and so does
# lightning_attention(..., consistent=True), so that both compute with one arithmetic.
register_op("lightning_chunk_cache_step", backends=("torch", "triton"), gpu_order=("triton", "torch"))


@torch.library.custom_op("mm1::lightning_attention", mutates_args=())
def _lightning_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                            initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                            output_final_state: bool, backend: str,
                            precision: str = "default", consistent: bool = False
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    check_precision(precision)
    if backend == "triton" or (backend == "cuda" and consistent):
        from .triton_prefill import lightning_prefill_triton
        o, final = lightning_prefill_triton(q, k, v, slopes, initial_state, cu_seqlens, output_final_state,
                                            precision=precision, consistent=consistent)
    elif backend == "cuda":
        o, final = _cuda_prefill(q, k, v, slopes, initial_state, cu_seqlens, output_final_state, precision)
    else:
        o, final = reference.lightning_chunked(q, k, v, slopes, initial_state, cu_seqlens, consistent=consistent)
    if not output_final_state or final is None:
        final = q.new_empty(0, dtype=torch.float32)
    return o, final


def prefill_fake_outputs(q, v, cu_seqlens, output_final_state):
    """Output shapes of a prefill for fake (meta) implementations: (o, final or [0])."""
    B, T, H, D = q.shape
    n = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o = q.new_empty(B, T, H, v.shape[-1])
    final = (q.new_empty(n, H, D, v.shape[-1], dtype=torch.float32) if output_final_state
             else q.new_empty(0, dtype=torch.float32))
    return o, final


@_lightning_attention_op.register_fake
def _(q, k, v, slopes, initial_state, cu_seqlens, output_final_state, backend, precision="default",
      consistent=False):
    return prefill_fake_outputs(q, v, cu_seqlens, output_final_state)


@torch.library.custom_op("mm1::lightning_attention_backward", mutates_args=())
def _lightning_attention_backward_op(do: torch.Tensor, dfinal: Optional[torch.Tensor], q: torch.Tensor,
                                     k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                                     initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                                     need_dinit: bool, backend: str, precision: str
                                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dinit) of ``mm1::lightning_attention`` (docs/m1_math.md §3.5); ``dfinal`` is
    None when no gradient reaches the final states; ``dinit`` is an empty [0] tensor unless
    ``need_dinit``. States are recomputed, nothing but the inputs is saved by the forward.
    ``precision`` is the forward's (Triton, bf16 inputs)."""
    if backend in ("triton", "cuda") and _triton_backward_runs(q):
        # The CUDA extension has no backward kernel: its backend trains on the Triton one.
        from .triton_backward import lightning_backward_triton
        dq, dk, dv, dinit = lightning_backward_triton(do, dfinal, q, k, v, slopes, initial_state, cu_seqlens,
                                                      need_dinit, precision=precision)
    else:
        dq, dk, dv, dinit = reference.lightning_chunked_backward(do, dfinal, q, k, v, slopes, initial_state,
                                                                 cu_seqlens, need_dinit=need_dinit)
    # Contiguous whatever the inputs' layout (head-major views, fla's head_first): the fake says so.
    return (dq.contiguous(), dk.contiguous(), dv.contiguous(),
            dinit.contiguous() if need_dinit else q.new_empty(0, dtype=torch.float32))


def _triton_backward_runs(q: torch.Tensor) -> bool:
    """Whether the Triton backward can take ``q``'s device (a GPU, or the CPU interpreter)."""
    return TRITON_IMPORT_ERROR is None and (q.is_cuda or (q.device.type == "cpu" and INTERPRET_AT_IMPORT))


@_lightning_attention_backward_op.register_fake
def _(do, dfinal, q, k, v, slopes, initial_state, cu_seqlens, need_dinit, backend, precision):
    dinit = (q.new_empty(initial_state.shape, dtype=torch.float32) if need_dinit and initial_state is not None
             else q.new_empty(0, dtype=torch.float32))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dinit  # contiguous, as the op


# The forward's inputs, in schema order. Every input gets a gradient slot (None for all but q, k,
# v and initial_state), so arguments appended to the schema later need no change here.
_FWD_INPUTS = ("q", "k", "v", "slopes", "initial_state", "cu_seqlens", "output_final_state", "backend",
               "precision", "consistent")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FWD_INPUTS, inputs))
    ctx.save_for_backward(args["q"], args["k"], args["v"], args["slopes"], args["initial_state"],
                          args["cu_seqlens"])
    ctx.num_inputs = len(inputs)
    ctx.output_final_state = args["output_final_state"]
    ctx.backend = args["backend"]
    ctx.precision = args.get("precision", "default")


def _backward(ctx, do, dfinal):
    q, k, v, slopes, initial_state, cu_seqlens = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dinit = initial_state is not None and bool(need[4])
    if do is None:
        do = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
    if not ctx.output_final_state:
        dfinal = None  # the [0] placeholder output carries nothing
    dq, dk, dv, dinit = torch.ops.mm1.lightning_attention_backward(
        do.contiguous(), None if dfinal is None else dfinal.float().contiguous(), q, k, v, slopes,
        initial_state, cu_seqlens, need_dinit, ctx.backend, ctx.precision)
    grads = (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None,
             dinit if need_dinit else None)
    return grads + (None,) * (ctx.num_inputs - len(grads))


torch.library.register_autograd("mm1::lightning_attention", _backward, setup_context=_setup_context)


@torch.library.custom_op("mm1::lightning_attention_cached", mutates_args=("state_cache",))
def _lightning_attention_cached_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                                   state_cache: torch.Tensor, slot_ids: torch.Tensor,
                                   cu_seqlens: Optional[torch.Tensor], output_final_state: bool,
                                   backend: str, precision: str = "default") -> Tuple[torch.Tensor, torch.Tensor]:
    check_precision(precision)
    if backend == "triton":  # in place: the kernels index the cache through slot_ids
        from .triton_prefill import lightning_prefill_triton
        o, final = lightning_prefill_triton(q, k, v, slopes, None, cu_seqlens, output_final_state,
                                            state_cache=state_cache, slot_ids=slot_ids, precision=precision)
    else:  # gather -> prefill -> scatter (no host sync); the CUDA kernels have no slot indexing yet
        prefill = None
        if backend == "cuda":
            def prefill(q, k, v, slopes, init, cu):
                return _cuda_prefill(q, k, v, slopes, init, cu, True, precision)
        o, final = reference.lightning_chunked_cached(q, k, v, slopes, state_cache, slot_ids, cu_seqlens,
                                                      prefill=prefill)
    if not output_final_state or final is None:
        final = q.new_empty(0, dtype=torch.float32)
    return o, final


@_lightning_attention_cached_op.register_fake
def _(q, k, v, slopes, state_cache, slot_ids, cu_seqlens, output_final_state, backend, precision="default"):
    return prefill_fake_outputs(q, v, cu_seqlens, output_final_state)


@torch.library.custom_op("mm1::lightning_decode", mutates_args=("state_cache",))
def _lightning_decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                         state_cache: torch.Tensor, slot_ids: Optional[torch.Tensor], return_states: bool,
                         backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, T, H, D]``; returns (o ``[B, T, H, Dv]``, per-token states or ``[0]``)."""
    if backend == "triton":
        from .triton_decode import lightning_decode_triton
        if return_states:
            o, states = lightning_decode_triton(q, k, v, slopes, state_cache, slot_ids, return_states=True)
        else:
            o, states = lightning_decode_triton(q, k, v, slopes, state_cache, slot_ids), None
    else:
        # The CUDA kernel does one token per call: T > 1 runs as T single steps here.
        step = torch.ops.mm1.lightning_decode_cuda if backend == "cuda" else reference.lightning_decode_reference
        o, states = reference.lightning_decode_tokens_reference(q, k, v, slopes, state_cache, slot_ids,
                                                                return_states, step=step)
    if states is None:
        states = q.new_empty(0, dtype=torch.float32)
    return o, states


@_lightning_decode_op.register_fake
def _(q, k, v, slopes, state_cache, slot_ids, return_states, backend):
    o = q.new_empty(q.shape[:-1] + v.shape[-1:])
    states = (q.new_empty(*q.shape, v.shape[-1], dtype=torch.float32) if return_states
              else q.new_empty(0, dtype=torch.float32))
    return o, states


def _check_no_grad(what, **tensors):
    """The in-place cache paths are inference-only: refuse inputs that need a gradient, rather
    than return outputs that silently carry none."""
    if not torch.is_grad_enabled():
        return
    needing = [name for name, t in tensors.items() if t.requires_grad]
    if needing:
        raise RuntimeError(
            f"{what} updates the state cache in place and is not differentiable, but "
            f"{', '.join(needing)} require grad: run it under torch.no_grad() / torch.inference_mode(), "
            f"or train with lightning_attention(..., initial_state=..., output_final_state=True), "
            f"which is differentiable")


def _check_qkv_slopes(q, k, v, slopes, ndim):
    check_tensor("q", q, dtypes=FLOAT_DTYPES, ndim=ndim, last_dim_contiguous=True)
    device = q.device
    check_tensor("k", k, dtypes=FLOAT_DTYPES, shape=tuple(q.shape), device=device, last_dim_contiguous=True)
    check_tensor("v", v, dtypes=FLOAT_DTYPES, shape=tuple(q.shape[:-1]) + (None,), device=device,
                 last_dim_contiguous=True)
    check_same_dtype(q=q, k=k, v=v)
    H, D, DV = q.shape[-2], q.shape[-1], v.shape[-1]
    if not (1 <= D <= MAX_HEAD_DIM and 1 <= DV <= MAX_HEAD_DIM):
        raise ValueError(f"head dims must be in [1, {MAX_HEAD_DIM}], got q/k {D} and v {DV}")
    check_tensor("slopes", slopes, dtypes=(torch.float32,), shape=(H,), device=device, contiguous=True)
    check_slopes(slopes)
    return H, D, DV


@annotate("mm1.lightning_attention")
def _check_prefill_args(q, k, v, slopes, precision, cu_seqlens, check_ids):
    """The checks every [B, T, H, D] entry point shares: q/k/v/slopes, precision, and varlen
    packing. Returns (H, D, DV, B, T, number of sequences)."""
    H, D, DV = _check_qkv_slopes(q, k, v, slopes, 4)
    check_precision(precision)
    B, T = q.shape[:2]
    if cu_seqlens is None:
        return H, D, DV, B, T, B
    if B != 1:
        raise ValueError(f"varlen input (cu_seqlens given) must be packed with B == 1, got B = {B}")
    return H, D, DV, B, T, check_cu_seqlens(cu_seqlens, T, q.device, values=check_ids)


def lightning_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                        initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                        cu_seqlens: Optional[torch.Tensor] = None, backend: Optional[str] = None, *,
                        state_cache: Optional[torch.Tensor] = None, slot_ids: Optional[torch.Tensor] = None,
                        check_ids: bool = True, precision: str = "default", consistent: bool = False):
    """Chunked lightning attention (prefill): ``o_t = q_t S_t``, ``S_t = exp(-s) S_{t-1} + k_t^T v_t``.

    Args:
        q, k: ``[B, T, H, D]``; v: ``[B, T, H, Dv]``; bf16, fp16 or fp32, one dtype, unit stride
            in the last dimension (views of a fused qkv tensor are fine). No 1/sqrt(D) scale.
        slopes: ``[H]`` fp32 decay rates (:func:`lightning_slopes`); the decay is ``exp(-slopes)``.
        initial_state: optional fp32 ``[N, H, D, Dv]`` contiguous, the state before each sequence.
        output_final_state: also return each sequence's fp32 state after its last token.
        cu_seqlens: optional int32/int64 ``[N+1]`` offsets for varlen input packed with ``B == 1``:
            sequence i is tokens ``cu_seqlens[i]:cu_seqlens[i+1]``; N = B otherwise.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or None (automatic; see ``_dispatch``).
        state_cache: optional fp32 ``[S, H, D, Dv]`` contiguous slot-indexed state cache (a serving
            engine's chunked prefill): sequence n starts from ``state_cache[slot_ids[n]]`` and its
            final state is written back into that slot in place, so no gather/scatter is needed
            around the call. A fresh sequence needs its slot zeroed first (as vLLM does).
            Excludes ``initial_state`` (ValueError naming both).
        slot_ids: int32/int64 ``[N]``, one slot per sequence (only with ``state_cache``; default:
            sequence n uses slot n, needing N ≤ S). The non-negative slots must be distinct and
            ``< S`` (ValueError). A negative slot marks a padding sequence: its slot is neither read
            nor written, its outputs are 0 (and so is its ``final_state`` entry when requested).
        check_ids: check the values of ``cu_seqlens`` and ``slot_ids`` on the host (default; one
            sync per new tensor, memoized while it is unmodified). ``False`` skips it for callers
            that build these tensors afresh every call and vouch for them (serving loops); the
            kernels then never read or write out of bounds (an out-of-range slot gives NaN
            outputs and leaves the cache untouched), but repeated slots are not detected.
        precision: ``"default"`` or ``"high"`` (ValueError otherwise): how the Triton kernel
            multiplies bf16 inputs with its fp32 state and decayed scores when computing o.
            ``"default"`` rounds them to bf16 for those products, the accuracy of a plain bf16
            tensor-core kernel (tested ≤ 2× that naive error against fp64; at H=2, D=128, T=257
            1.72e-3 relative error vs 1.66e-3 for ``"high"``, since storing o in bf16
            dominates), with 4/3 of the counted tensor-core work. ``"high"`` splits each into a
            bf16 pair hi + lo (~16 significant bits) at 11/6 of it. In both, the state update
            keeps ~16 bits (the returned states meet the fp32 contract, 1e-5). The backward
            uses the forward's mode: in ``"default"`` the gradient of ``initial_state`` is
            bf16-accurate (~2e-3 relative, within 2× naive), in ``"high"`` ~2e-6. fp32 inputs
            always multiply in full fp32 and fp16 inputs in TF32 (exact for fp16, no fp16
            overflow of the state), whatever ``precision`` says; the torch backend (an fp64/fp32
            reference) ignores it. The CUDA backend has both modes for bf16 inputs (the same
            schemes on bf16 tensor cores, csrc/README.md) and computes fp32/fp16 like Triton.
        consistent: consistent mode's canonical arithmetic (docs/m1_math.md §3.6): one pass per
            sequence whatever the sizes (the Triton kernel never splits a sequence into
            segments; the torch backend pads every chunk to 64 rows), so each token's output is
            bitwise what :func:`lightning_chunk_cache_step` computes for it when the sequence is
            prefilled and decoded in any pieces, in any batch. Under ``backend="cuda"`` it runs
            the Triton kernels (the cache step has no CUDA form). Same backward. Excludes
            ``state_cache`` (ValueError: use :func:`lightning_chunk_cache_step`).

    Returns:
        ``(o, final_state)``: o ``[B, T, H, Dv]`` in q's dtype; final_state fp32 ``[N, H, D, Dv]``
        or None when not requested (with ``state_cache``: the states also written to the slots).

    Differentiable (without ``state_cache``) w.r.t. q, k, v and ``initial_state``, including
    gradients through ``final_state`` (docs/m1_math.md §3.5): the torch backend differentiates
    the fp32 chunked reference, the Triton and CUDA backends run the Triton backward
    (``triton_backward.py``; it recomputes the states, the forward saves only its inputs).
    ``slopes`` are constants (RuntimeError if they require grad). With ``state_cache`` the op
    updates the cache in place and is inference-only: inputs requiring grad in grad mode raise
    RuntimeError.

    The state and all accumulation are fp32. The Triton kernel's docstring says how one
    1,048,576-token sequence runs in one call with bounded scratch. With ``state_cache`` the
    Triton kernels read and write the slots in place; the torch and CUDA backends gather the
    slots' states, run, and scatter the final states back (the CUDA kernels have no slot
    indexing yet), all without a host sync. The slot check is the one host sync (memoized per
    ``slot_ids`` tensor, skipped during CUDA graph capture and torch.compile; an out-of-range
    slot then leaves the cache untouched and gives NaN outputs on Triton).
    """
    H, D, DV, B, T, n = _check_prefill_args(q, k, v, slopes, precision, cu_seqlens, check_ids)
    device = q.device
    if initial_state is not None:
        if state_cache is not None:
            raise ValueError("pass either initial_state or state_cache (with slot_ids), not both: "
                             "with state_cache the initial states are read from the slots")
        check_tensor("initial_state", initial_state, dtypes=(torch.float32,), shape=(n, H, D, DV),
                     device=device, contiguous=True)
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    if not isinstance(consistent, bool):
        raise TypeError(f"consistent must be a bool, got {type(consistent).__name__}")
    if consistent and state_cache is not None:
        raise ValueError("consistent=True excludes state_cache: a consistent-mode cache keeps the partial "
                         "chunk's k, v as well; use lightning_chunk_cache_step")
    if slopes.requires_grad and torch.is_grad_enabled():
        # The backward treats the decays as constants: a gradient would silently be missing.
        raise RuntimeError("slopes require grad, but lightning_attention has no gradient for them (the "
                           "decays are constants): pass slopes.detach()")
    if state_cache is None:
        if slot_ids is not None:
            raise ValueError("slot_ids needs state_cache (the slot-indexed state cache it indexes)")
        chosen = resolve_backend("lightning_attention", backend, device)
        o, final = torch.ops.mm1.lightning_attention(q, k, v, slopes, initial_state, cu_seqlens,
                                                     output_final_state, chosen, precision, consistent)
        return o, (final if output_final_state else None)
    check_tensor("state_cache", state_cache, dtypes=(torch.float32,), shape=(None, H, D, DV),
                 device=device, contiguous=True)
    _check_no_grad("lightning_attention with state_cache", q=q, k=k, v=v, state_cache=state_cache)
    if slot_ids is None:
        if n > state_cache.shape[0]:
            raise ValueError(f"without slot_ids, sequence n uses slot n: {n} sequences > "
                             f"{state_cache.shape[0]} slots")
        slot_ids = torch.arange(n, dtype=torch.int32, device=device)
    else:
        check_slot_ids(slot_ids, n, state_cache.shape[0], device, values=check_ids)
    chosen = resolve_backend("lightning_attention", backend, device)
    o, final = torch.ops.mm1.lightning_attention_cached(q, k, v, slopes, state_cache, slot_ids, cu_seqlens,
                                                        output_final_state, chosen, precision)
    return o, (final if output_final_state else None)


@torch.library.custom_op("mm1::lightning_chunk_cache_step", mutates_args=("state_cache", "partial_k", "partial_v"))
def _lightning_chunk_cache_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                                   state_cache: torch.Tensor, partial_k: torch.Tensor, partial_v: torch.Tensor,
                                   slot_ids: torch.Tensor, cached_lens: torch.Tensor, cu_seqlens: torch.Tensor,
                                   backend: str, precision: str) -> torch.Tensor:
    """Packed ``[1, T, H, ·]`` inputs with ``cu_seqlens``; returns o ``[1, T, H, Dv]``."""
    from .consistent import chunk_cache_step
    if backend == "triton":
        from .triton_prefill import lightning_prefill_triton

        def prefill(q2, k2, v2, cu2):
            return lightning_prefill_triton(q2, k2, v2, slopes, None, cu2, False, state_cache=state_cache,
                                            slot_ids=slot_ids, precision=precision, consistent=True,
                                            boundary_state=True)[0]
    else:
        def chunked(q2, k2, v2, slopes, init, cu2):
            return reference.lightning_chunked(q2, k2, v2, slopes, init, cu2, consistent=True, boundary_state=True)

        def prefill(q2, k2, v2, cu2):
            return reference.lightning_chunked_cached(q2, k2, v2, slopes, state_cache, slot_ids, cu2,
                                                      prefill=chunked)[0]
    return chunk_cache_step(q, k, v, slopes, state_cache, partial_k, partial_v, slot_ids, cached_lens,
                            cu_seqlens, prefill)


@_lightning_chunk_cache_step_op.register_fake
def _(q, k, v, slopes, state_cache, partial_k, partial_v, slot_ids, cached_lens, cu_seqlens, backend, precision):
    return q.new_empty(q.shape[:-1] + v.shape[-1:])


@annotate("mm1.lightning_chunk_cache_step")
def lightning_chunk_cache_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                               state_cache: torch.Tensor, partial_k: torch.Tensor, partial_v: torch.Tensor,
                               slot_ids: torch.Tensor, cached_lens: torch.Tensor,
                               cu_seqlens: Optional[torch.Tensor] = None, backend: Optional[str] = None, *,
                               check_ids: bool = True, precision: str = "default") -> torch.Tensor:
    """Consistent mode's lightning step on a slot cache: prefill, continued prefill and decode alike.

    Each sequence's new tokens get bitwise the outputs that
    ``lightning_attention(whole_sequence, consistent=True)`` gives them on the same backend
    (and ``precision``), however the sequence is cut into calls and whatever else is in the
    batch (docs/m1_math.md §3.6). A slot holds the fp32 state at the sequence's last chunk
    boundary (a multiple of 64 tokens) and the k, v of the tokens since then (the partial
    chunk); the step reruns the single-pass prefill over [partial chunk + new tokens] from that
    state, advances the state over the chunks that completed and stores the new partial chunk.

    Args:
        q, k: ``[B, T, H, D]``; v: ``[B, T, H, Dv]`` (one dtype; unit stride in the last dim):
            the new tokens; ``[B, 1, H, D]`` is a decode step. With ``cu_seqlens`` packed,
            ``B == 1``, as in :func:`lightning_attention`; without, row b is sequence b.
        slopes: ``[H]`` fp32.
        state_cache: fp32 ``[S, H, D, Dv]`` contiguous: each slot's state at its last chunk
            boundary. A fresh sequence needs its slot zeroed (and ``cached_lens`` 0).
        partial_k, partial_v: ``[S, 64, H, D]`` / ``[S, 64, H, Dv]`` contiguous, q's dtype: each
            slot's partial chunk, row ``i`` the token at position ``boundary + i``.
        slot_ids: int32/int64 ``[N]``, distinct (ValueError); negative = padding (zero outputs,
            slot untouched).
        cached_lens: int32/int64 ``[N]`` on q's device: tokens sequence n's slot has seen
            before this call (its partial chunk holds ``cached_lens % 64`` of them). The caller
            advances it by the new tokens afterwards.
        cu_seqlens: as in :func:`lightning_attention`.
        backend: ``"torch"``, ``"triton"`` or None (automatic: Triton on a GPU); each backend
            reproduces its own ``lightning_attention(..., consistent=True)``.
        check_ids: as in :func:`lightning_attention` (host checks of ``slot_ids``,
            ``cu_seqlens`` and ``cached_lens >= 0``; ``False`` skips them, no host sync).
        precision: as in :func:`lightning_attention` (Triton, bf16).

    Returns ``o`` ``[B, T, H, Dv]`` in q's dtype. Updates ``state_cache``, ``partial_k`` and
    ``partial_v`` in place; inference-only (RuntimeError if an input requires grad).

    Cost per call and sequence (docs/m1_math.md §3.6): the partial chunk's ``cached_lens % 64``
    rows are read and recomputed with the new ones, i.e. a decode step is one chunk of the
    prefill (up to 64 rows) instead of one recurrence step. No host sync (static shapes, the
    packed buffer has ``T + 63·N`` rows), so a decode step can be captured in a CUDA graph.
    """
    H, D, DV, B, T, n = _check_prefill_args(q, k, v, slopes, precision, cu_seqlens, check_ids)
    device = q.device
    check_tensor("state_cache", state_cache, dtypes=(torch.float32,), shape=(None, H, D, DV),
                 device=device, contiguous=True)
    S = state_cache.shape[0]
    check_tensor("partial_k", partial_k, dtypes=(q.dtype,), shape=(S, CONSISTENT_CHUNK, H, D), device=device,
                 contiguous=True)
    check_tensor("partial_v", partial_v, dtypes=(q.dtype,), shape=(S, CONSISTENT_CHUNK, H, DV), device=device,
                 contiguous=True)
    check_slot_ids(slot_ids, n, S, device, values=check_ids)
    check_tensor("cached_lens", cached_lens, dtypes=INDEX_DTYPES, shape=(n,), device=device, contiguous=True)
    if check_ids and can_check_device_values(cached_lens) and bool((cached_lens < 0).any()):
        raise ValueError(f"cached_lens must be >= 0, got {cached_lens.tolist()[:16]}")
    if slopes.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("slopes require grad, but lightning_chunk_cache_step is inference-only: pass "
                           "slopes.detach()")
    _check_no_grad("lightning_chunk_cache_step", q=q, k=k, v=v, state_cache=state_cache, partial_k=partial_k,
                   partial_v=partial_v)
    chosen = resolve_backend("lightning_chunk_cache_step", backend, device)
    if B * T == 0:  # no new token: nothing to compute, the slots stay as they are
        return q.new_empty(B, T, H, DV)
    if cu_seqlens is None:  # rows as packed sequences
        cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=device)
        q, k, v = (x.reshape(1, B * T, H, x.shape[-1]) for x in (q, k, v))
    else:
        cu = cu_seqlens
    o = torch.ops.mm1.lightning_chunk_cache_step(q, k, v, slopes, state_cache, partial_k, partial_v, slot_ids,
                                                 cached_lens, cu, chosen, precision)
    return o.view(B, T, H, DV)


@annotate("mm1.lightning_decode")
def lightning_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                     state_cache: torch.Tensor, slot_ids: Optional[torch.Tensor] = None,
                     backend: Optional[str] = None, *, return_states: bool = False, check_ids: bool = True):
    """Lightning decode for a batch, T ≥ 1 tokens per row, updating ``state_cache`` in place.

    Args:
        q, k: ``[B, H, D]`` (one token) or ``[B, T, H, D]`` (T tokens per row, applied in order:
            speculative verify, prefix caching); v likewise with Dv.
        slopes: ``[H]`` fp32.
        state_cache: fp32 ``[S, H, D, Dv]`` contiguous; row b reads and writes slot ``slot_ids[b]``.
        slot_ids: int32/int64 ``[B]``; a negative slot marks a padding row (state untouched,
            outputs zero, per-token states zero). Default: row b uses slot b (needs ``B <= S``).
            Required: the non-negative slots are distinct (each row updates its slot in place);
            a repeated slot raises ValueError. Negative padding ids may repeat.
        backend: as in :func:`lightning_attention`.
        return_states: also return the fp32 state after each token, ``[B, T, H, D, Dv]``
            (``[B, H, D, Dv]`` for ``[B, H, D]`` inputs): the caller keeps the accepted prefix's
            state, e.g. ``state_cache[slot] = states[b, accepted - 1]``.
        check_ids: as in :func:`lightning_attention` (``False``: no host check of ``slot_ids``).

    Returns ``o`` shaped like q (with v's last dimension), in q's dtype; with ``return_states``,
    ``(o, states)``. The slot ends at the state after the last of the T tokens.

    The Triton kernel walks the T tokens in one program (state in registers, the slot read and
    written once); the CUDA kernel does one token per call, so its backend runs T steps.
    No host synchronization on the GPU except the slot check (range and distinctness; one copy
    of the ids, done once per ``slot_ids`` tensor while it is unmodified, so a model's layers
    sharing one tensor pay it once), which is skipped during CUDA graph capture and
    torch.compile; the kernels then leave the state of an out-of-range slot untouched and
    return NaN for that row, so a bad id is loud, never an out-of-bounds write (repeated slots
    are then not detected: their rows race on one state).
    """
    if not isinstance(return_states, bool):
        raise TypeError(f"return_states must be a bool, got {type(return_states).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4) or t.dim() != q.dim():
            raise ValueError(f"q, k, v must all be [B, H, D] or all [B, T, H, D]; {name} has shape {list(t.shape)}")
    one_token = q.dim() == 3
    if one_token:
        q, k, v = q[:, None], k[:, None], v[:, None]
    H, D, DV = _check_qkv_slopes(q, k, v, slopes, 4)
    B, T = q.shape[:2]
    if T < 1:
        raise ValueError(f"q must hold at least one token per row, got shape {list(q.shape)}")
    device = q.device
    check_tensor("state_cache", state_cache, dtypes=(torch.float32,), shape=(None, H, D, DV),
                 device=device, contiguous=True)
    _check_no_grad("lightning_decode", q=q, k=k, v=v, state_cache=state_cache)
    if slot_ids is not None:
        check_slot_ids(slot_ids, B, state_cache.shape[0], device, values=check_ids)
    elif B > state_cache.shape[0]:
        raise ValueError(f"without slot_ids, row b uses slot b: batch {B} > {state_cache.shape[0]} slots")
    chosen = resolve_backend("lightning_decode", backend, device)
    o, states = torch.ops.mm1.lightning_decode(q, k, v, slopes, state_cache, slot_ids, return_states, chosen)
    if one_token:
        o, states = o[:, 0], (states[:, 0] if return_states else states)
    return (o, states) if return_states else o


def lightning_slopes(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """M1's per-head decay rates for a global layer index; see ``reference.lightning_slopes``."""
    return reference.lightning_slopes(num_heads, layer_idx, num_layers)

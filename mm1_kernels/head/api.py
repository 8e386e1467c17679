"""Public FP32-head ops: validation, backend dispatch, custom-op registration, autograd.

Why this exists (docs/m1_math.md §6): bf16 logits made MiniMax-M1's training and rollout token
probabilities diverge; the head must produce fp32 logits. bf16 × bf16 products are exact in
fp32, so the whole fix is "accumulate and keep logits in fp32" — and because fp32 logits for
8k tokens × 200,064 vocabulary are 6.6 GB, they are never stored: every op here works on
tiles/blocks and keeps O(T + V) state.

``head_logprobs`` is ``torch.ops.mm1.head_logprobs`` with a fake implementation and a
backward registered through ``torch.library.register_autograd`` (itself the custom op
``torch.ops.mm1.head_logprobs_backward``), so training code compiles with
``torch.compile(fullgraph=True)``. The backend is a string argument resolved before the call;
``precision`` (:func:`head_logprobs`) is a string argument of the op too.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from .._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    can_check_device_values,
    check_index_range,
    check_precision,
    check_same_dtype,
    check_tensor,
)
from .._dispatch import register_op, resolve_backend
from .._nvtx import annotate
from . import cuda_ops as _cuda_ops  # the cuda backend; importing it registers the fakes of its ops
from . import reference, torch_head
from .reference import IGNORE_INDEX

# backend="cuda" (csrc/head/) runs only when asked for: no GPU run of it is on record yet, so
# gpu_order puts it last and backend=None never picks it (torch is always available first).
_CUDA = dict(cuda_op="head_forward_cuda", gpu_order=("triton", "torch", "cuda"))
register_op("head_logprobs", backends=("torch", "triton", "cuda"), **_CUDA)
register_op("head_sample", backends=("torch", "triton", "cuda"), **_CUDA)
register_op("head_logits", backends=("torch", "triton", "cuda"), **_CUDA)
# head_cispo_loss passes its backend to head_logprobs (the loss itself is torch everywhere).
register_op("head_cispo_loss", backends=("torch", "triton", "cuda"), **_CUDA)
register_op("cispo_loss", backends=("torch",))
DEFAULT_EPS_HIGH = 0.2


class HeadOutput(NamedTuple):
    """Per-token fp32 results of :func:`head_logprobs`, each shaped like ``targets``."""
    logprobs: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor


def _forward_impl(hidden, weight, targets, temperature, backend, precision):
    check_precision(precision)
    if hidden.shape[0] == 0:
        return tuple(hidden.new_empty(0, dtype=torch.float32) for _ in range(3))
    if backend == "triton":
        from .triton_head import head_forward_triton
        return head_forward_triton(hidden, weight, targets, temperature, precision=precision)
    # cuda (always the two-sum) and torch (fp64 rounded once): precision changes nothing.
    if backend == "cuda":
        return _cuda_ops.head_forward_cuda(hidden, weight, targets, temperature)
    return torch_head.head_forward_torch(hidden, weight, targets, temperature)


@torch.library.custom_op("mm1::head_logprobs", mutates_args=())
def _head_logprobs_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      temperature: float, backend: str, precision: str = "default"
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(hidden, weight, targets, temperature, backend, precision)


@_head_logprobs_op.register_fake
def _(hidden, weight, targets, temperature, backend, precision="default"):
    check_precision(precision)
    T = hidden.shape[0]
    return tuple(hidden.new_empty(T, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("mm1::head_logprobs_backward", mutates_args=())
def _head_logprobs_backward_op(g_lp: torch.Tensor, g_lse: torch.Tensor, g_ent: torch.Tensor,
                               hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               lse: torch.Tensor, entropy: torch.Tensor, temperature: float,
                               backend: str, need_dweight: bool, precision: str = "default"
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dhidden, dweight); dweight is an empty [0] tensor when not needed (frozen head).
    ``precision``: the forward's (the logits are recomputed with it)."""
    check_precision(precision)
    if hidden.shape[0] == 0:
        return torch.zeros_like(hidden), (torch.zeros_like(weight) if need_dweight
                                          else weight.new_empty(0))
    # An ignored row's logprob is the constant 0: its upstream gradient goes nowhere.
    g_lp = torch.where(targets != IGNORE_INDEX, g_lp, torch.zeros_like(g_lp))
    if backend == "cuda":
        return _cuda_ops.head_backward_cuda(g_lp, g_lse, g_ent, hidden, weight, targets, lse, entropy,
                                            temperature, need_dweight=need_dweight)
    if backend == "triton":
        from .triton_head import head_backward_triton
        return head_backward_triton(g_lp, g_lse, g_ent, hidden, weight, targets, lse, entropy,
                                    temperature, need_dweight=need_dweight, precision=precision)
    return torch_head.head_backward_torch(g_lp, g_lse, g_ent, hidden, weight, targets, lse, entropy,
                                          temperature, need_dweight=need_dweight)


@_head_logprobs_backward_op.register_fake
def _(g_lp, g_lse, g_ent, hidden, weight, targets, lse, entropy, temperature, backend, need_dweight,
      precision="default"):
    return torch.empty_like(hidden), (torch.empty_like(weight) if need_dweight else weight.new_empty(0))


# The forward's inputs, in schema order (inputs may stop before a defaulted trailing argument).
_FWD_INPUTS = ("hidden", "weight", "targets", "temperature", "backend", "precision")


def _setup_context(ctx, inputs, output):
    args = dict(zip(_FWD_INPUTS, inputs))
    _, lse, entropy = output
    ctx.save_for_backward(args["hidden"], args["weight"], args["targets"], lse, entropy)
    ctx.temperature = args["temperature"]
    ctx.backend = args["backend"]
    ctx.precision = args.get("precision", "default")
    ctx.num_inputs = len(inputs)


def _backward(ctx, g_lp, g_lse, g_ent):
    hidden, weight, targets, lse, entropy = ctx.saved_tensors
    zeros = lambda g: torch.zeros_like(lse) if g is None else g.float().contiguous()
    dh, dw = torch.ops.mm1.head_logprobs_backward(zeros(g_lp), zeros(g_lse), zeros(g_ent), hidden,
                                                  weight, targets, lse, entropy, ctx.temperature,
                                                  ctx.backend, bool(ctx.needs_input_grad[1]), ctx.precision)
    return ((dh if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None)
            + (None,) * (ctx.num_inputs - 2))


torch.library.register_autograd("mm1::head_logprobs", _backward, setup_context=_setup_context)


def _check_head_inputs(hidden, weight):
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, ndim=(1, 2, 3, 4), last_dim_contiguous=True)
    device = hidden.device
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, shape=(None, hidden.shape[-1]), device=device,
                 contiguous=True)
    check_same_dtype(hidden=hidden, weight=weight)
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    return device


_FP32_MAX = torch.finfo(torch.float32).max
# Tempered logits up to this magnitude keep every backend's fp32 statistics finite (the torch
# backend forms z - max z, the Triton kernel also m_init - z with m_init = -3e38).
_SAFE_TEMPERED_LOGIT = 1e37
# The kernels multiply fp32 logits by 1/temperature: below this it is inf and every output NaN.
_MIN_TEMPERATURE = 1.0 / _FP32_MAX


def _check_temperature(temperature, allow_zero=False):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and (temperature >= _MIN_TEMPERATURE
                                            or (allow_zero and temperature == 0))):
        raise ValueError(f"temperature must be finite and >= {_MIN_TEMPERATURE:.3g}"
                         f"{' (or 0 for greedy)' if allow_zero else ''}, got {temperature}")
    return float(temperature)


def _nonfinite_logits(op: str, bad: torch.Tensor, h2: torch.Tensor, weight: torch.Tensor,
                      temperature: float, inputs_may_be_nonfinite: bool) -> None:
    """Rows ``bad [rows]`` had non-finite tempered fp32 logits (or statistics): name the cause.

    The temperature is at fault when the same rows' untempered logits are finite (then
    ``logits / temperature`` overflowed fp32): ValueError naming it. Otherwise hidden or weight
    hold (or multiply into) NaN/inf: ValueError naming them, unless ``inputs_may_be_nonfinite``
    (head_logprobs passes NaN inputs through as NaN outputs, at every temperature alike).
    Runs only on the error path, on at most 8 rows.
    """
    rows = bad.nonzero().flatten()
    shown = rows[:8]
    where = f"{rows.numel()} row(s) (first {shown.tolist()})"
    z1 = torch_head.tempered_logits_fp32(h2[shown], weight, 1.0)
    if not bool(torch.isfinite(z1).all()):
        if inputs_may_be_nonfinite:
            return
        raise ValueError(f"{op}: cannot sample: the logits hidden @ weight.T are NaN or inf in "
                         f"{where}: hidden or weight holds non-finite values")
    peak = float(z1.abs().max())
    if temperature < 1.0:
        raise ValueError(
            f"{op}: temperature={temperature:.3g} is too small for these logits: logits / temperature "
            f"overflows fp32 in {where}; max |logit| there is {peak:.3g}; keep max|logit| / "
            f"temperature below ~1e37, i.e. temperature above ~{peak / _SAFE_TEMPERED_LOGIT:.3g}")
    raise ValueError(f"{op}: cannot sample: the logits hidden @ weight.T reach {peak:.3g} in {where}, "
                     f"beyond the fp32 range the head supports (1e37): hidden or weight is out of range")


@annotate("mm1.head_logprobs")
def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  temperature: float = 1.0, backend: Optional[str] = None,
                  precision: str = "default") -> HeadOutput:
    """FP32 LM head: per-token logprob of ``targets``, logsumexp and entropy, without ``[T, V]``.

    Args:
        hidden: ``[T, K]`` (or ``[..., K]``) final hidden states, bf16/fp16/fp32, unit stride in
            the last dimension.
        weight: ``[V, K]`` contiguous LM-head weight, same dtype as hidden.
        targets: ``[T]`` (or ``[...]`` matching hidden's leading dims) int32/int64 token ids in
            ``[0, V)``; ``-100`` marks an ignored row.
        temperature: logits are divided by it before anything else; ``lse`` and ``entropy`` are
            those of the tempered distribution softmax(logits / temperature). Must be finite
            and ``>= 1 / 3.4e38`` (so that 1/temperature is a finite fp32), else ValueError.
            Below 1, ``logits / temperature`` can overflow fp32 (safe while
            ``max|logit| / temperature <= 1e37``; beyond that, depending on the backend): the op
            then checks that every row's results are finite and raises ValueError naming
            ``temperature`` if they are not because of it (NaN/inf in hidden or weight give
            NaN results, as at any temperature).
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` (the compiled extension, only when named)
            or None (automatic; see ``mm1_kernels._dispatch``).
        precision: ``"default"`` or ``"high"``: the Triton backend's accumulation over K
            (``"high"``: a two-sum across K blocks, ~3× lower logit error at |logit| ~ 100 for
            ~1.75× the tensor-core time); the torch and cuda backends ignore it. See below.

    Returns:
        :class:`HeadOutput` ``(logprobs, lse, entropy)``, fp32, shaped like ``targets``.
        Ignored rows: ``logprobs`` is 0 and carries no gradient; ``lse`` and ``entropy`` are
        still reported and differentiable.

    Precision: logits are fp32 and never rounded below it. bf16/fp16 inputs: exact products
    (bf16 × bf16 fits in fp32), fp32 accumulation — on a GPU, tensor cores with fp32 output.
    fp32 inputs: full-fp32 (IEEE) products and accumulation, no TF32: TF32 keeps 10 mantissa
    bits, a ~5e-4 relative logit error, i.e. up to ~0.05 in a logprob at logits of ~100, which
    defeats the purpose; the price is that the Triton kernel runs on CUDA cores, not tensor
    cores, for fp32 inputs (bf16 weights are the production case).

    ``precision`` sets how a logit is summed over K. ``triton``: ``"default"`` accumulates it
    in one fp32 running sum, as any fp32-accumulating GEMM; ``"high"`` adds each K block's
    product (64 wide for 16-bit inputs on a GPU) with a two-sum, leaving only the rounding
    inside one block: max |Δlogprob| against fp64 at |logit| ~ 100 with a massive-activation
    channel 7.6e-6 instead of 2.5e-5 (K = 1024, CPU interpreter), for ~1.75× the tensor-core
    time in fp32 adds and half the bf16 tile (``triton_head``'s docstring). ``torch``:
    ignored; its logits are the fp64 product rounded once to fp32 already (bitwise the same in
    both precisions). ``cuda``: ignored; its kernels always add each 32-wide K block with a
    two-sum (csrc/README.md), i.e. compute "high" in both. The backward recomputes the logits
    with the forward's precision.

    Host synchronization: one, the check that targets are in range; a second when
    temperature < 1, the overflow check above. Both are skipped under CUDA graph capture and
    torch.compile (an out-of-range target then gives a wrong logprob on the triton backend,
    never an out-of-bounds read; an overflowing temperature gives non-finite results).

    Determinism (triton backend): fixed tiles, vocabulary splits that depend only on V, merged
    in a fixed order with no atomics, so results are bitwise reproducible and a token's result
    does not depend on the rest of the batch. The torch backend is deterministic but relies on
    the BLAS for batch invariance.

    Differentiable w.r.t. hidden and weight (upstream gradients of all three outputs); the
    backward recomputes logits block by block (see ``backward.head_backward_blocks``) and
    accumulates both gradients in fp32, deterministically, returning them in the input dtype.
    """
    device = _check_head_inputs(hidden, weight)
    lead = hidden.shape[:-1]
    check_tensor("targets", targets, dtypes=INDEX_DTYPES, shape=tuple(lead), device=device)
    temperature = _check_temperature(temperature)
    check_precision(precision)
    V, K = weight.shape
    h2 = hidden.reshape(-1, K)
    t1 = targets.reshape(-1).contiguous()
    check_index_range("targets", t1, V, "the vocabulary size", ignore_value=IGNORE_INDEX)
    chosen = resolve_backend("head_logprobs", backend, device)
    lp, lse, ent = torch.ops.mm1.head_logprobs(h2, weight, t1, temperature, chosen, precision)
    if temperature < 1.0 and h2.shape[0] and can_check_device_values(lse):
        bad = ~(torch.isfinite(lp) & torch.isfinite(lse) & torch.isfinite(ent))
        if bool(bad.any()):
            _nonfinite_logits("head_logprobs", bad, h2, weight, temperature,
                              inputs_may_be_nonfinite=True)
    return HeadOutput(lp.reshape(lead), lse.reshape(lead), ent.reshape(lead))


def sample_from_logits(z: torch.Tensor, top_p: float = 1.0, top_k: int = 0, generator=None) -> torch.Tensor:
    """One token per row of tempered fp32 logits ``z [rows, V]`` after top-k (``0`` = off) and
    top-p (``1.0`` = off): the sampling step of :func:`head_sample`, public so that a caller
    holding the logits another way (a vocabulary-parallel head that gathered them) draws exactly
    the tokens ``head_sample`` would with the same generator state."""
    V = z.shape[-1]
    # masked_fill with a Python scalar: a torch.tensor(-inf, device=cuda) fill value would be a
    # blocking host-to-device copy on every decode step.
    if 0 < top_k < V:
        kth = z.topk(top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = z.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_z = sorted_z.masked_fill(drop, float("-inf"))
        z = torch.full_like(z, float("-inf")).scatter(-1, order, sorted_z)
    probs = torch.softmax(z, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0,
                backend: Optional[str] = None, precision: str = "default") -> torch.Tensor:
    """The FP32 head for every row: fp32 ``(hidden @ weight.T) / temperature``, ``[..., V]``.

    For callers that need the logits themselves (a model's ``.logits``, an engine's logits
    processors); the training and sampling paths never form them (:func:`head_logprobs`,
    :func:`head_sample`). Without autograd they are the logits those ops compute: the Triton
    head kernel's (bitwise what :func:`head_sample` samples from), or the torch backend's
    correctly rounded fp32 product, vocabulary chunk by chunk, so no fp32 copy of the weight
    is made. When ``hidden`` or ``weight`` requires grad under autograd they are a
    differentiable ``linear`` whatever the backend: on fp32 upcasts (a transient fp32 copy of
    the weight) with ``precision="default"``; with ``"high"`` on fp64 upcasts rounded once to
    fp32 (the torch backend's logits; a transient fp64 copy). ``precision``: as in
    :func:`head_logprobs`.
    """
    _check_head_inputs(hidden, weight)
    t = _check_temperature(temperature)
    check_precision(precision)
    lead, (V, K) = hidden.shape[:-1], weight.shape
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        if precision == "high":
            z = torch.nn.functional.linear(hidden.to(torch.float64), weight.to(torch.float64))
            return (z if t == 1.0 else z / t).to(torch.float32)
        z = torch.nn.functional.linear(hidden.to(torch.float32), weight.to(torch.float32))
        return z if t == 1.0 else z / t
    h2 = hidden.reshape(-1, K)
    if h2.shape[0] == 0:
        return h2.new_empty(*lead, V, dtype=torch.float32)
    chosen = resolve_backend("head_logits", backend, hidden.device)
    if chosen == "triton":
        from .triton_head import head_logits_triton
        z = head_logits_triton(h2.contiguous(), weight.contiguous(), t, precision=precision)
    elif chosen == "cuda":
        z = _cuda_ops.head_logits_cuda(h2, weight, t)
    else:
        z = torch_head.tempered_logits_fp32(h2, weight, t)
    return z.reshape(*lead, V)


@annotate("mm1.head_sample")
@torch.no_grad()
def head_sample(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0,
                top_p: float = 1.0, top_k: int = 0, generator: Optional[torch.Generator] = None,
                backend: Optional[str] = None, precision: str = "default") -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample next tokens from the fp32 head distribution (the rollout side).

    Args:
        hidden: ``[B, K]`` (or ``[..., K]``) hidden states of the positions to sample.
        weight: ``[V, K]``, same dtype as hidden.
        temperature: > 0 samples from softmax(logits / temperature); 0 is greedy (argmax), and
            the returned logprobs are then those of the untempered distribution. Otherwise
            ``>= 1 / 3.4e38``; a temperature at which ``logits / temperature`` overflows fp32
            raises ValueError naming it (see :func:`head_logprobs`).
        top_p: nucleus mass in (0, 1]; 1 disables it. top_k: 0 disables it.
        generator: a ``torch.Generator`` on hidden's device; same generator state, same inputs
            → same tokens.
        backend: as in :func:`head_logprobs`; it computes the returned logprobs.
        precision: as in :func:`head_logprobs`; the sampled logits and the returned logprobs
            both use it (so the training side must pass the same to stay bitwise equal).

    Returns:
        ``(tokens int64, logprobs fp32)`` shaped like ``hidden.shape[:-1]``. ``logprobs`` is
        the log probability of each token under the full tempered distribution (before top-k /
        top-p truncation), which is what the training side computes with
        :func:`head_logprobs` — and it is computed by the same op with the same backend
        (without the target range check and its host sync), so the two are bitwise equal
        (the triton backend is batch invariant, so this holds for any batch composition on the
        training side too).

    Memory: unlike head_logprobs, sampling with top-p needs a sort over the vocabulary, so this
    materializes fp32 logits for blocks of rows (at most ``2^26`` elements, 256 MiB, per block;
    a decode batch of 64 rows × 200,064 is 51 MB). With the triton backend those logits come
    from the same kernel as head_logprobs (``STORE_LOGITS``), so the distribution sampled from
    is the one whose logprobs are returned; the torch backend samples from its fp64-rounded
    logits. The logprobs are a second, fused pass over the weight: for a memory-bound decode
    step that roughly doubles the head's time (the price of bitwise equality; fusing the
    lookup into the sampling pass would give ~1e-7 agreement instead).

    Non-finite logits: before sampling, each block's tempered logits are checked on the host
    (one sync per call for a decode batch; skipped under CUDA graph capture and
    torch.compile). A row holding NaN, ±inf or a tempered logit beyond ±1e37 raises
    ValueError: naming ``temperature`` when the untempered logits are finite (logits /
    temperature overflows), else ``hidden``/``weight`` (they hold non-finite values), on
    every backend and for greedy decoding too (argmax would silently pick the NaN).
    """
    device = _check_head_inputs(hidden, weight)
    t = _check_temperature(temperature, allow_zero=True)
    check_precision(precision)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0, got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    lead = hidden.shape[:-1]
    V, K = weight.shape
    h2 = hidden.reshape(-1, K)
    rows = h2.shape[0]
    tokens = torch.empty(rows, dtype=torch.int64, device=device)
    chosen = resolve_backend("head_sample", backend, device)
    if chosen == "triton":
        from .triton_head import head_logits_triton

        def logits_fn(h, w, temp):
            return head_logits_triton(h, w, temp, precision=precision)
    elif chosen == "cuda":
        logits_fn = _cuda_ops.head_logits_cuda
    else:
        logits_fn = torch_head.tempered_logits_fp32
    logits_temperature = t if t > 0 else 1.0
    step = torch_head.rows_per_logits_block(V)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        z = logits_fn(h2[r0:r1], weight, logits_temperature)
        if can_check_device_values(z):
            # NaN, ±inf (an all -inf row included) and logits beyond the range that the
            # logprob pass below keeps finite; a NaN compares False, so it counts as bad.
            bad = ~(z.abs().amax(dim=-1) <= _SAFE_TEMPERED_LOGIT)
            if bool(bad.any()):
                _nonfinite_logits("head_sample", bad, h2[r0:r1], weight, logits_temperature,
                                  inputs_may_be_nonfinite=False)
        tokens[r0:r1] = z.argmax(-1) if t == 0 else sample_from_logits(z, float(top_p), top_k, generator)
    # The op itself, not head_logprobs: the inputs are validated and the tokens are in [0, V) by
    # construction, so its target range check would only cost a host sync per decode step.
    lp = torch.ops.mm1.head_logprobs(h2, weight, tokens, logits_temperature, chosen, precision)[0]
    return tokens.reshape(lead), lp.reshape(lead)


def _check_cispo_args(eps_low, eps_high):
    for name, eps in (("eps_low", eps_low), ("eps_high", eps_high)):
        if eps is None:
            continue
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"{name} must be a float >= 0 or None, got {eps!r}")


@annotate("mm1.cispo_loss")
def cispo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               mask: torch.Tensor, eps_low: Optional[float] = None,
               eps_high: Optional[float] = DEFAULT_EPS_HIGH, backend: Optional[str] = None) -> torch.Tensor:
    """CISPO objective (docs/m1_math.md §6) as a loss to minimize: ``-J``, a scalar.

    ``r = exp(logprobs - old_logprobs)``, ``r_hat = clip(r, 1 - eps_low, 1 + eps_high)`` with a
    stop-gradient, ``loss = -Σ mask · r_hat · A · logprobs / Σ mask``: token-level
    normalization over all valid tokens of the batch (the paper's 1 / Σ_i |o_i|), and every
    valid token keeps its gradient ``-r_hat · A / Σ mask`` (nothing is dropped, unlike PPO).

    Args:
        logprobs: new-policy logprobs, any shape (e.g. ``[T]`` or ``[B, L]``), fp32 recommended.
        old_logprobs: rollout logprobs, same shape (no gradient).
        advantages: same shape, or broadcastable to it (e.g. ``[B, 1]`` per response).
        mask: bool (or 0/1) same shape; False = padding / prompt token, excluded everywhere.
        eps_low: the lower clip is ``1 - eps_low``; None (the paper's choice) = no lower bound.
        eps_high: the upper clip is ``1 + eps_high`` (a relative bound, not TRL's absolute
            cap); None = no upper bound. The paper tunes it and publishes no value; the
            default 0.2 is PPO's customary one — pass it explicitly.
        backend: only ``"torch"``: a few elementwise ops that torch.compile fuses; the
            kernel path is :func:`head_cispo_loss`, which fuses the head.

    Returns a 0-dim tensor in logprobs' dtype; 0 when no token is valid.
    """
    check_tensor("logprobs", logprobs, dtypes=FLOAT_DTYPES)
    device = logprobs.device
    check_tensor("old_logprobs", old_logprobs, dtypes=FLOAT_DTYPES, shape=tuple(logprobs.shape),
                 device=device)
    check_tensor("advantages", advantages, dtypes=FLOAT_DTYPES, device=device)
    try:
        broadcast = torch.broadcast_shapes(advantages.shape, logprobs.shape)
    except RuntimeError:
        broadcast = None
    # Broadcasting must not grow logprobs' shape: [B, T] advantages for [T] logprobs would count
    # every token B times against a Σ mask of T.
    if broadcast != logprobs.shape:
        raise ValueError(f"advantages of shape {list(advantages.shape)} does not broadcast to "
                         f"logprobs' {list(logprobs.shape)}")
    check_tensor("mask", mask, dtypes=(torch.bool,) + FLOAT_DTYPES + INDEX_DTYPES,
                 shape=tuple(logprobs.shape), device=device)
    _check_cispo_args(eps_low, eps_high)
    resolve_backend("cispo_loss", backend, device)
    return reference.cispo_reference(logprobs, old_logprobs.to(logprobs.dtype),
                                     advantages.to(logprobs.dtype), mask, eps_low, eps_high)


@annotate("mm1.head_cispo_loss")
def head_cispo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: Optional[torch.Tensor] = None, eps_low: Optional[float] = None,
                    eps_high: Optional[float] = DEFAULT_EPS_HIGH, temperature: float = 1.0,
                    backend: Optional[str] = None, return_head: bool = False,
                    precision: str = "default"):
    """From hidden states to the CISPO loss and its gradients, with no ``[T, V]`` tensor.

    ``loss = cispo_loss(head_logprobs(hidden, weight, targets, temperature).logprobs, ...)``:
    the head's forward keeps only per-token statistics, and its backward receives
    ``d loss / d logprob = -mask · r_hat · A / Σ mask`` and recomputes the logits block by block
    to form the gradients w.r.t. hidden and weight (fp32 accumulation, deterministic).

    Args: hidden ``[T, K]``, weight ``[V, K]``, targets ``[T]`` (-100 = ignored; such rows are
    also excluded from the loss), old_logprobs ``[T]``, advantages ``[T]`` (or broadcastable),
    mask ``[T]`` bool or None (= all non-ignored tokens); the rest as in :func:`cispo_loss`
    and :func:`head_logprobs` (``precision`` too). ``return_head=True`` returns
    ``(loss, HeadOutput)`` so the caller can log entropy and logprobs without a second pass.
    """
    out = head_logprobs(hidden, weight, targets, temperature=temperature, backend=backend,
                        precision=precision)
    valid = targets != IGNORE_INDEX
    if mask is not None:
        check_tensor("mask", mask, dtypes=(torch.bool,) + FLOAT_DTYPES + INDEX_DTYPES,
                     shape=tuple(targets.shape), device=targets.device)
        valid = valid & (mask if mask.dtype == torch.bool else mask != 0)
    loss = cispo_loss(out.logprobs, old_logprobs, advantages, valid, eps_low=eps_low,
                      eps_high=eps_high)
    return (loss, out) if return_head else loss

"""Run a transformers ``MiniMaxForCausalLM`` on this package's kernels (transformers 5.x).

    from transformers import MiniMaxForCausalLM
    from mm1_kernels.integrations.transformers import apply_mm1_kernels

    model = apply_mm1_kernels(MiniMaxForCausalLM.from_pretrained(path, dtype=torch.bfloat16))
    out = model.generate(ids, max_new_tokens=32)       # lightning prefill/decode, fused MoE, fp32 logits

or, before the model is built (like Liger's ``apply_liger_kernel_to_*``),
``apply_mm1_kernels_to_minimax()``; ``revert_mm1_kernels_to_minimax()`` undoes it.

What is replaced (each piece only when its flag is True), written against transformers
5.23's ``models/minimax/modeling_minimax.py``:

- ``lightning``: ``MiniMaxLightningAttention.forward``. The projections, SiLU, padding mask,
  norm, output gate and out_proj are transformers' own modules; the recurrence is
  :func:`mm1_kernels.lightning_attention` (a prompt, or several tokens after a cached state)
  or :func:`mm1_kernels.lightning_decode` (one token after a cached state, updating the state
  in place). The slopes are transformers' formula (``get_slope_rate``; its factor
  ``1 - i / (L - 1 + 1e-5) + 1e-5`` differs from M1's ``1 - i / (L - 1) + 1e-5`` by < 1e-6
  relative and is kept, so that the patched model computes what the unpatched one does),
  recomputed in fp32 even in a bf16 model (transformers' ``slope_rate`` buffer is cast to the
  model dtype by ``model.to(bf16)``).
- The lightning state: transformers' ``MiniMaxCache`` keeps it in the model dtype; the patch
  keeps it in fp32. The cache class is unchanged (``MiniMaxModel.forward`` insists on a
  ``MiniMaxCache`` and ``generate`` builds one): its ``linear_cache`` list holds whatever
  tensor the layer stores, and its reorder methods (beam search, ``num_return_sequences``)
  are dtype-agnostic. The patched layer stores the kernel's fp32 final state after a prefill,
  updates that fp32 tensor in place on decode, and upgrades any entry it finds in another
  dtype or layout (a cache filled by an unpatched model) with ``.float().contiguous()``,
  writing it back, before using it.
- ``moe``: ``MiniMaxTopKRouter.forward`` and ``MiniMaxExperts.forward``. Router logits are
  ``fp32(x) @ fp32(W_router)^T`` (M1's router; transformers forms them in the model dtype and
  upcasts after: identical in an fp32 model), then :func:`mm1_kernels.moe_route` (fp32
  softmax, top-k, renormalize — transformers' semantics — with ties to the lower expert index,
  which ``torch.topk`` leaves unspecified); the returned logits still feed
  ``output_router_logits`` / the aux loss. The experts are :func:`mm1_kernels.fused_moe`:
  transformers' ``gate_up_proj [E, 2I, H]`` (gate rows, then up rows) and ``down_proj
  [E, H, I]`` are exactly its ``w13`` / ``w2``, used in place without a copy. The weighted
  sum of the k experts is fp32 (transformers rounds each expert's output to the model dtype
  and adds them in it). SiLU experts only (M1's ``hidden_act``): another activation raises.
- ``fp32_head``: ``MiniMaxForCausalLM.forward``. Logits are fp32, computed in fp32 from the
  model-dtype hidden states and head weight (exact products, fp32 accumulation; no bf16
  ``[T, V]`` rounding) — by the same code the package's head uses (on a GPU the Triton head
  kernel; the torch backend elsewhere); when autograd needs them, by a differentiable
  ``linear(hidden.float(), weight.float())``. With ``labels`` the loss is transformers'
  causal-LM loss (shift, ``ignore_index``, mean over valid tokens or sum /
  ``num_items_in_batch``) computed from :func:`mm1_kernels.head_logprobs`, which never forms
  ``[T, V]`` and is differentiable. Logits in that case: like Liger's ``skip_logits``, the
  forward takes ``skip_logits=None | bool``; the default skips them (``logits=None``) when
  labels are given in training mode and returns the fp32 logits otherwise (evaluation wants
  them for metrics).

Training: the lightning and MoE ops have no backward yet. In training mode, with grad enabled
and any tensor entering one of them requiring grad, the patched layer raises
NotImplementedError naming the op that lacks a backward (the check asks the op registry, so
it lifts by itself once a backward is registered). In eval mode the forward runs, and a
``backward()`` through those ops fails in torch with "no autograd formula". The head alone
(``apply_mm1_kernels(model, lightning=False, moe=False)``) trains.

Backends: every op call uses ``backend=None`` (``MM1_BACKEND`` overrides it process-wide).
Importing this module does not import transformers; the functions import it when called.
"""
from __future__ import annotations

import types
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import sentinel_expert_map

__all__ = ["apply_mm1_kernels", "apply_mm1_kernels_to_minimax", "revert_mm1_kernels",
           "revert_mm1_kernels_to_minimax", "patched_pieces"]

_PIECES = ("lightning", "moe", "fp32_head")
_SILU = ("silu", "swish")
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- helpers
def _differentiable(op: str) -> bool:
    """Whether ``torch.ops.mm1.<op>`` has a backward registered (register_autograd)."""
    try:
        from torch._library.custom_ops import OPDEFS
        return OPDEFS[f"mm1::{op}"]._backward_fn is not None
    except Exception:  # pragma: no cover - a torch without this private table
        return False


def _refuse_training(module: torch.nn.Module, what: str, ops, tensors) -> None:
    """Raise when training would need a backward that ``ops`` do not have yet."""
    if not (module.training and torch.is_grad_enabled()):
        return
    if not any(t is not None and t.requires_grad for t in tensors):
        return
    missing = [op for op in ops if not _differentiable(op)]
    if missing:
        raise NotImplementedError(
            f"mm1_kernels: {what} runs mm1_kernels.{' / mm1_kernels.'.join(missing)}, which has no "
            f"backward yet, and this training-mode forward needs gradients through it. Run it under "
            f"torch.no_grad() (or model.eval()), freeze the parameters feeding it, or patch without "
            f"it (apply_mm1_kernels(model, {'lightning' if 'lightning' in what else 'moe'}=False)).")


def _modeling():
    try:
        from transformers.models.minimax import modeling_minimax
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("mm1_kernels.integrations.transformers needs transformers >= 5 with its "
                          "MiniMax port (transformers.models.minimax)") from e
    return modeling_minimax


def _slopes(attn: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """transformers' slope formula for this layer, fp32 ``[H]`` on ``device`` (cached per device)."""
    cache = attn.__dict__.setdefault("_mm1_slopes", {})
    s = cache.get(device)
    if s is None:
        # get_slope_rate: base ** (h + 1) * (1 - i / (L - 1 + 1e-5) + 1e-5), as [H, 1, 1].
        s = attn.get_slope_rate(device=device).to(torch.float32).reshape(-1).contiguous()
        cache[device] = s
    return s


def _fp32_state(cache, layer_idx: int) -> Optional[torch.Tensor]:
    """The layer's cached lightning state as a contiguous fp32 tensor (upgraded in the cache), or None."""
    if cache is None:
        return None
    state = cache.get_linear_cache(layer_idx)
    if not isinstance(state, torch.Tensor):  # None, or the [] placeholder of a skipped layer
        return None
    if state.dtype != torch.float32 or not state.is_contiguous():
        state = state.to(torch.float32).contiguous()
        cache.set_linear_cache(layer_idx, state)
    return state


def _check_silu(experts: torch.nn.Module) -> None:
    config = getattr(experts, "config", None)
    act = getattr(config, "hidden_act", "silu")
    if act not in _SILU:
        raise ValueError(f"mm1_kernels.fused_moe implements SiLU experts (M1's); this model's hidden_act "
                         f"is {act!r}: patch it with moe=False")


# ----------------------------------------------------------------------------- forwards
def _lightning_forward(self, hidden_states: torch.Tensor, position_embeddings=None,
                       attention_mask: Optional[torch.Tensor] = None, past_key_values=None, **kwargs):
    """``MiniMaxLightningAttention.forward`` on mk.lightning_attention / mk.lightning_decode."""
    import mm1_kernels as mk

    B, T, _ = hidden_states.shape
    H, D = self.num_attention_heads, self.head_dim
    qkv = self.act_fn(self.qkv_proj(hidden_states))
    if attention_mask is not None:  # 2D padding mask (create_recurrent_attention_mask): zero pads
        qkv = (qkv * attention_mask[:, :, None]).to(qkv.dtype)
    _refuse_training(self, "lightning attention", ("lightning_attention",), (qkv,))
    q, k, v = torch.split(qkv.reshape(B, T, H, 3 * D), D, dim=3)  # [B, T, H, D] views, unit last stride
    slopes = _slopes(self, q.device)
    state = _fp32_state(past_key_values, self.layer_idx)
    if state is not None and T == 1 and not (torch.is_grad_enabled() and qkv.requires_grad):
        # lightning_decode updates the state in place and has no backward; a token that needs
        # gradients takes the differentiable prefill from the cached state instead.
        o = mk.lightning_decode(q, k, v, slopes, state)  # row b = slot b; state updated in place
    else:
        o, state = mk.lightning_attention(q, k, v, slopes, initial_state=state, output_final_state=True)
    o = self.norm(o.reshape(B, T, H * D))
    o = torch.sigmoid(self.output_gate(hidden_states)) * o
    o = self.out_proj(o)
    if past_key_values is not None:
        past_key_values.set_linear_cache(self.layer_idx, state)
    return o, state


def _router_forward(self, hidden_states: torch.Tensor):
    """``MiniMaxTopKRouter.forward``: fp32 router logits, then mk.moe_route."""
    import mm1_kernels as mk

    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    _refuse_training(self, "the MoE router", ("moe_route",), (hidden_states, self.weight))
    router_logits = F.linear(hidden_states.to(torch.float32), self.weight.to(torch.float32))
    top_k_weights, top_k_index = mk.moe_route(router_logits, self.top_k, renormalize=True)
    return router_logits, top_k_weights, top_k_index


def _experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """``MiniMaxExperts.forward`` on mk.fused_moe (gate_up_proj = w13, down_proj = w2)."""
    import mm1_kernels as mk

    _check_silu(self)
    _refuse_training(self, "the MoE experts", ("fused_moe",),
                     (hidden_states, self.gate_up_proj, self.down_proj, top_k_weights))
    # The ids come from a top-k over E experts, so the host-synchronizing range check is
    # skipped. Under transformers' expert parallelism an expert on another rank arrives as id E
    # (its experts skip that one-hot class): the [E + 1] map sends it to -1, contributing zero.
    expert_map = sentinel_expert_map(self.gate_up_proj.shape[0], hidden_states.device, top_k_index.dtype)
    return mk.fused_moe(hidden_states, self.gate_up_proj, self.down_proj, top_k_weights, top_k_index,
                        check_ids=False, expert_map=expert_map)


def fp32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 ``hidden @ weight.T`` for ``hidden [..., K]``, ``weight [V, K]`` (any float dtype).

    Without autograd: the package's head code (the Triton head kernel where ``head_sample``
    would use it, else the torch backend's correctly rounded product), chunked over the
    vocabulary so no fp32 copy of the weight is made. With autograd: ``linear`` on fp32
    upcasts (differentiable; the upcast costs a transient fp32 copy of the weight).
    """
    import mm1_kernels as mk

    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    return mk.head_logits(hidden, weight.contiguous())


def fp32_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: Optional[torch.Tensor],
                   num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                   shift_labels: Optional[torch.Tensor] = None, **_) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` from mk.head_logprobs, without ``[T, V]`` logits.

    Shifts ``labels`` left by one (or takes ``shift_labels``), ignores ``ignore_index``, and
    returns the mean NLL over valid tokens, or the summed NLL / ``num_items_in_batch`` when
    given (NaN when no token is valid, as ``cross_entropy``'s mean is). fp32 scalar.
    """
    import mm1_kernels as mk

    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    if ignore_index != IGNORE_INDEX:
        targets = targets.masked_fill(targets == ignore_index, IGNORE_INDEX)
    K = hidden.shape[-1]
    h2 = hidden.reshape(-1, K)
    if h2.shape[0] != targets.shape[0]:
        raise ValueError(f"labels give {targets.shape[0]} targets for {h2.shape[0]} hidden positions "
                         f"(logits_to_keep with labels?)")
    if h2.dtype != weight.dtype:
        h2 = h2.to(weight.dtype)
    logprobs = mk.head_logprobs(h2, weight.contiguous(), targets).logprobs
    nll = -logprobs.sum()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(nll.device)
        return nll / num_items_in_batch
    return nll / (targets != IGNORE_INDEX).sum()


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                       inputs_embeds=None, labels=None, use_cache=None, output_router_logits=None,
                       logits_to_keep=0, skip_logits: Optional[bool] = None, **kwargs):
    """``MiniMaxForCausalLM.forward`` with the FP32 head (see the module docstring)."""
    modeling = _modeling()
    from transformers.modeling_utils import slice_logits_to_keep

    output_router_logits = (output_router_logits if output_router_logits is not None
                            else self.config.output_router_logits)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_router_logits=output_router_logits, **kwargs)
    hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    if self.lm_head.bias is not None:
        raise ValueError("mm1_kernels' fp32 head has no bias; this lm_head has one: patch with fp32_head=False")
    weight = self.lm_head.weight
    if skip_logits is None:
        skip_logits = labels is not None and self.training
    if skip_logits and labels is None:
        raise ValueError("skip_logits=True needs labels: without logits there is nothing else to return")
    logits = None if skip_logits else fp32_logits(hidden_states, weight)

    loss = None
    if labels is not None:
        loss = fp32_head_loss(hidden_states, weight, labels, **kwargs)
    aux_loss = None
    if output_router_logits:
        aux_loss = modeling.load_balancing_loss_func(outputs.router_logits, self.num_experts,
                                                     self.num_experts_per_tok, attention_mask)
        if labels is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
    return modeling.MoeCausalLMOutputWithPast(
        loss=loss, aux_loss=aux_loss, logits=logits, past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        router_logits=outputs.router_logits)


_WRAPPED_LM_FORWARD = None


def _lm_forward():
    """``_causal_lm_forward`` under transformers' ``can_return_tuple`` (``return_dict=False``)."""
    global _WRAPPED_LM_FORWARD
    if _WRAPPED_LM_FORWARD is None:
        from transformers.utils import can_return_tuple
        _WRAPPED_LM_FORWARD = can_return_tuple(_causal_lm_forward)
    return _WRAPPED_LM_FORWARD


def _replacements(modeling, lightning: bool, moe: bool, fp32_head: bool):
    """[(class, piece, forward)] for the requested pieces."""
    out = []
    if lightning:
        out.append((modeling.MiniMaxLightningAttention, "lightning", _lightning_forward))
    if moe:
        out += [(modeling.MiniMaxTopKRouter, "moe", _router_forward),
                (modeling.MiniMaxExperts, "moe", _experts_forward)]
    if fp32_head:
        out.append((modeling.MiniMaxForCausalLM, "fp32_head", _lm_forward()))
    return out


def _check_flags(**flags):
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


# ----------------------------------------------------------------------------- public API
def apply_mm1_kernels(model, lightning: bool = True, moe: bool = True, fp32_head: bool = True):
    """Patch an instantiated transformers ``MiniMaxForCausalLM`` in place; returns ``model``.

    Each chosen piece's modules get an instance ``forward`` (see the module docstring for
    what each runs and how it differs from transformers' port only in precision). Calling
    it again with other flags re-patches; :func:`revert_mm1_kernels` undoes it.
    """
    _check_flags(lightning=lightning, moe=moe, fp32_head=fp32_head)
    modeling = _modeling()
    if not isinstance(model, modeling.MiniMaxForCausalLM):
        raise TypeError(f"apply_mm1_kernels patches a transformers MiniMaxForCausalLM, got "
                        f"{type(model).__name__}")
    if moe and getattr(model.config, "hidden_act", "silu") not in _SILU:
        raise ValueError(f"mm1_kernels.fused_moe implements SiLU experts; this model's hidden_act is "
                         f"{model.config.hidden_act!r}: pass moe=False")
    if fp32_head and model.lm_head.bias is not None:
        raise ValueError("mm1_kernels' fp32 head has no bias; this lm_head has one: pass fp32_head=False")
    revert_mm1_kernels(model)
    for cls, _, forward in _replacements(modeling, lightning, moe, fp32_head):
        for module in model.modules():
            if isinstance(module, cls):
                module.forward = types.MethodType(forward, module)
    model._mm1_kernels = {"lightning": lightning, "moe": moe, "fp32_head": fp32_head}
    return model


def revert_mm1_kernels(model):
    """Undo :func:`apply_mm1_kernels` on ``model`` (a no-op on an unpatched model); returns it."""
    if getattr(model, "_mm1_kernels", None) is None:
        return model
    patched = {_lightning_forward, _router_forward, _experts_forward, _WRAPPED_LM_FORWARD}
    for module in model.modules():
        fwd = module.__dict__.get("forward")
        if isinstance(fwd, types.MethodType) and fwd.__func__ in patched:
            del module.forward
        module.__dict__.pop("_mm1_slopes", None)
    del model._mm1_kernels
    return model


_CLASS_PATCH: dict = {"flags": None, "originals": []}


def apply_mm1_kernels_to_minimax(lightning: bool = True, moe: bool = True, fp32_head: bool = True) -> None:
    """Patch transformers' MiniMax classes, so every model built afterwards runs on these kernels.

    Idempotent: calling it again with the same flags does nothing; with other flags it
    re-patches. :func:`revert_mm1_kernels_to_minimax` restores the original forwards.
    """
    _check_flags(lightning=lightning, moe=moe, fp32_head=fp32_head)
    flags = {"lightning": lightning, "moe": moe, "fp32_head": fp32_head}
    if _CLASS_PATCH["flags"] == flags:
        return
    revert_mm1_kernels_to_minimax()
    modeling = _modeling()
    for cls, _, forward in _replacements(modeling, lightning, moe, fp32_head):
        _CLASS_PATCH["originals"].append((cls, cls.__dict__["forward"]))
        cls.forward = forward
    _CLASS_PATCH["flags"] = flags


def revert_mm1_kernels_to_minimax() -> None:
    """Restore the forwards :func:`apply_mm1_kernels_to_minimax` replaced (a no-op if none)."""
    for cls, original in reversed(_CLASS_PATCH["originals"]):
        cls.forward = original
    _CLASS_PATCH["originals"].clear()
    _CLASS_PATCH["flags"] = None


def patched_pieces(model=None) -> dict:
    """Which pieces are patched: on ``model`` (instance patch), or class-wide when ``model`` is None."""
    flags = (getattr(model, "_mm1_kernels", None) if model is not None else _CLASS_PATCH["flags"])
    return dict(flags) if flags else {p: False for p in _PIECES}

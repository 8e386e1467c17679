"""MiniMax-M1 in PyTorch, exactly as docs/m1_math.md §2-§6, with every hot op from mm1_kernels.

Three ways through the same layers:
- ``forward(input_ids)``: a batch of equal-length sequences, no cache (training: differentiable
  w.r.t. every parameter, optionally with per-layer gradient checkpointing);
- ``prefill(prompts, cache)``: prompts of different lengths packed into one row (varlen
  ``cu_seqlens``), lightning states and softmax keys/values written to cache slots;
- ``decode(tokens, cache)``: one token per slot, ``lightning_decode`` on the slot states.
Prefill and decode (hence ``generate``) run under ``torch.no_grad``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

import mm1_kernels as mk
from mm1_kernels import nvtx_range

from .backends import check_backend, op_backend
from .cache import MiniMaxM1Cache
from .checks import as_id_tensor, as_int, prompt_list, slot_list, token_ids
from .config import MiniMaxM1Config
from .consistent import activation, linear, rms_norm_consistent, softmax_attention
from .generation import generate as _generate


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, consistent: bool = False) -> torch.Tensor:
    """M1's RMSNorm: normalize in fp32, round to x's dtype, then scale. ``consistent``: each
    row reduced in a fixed order (``consistent.rms_norm_consistent``)."""
    if consistent:
        return rms_norm_consistent(x, weight, eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _fill_normal(t: torch.Tensor, std: float, mean: float, generator: torch.Generator) -> None:
    """``t`` <- N(mean, std²) drawn in fp32 by ``generator``; a 3-D (expert) stack one expert at a
    time, so no fp32 copy of a whole stack exists."""
    if t.dim() == 3:
        for e in range(t.shape[0]):
            _fill_normal(t[e], std, mean, generator)
        return
    t.copy_((torch.randn(t.shape, generator=generator, device=t.device) * std + mean).to(t.dtype))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, consistent: bool = False):
        return rms_norm(x, self.weight, self.eps, consistent)


def fp32_logits(hidden: torch.Tensor, weight: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """The FP32 head for every row (``mk.head_logits``): fp32 ``hidden @ weight^T``, the logits
    the head's sampling and logprob paths compute, with no fp32 copy of the weight."""
    return mk.head_logits(hidden, weight, backend=backend)


@dataclass
class StepInfo:
    """What the layers need to know about the tokens of one call (built once per call)."""
    mode: str                                   # "full" | "prefill" | "decode"
    positions: torch.Tensor                     # absolute position of each token, shaped like ids
    backend: Optional[str] = None
    cache: Optional[MiniMaxM1Cache] = None
    slots: Optional[torch.Tensor] = None        # [N] int32, slot of each sequence / decode row
    cu_seqlens: Optional[torch.Tensor] = None   # [N+1] int32 (prefill)
    tok_slot: Optional[torch.Tensor] = None     # [n_tok] long: cache slot of each token
    tok_pos: Optional[torch.Tensor] = None      # [n_tok] long: its position
    pad_gather: Optional[torch.Tensor] = None   # [N, Tq] long: packed token index per (seq, j)
    pad_pos: Optional[torch.Tensor] = None      # [N, Tq] long: query position per (seq, j)
    unpad: Optional[torch.Tensor] = None        # [n_tok] long: index of each token in [N*Tq]
    kv_len: int = 0                             # cache positions the softmax layers attend over
    consistent: bool = False                    # consistent mode (see MiniMaxM1ForCausalLM)

    def backend_for(self, op: str) -> Optional[str]:
        return op_backend(op, self.backend)


class LightningAttention(nn.Module):
    """qkv -> silu -> per-head [q|k|v] split -> lightning -> RMSNorm(H*D, 1e-6) * sigmoid(gate) -> out."""

    def __init__(self, config: MiniMaxM1Config, layer_idx: int):
        super().__init__()
        H, D = config.num_attention_heads, config.head_dim
        self.layer_idx, self.num_heads, self.head_dim = layer_idx, H, D
        self.num_layers = config.num_hidden_layers
        # Tensor parallel: this rank's heads are [head_offset, head_offset + num_heads) of H.
        self.total_heads, self.head_offset = H, 0
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * H * D, bias=False)
        self.output_gate = nn.Linear(config.hidden_size, H * D, bias=False)
        self.out_proj = nn.Linear(H * D, config.hidden_size, bias=False)
        self.norm = RMSNorm(H * D, config.lightning_norm_eps)
        self.register_buffer("slopes", torch.empty(H, dtype=torch.float32), persistent=False)
        self.reset_buffers()

    def _apply(self, fn, recurse=True):
        # .to(bf16) must not round the decay rates: they stay fp32, recomputed exactly.
        super()._apply(fn, recurse)
        if self.slopes.dtype != torch.float32:
            self.slopes = torch.empty(self.num_heads, dtype=torch.float32, device=self.slopes.device)
            self.reset_buffers()
        return self

    def reset_buffers(self):
        if self.slopes.device.type != "meta":
            slopes = mk.lightning_slopes(self.total_heads, self.layer_idx, self.num_layers)
            self.slopes.copy_(slopes[self.head_offset:self.head_offset + self.num_heads])

    def forward(self, x: torch.Tensor, step: StepInfo) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        # In consistent mode projections, silu, sigmoid and the norm take model/consistent.py's
        # fixed-order forms (the default mode's fast paths otherwise).
        qkv = activation(F.silu, linear(x, self.qkv_proj, step), step).view(B, T, H, 3 * D)
        q, k, v = qkv.split(D, dim=-1)  # views; the kernels need unit stride only in the last dim
        if step.consistent and step.mode != "full":
            o = self._consistent_step(q, k, v, step)
        elif step.mode == "decode":
            o = mk.lightning_decode(q, k, v, self.slopes, step.cache.state(self.layer_idx),
                                    step.slots, backend=step.backend_for("lightning_decode"))
        elif step.mode == "prefill":
            # Each sequence starts from its slot's state (zeroed for a fresh one by prefill())
            # and its final state is written back in place: no gather/scatter of [N, H, D, D].
            o, _ = mk.lightning_attention(q, k, v, self.slopes, cu_seqlens=step.cu_seqlens,
                                          state_cache=step.cache.state(self.layer_idx), slot_ids=step.slots,
                                          backend=step.backend_for("lightning_attention"))
        else:
            # Consistent mode: the single pass per sequence that the cache step reproduces.
            o, _ = mk.lightning_attention(q, k, v, self.slopes, backend=step.backend_for("lightning_attention"),
                                          consistent=step.consistent)
        gate = activation(torch.sigmoid, linear(x, self.output_gate, step), step)
        y = self.norm(o.reshape(B, T, H * D), step.consistent) * gate
        return linear(y, self.out_proj, step)

    def _consistent_step(self, q, k, v, step: StepInfo) -> torch.Tensor:
        """Prefill or decode in consistent mode (docs/m1_math.md §3.6): the slot keeps the state at
        the last chunk boundary and the partial chunk's k, v; each sequence's new tokens get
        bitwise the outputs of the full-sequence forward."""
        cache = step.cache
        keys, values = cache.partial_chunk(self.layer_idx)
        # Tokens each slot held before this call: the position of each sequence's first new token.
        if step.mode == "decode":
            cached, cu = step.positions[:, 0], None
        else:
            cached, cu = step.positions[0, step.cu_seqlens[:-1].long()], step.cu_seqlens
        # The model built slots, offsets and positions itself and checked them on the host.
        return mk.lightning_chunk_cache_step(q, k, v, self.slopes, cache.state(self.layer_idx), keys, values,
                                             step.slots, cached, cu_seqlens=cu, check_ids=False,
                                             backend=step.backend_for("lightning_chunk_cache_step"))


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half on the first ``rotary_dim`` dims of each head; the rest pass through.

    x ``[..., heads, D]``; cos, sin ``[..., rotary_dim]`` fp32 (broadcast over heads).
    """
    rd = cos.shape[-1]
    xr = x[..., :rd].float()
    x1, x2 = xr[..., :rd // 2], xr[..., rd // 2:]
    rot = torch.cat((-x2, x1), dim=-1)
    out = xr * cos[..., None, :] + rot * sin[..., None, :]
    return torch.cat((out.to(x.dtype), x[..., rd:]), dim=-1)


class SoftmaxAttention(nn.Module):
    """GQA causal softmax attention with partial NeoX RoPE; torch SDPA."""

    def __init__(self, config: MiniMaxM1Config, layer_idx: int):
        super().__init__()
        H, KVH, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim = layer_idx, H, KVH, D
        self.rotary_dim, self.rope_theta = config.rotary_dim, config.rope_theta
        self.q_proj = nn.Linear(config.hidden_size, H * D, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, KVH * D, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, KVH * D, bias=False)
        self.o_proj = nn.Linear(H * D, config.hidden_size, bias=False)
        self.register_buffer("inv_freq", torch.empty(self.rotary_dim // 2, dtype=torch.float32),
                             persistent=False)
        self.reset_buffers()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # RoPE frequencies stay fp32, like the slopes
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = torch.empty(self.rotary_dim // 2, dtype=torch.float32, device=self.inv_freq.device)
            self.reset_buffers()
        return self

    def reset_buffers(self):
        if self.inv_freq.device.type != "meta":
            j = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64)
            self.inv_freq.copy_(1.0 / (self.rope_theta ** (j / self.rotary_dim)))

    def forward(self, x: torch.Tensor, step: StepInfo) -> torch.Tensor:
        B, T, _ = x.shape
        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = linear(x, self.q_proj, step).view(B, T, H, D)
        k = linear(x, self.k_proj, step).view(B, T, KVH, D)
        v = linear(x, self.v_proj, step).view(B, T, KVH, D)
        angles = step.positions.float()[..., None] * self.inv_freq       # [B, T, rd/2]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = activation(torch.cos, angles, step), activation(torch.sin, angles, step)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        scale = 1.0 / math.sqrt(D)
        if step.consistent and step.mode == "full":  # one attention function for every mode
            o = softmax_attention(q, k, v, step.positions, scale)
            return linear(o.reshape(B, T, H * D), self.o_proj, step)
        if step.mode == "full":
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, scale=scale, enable_gqa=True)
            return self.o_proj(o.transpose(1, 2).reshape(B, T, H * D))
        # Cached path (prefill and decode alike): write the new keys/values into their slots,
        # then each sequence's queries attend over its slot up to its own position.
        keys, values = step.cache.kv(self.layer_idx)
        keys[step.tok_slot, step.tok_pos] = k.reshape(-1, KVH, D).to(keys.dtype)
        values[step.tok_slot, step.tok_pos] = v.reshape(-1, KVH, D).to(values.dtype)
        slots = step.slots.long()
        kc = keys[slots, :step.kv_len].transpose(1, 2).to(q.dtype)      # [N, KVH, L, D]
        vc = values[slots, :step.kv_len].transpose(1, 2).to(q.dtype)
        qp = q.reshape(-1, H, D)[step.pad_gather]                        # [N, Tq, H, D]
        if step.consistent:
            o = softmax_attention(qp, keys[slots, :step.kv_len], values[slots, :step.kv_len], step.pad_pos, scale)
            o = o.reshape(-1, H * D)[step.unpad]
            return linear(o.view(B, T, H * D), self.o_proj, step)
        kpos = torch.arange(step.kv_len, device=x.device)
        mask = (kpos[None, None, :] <= step.pad_pos[..., None])[:, None]  # [N, 1, Tq, L]
        o = F.scaled_dot_product_attention(qp.transpose(1, 2), kc, vc, attn_mask=mask, scale=scale,
                                           enable_gqa=True)
        o = o.transpose(1, 2).reshape(-1, H * D)[step.unpad]             # [n_tok, H*D]
        return self.o_proj(o.view(B, T, H * D))


class SparseMoE(nn.Module):
    """fp32 router logits -> mk.moe_route (softmax, top-k, renormalize) -> mk.fused_moe.

    Experts are stored stacked: ``w13 [E, 2I, hidden]`` (w1 = gate rows, then w3 = up rows) and
    ``w2 [E, hidden, I]``; optionally int8 with fp32 per-output-channel scales.
    """

    def __init__(self, config: MiniMaxM1Config):
        super().__init__()
        E, I, Hd = config.num_local_experts, config.intermediate_size, config.hidden_size
        self.num_experts, self.top_k, self.intermediate_size = E, config.num_experts_per_tok, I
        self.gate = nn.Linear(Hd, E, bias=False)
        self.w13 = nn.Parameter(torch.empty(E, 2 * I, Hd))
        self.w2 = nn.Parameter(torch.empty(E, Hd, I))
        self.register_buffer("w13_scale", None)
        self.register_buffer("w2_scale", None)
        # Tensor/expert parallel (model/parallel.py): the group, and the global -> local expert map.
        self.tp = None
        self.register_buffer("expert_map", None, persistent=False)

    def _apply(self, fn, recurse=True):
        # The router runs in fp32 (M1 may store it in fp32): a dtype cast leaves it fp32 and
        # unrounded, so a cast's result is replaced by the original weight, only moved (a meta
        # weight has no values to keep: to_empty's result is just widened).
        # (_apply may swap the parameter's data in place: keep an alias of the original storage.)
        router, requires_grad = self.gate.weight.detach(), self.gate.weight.requires_grad
        super()._apply(fn, recurse)
        cast = self.gate.weight
        if cast.dtype != torch.float32:
            source = cast.detach() if router.is_meta else router
            self.gate.weight = nn.Parameter(source.to(device=cast.device, dtype=torch.float32),
                                            requires_grad=requires_grad)
        return self

    @property
    def quantized(self) -> bool:
        return self.w13_scale is not None

    def make_int8(self, device=None):
        """Switch to int8 storage (uninitialized; filled by the loader or :meth:`quantize_`)."""
        E, I2, Hd = self.w13.shape
        device = device or self.w13.device
        self.w13 = nn.Parameter(torch.empty(E, I2, Hd, dtype=torch.int8, device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(E, Hd, I2 // 2, dtype=torch.int8, device=device),
                               requires_grad=False)
        self.w13_scale = torch.empty(E, I2, dtype=torch.float32, device=device)
        self.w2_scale = torch.empty(E, Hd, dtype=torch.float32, device=device)

    @torch.no_grad()
    def quantize_(self):
        if self.quantized:
            return
        quantize = mk.quantize_moe_weights if self.tp is None else self.tp.quantize_experts
        w13_q, s13, w2_q, s2 = quantize(self.w13.data, self.w2.data)
        self.w13 = nn.Parameter(w13_q, requires_grad=False)
        self.w2 = nn.Parameter(w2_q, requires_grad=False)
        self.w13_scale, self.w2_scale = s13, s2

    @torch.no_grad()
    def refill_int8_(self, std: float, generator: torch.Generator):
        """int8 experts re-drawn: N(0, std²) float weights, quantized one expert at a time."""
        E, I2, Hd = self.w13.shape
        for e in range(E):
            w13 = torch.randn(1, I2, Hd, generator=generator, device=self.w13.device) * std
            w2 = torch.randn(1, Hd, I2 // 2, generator=generator, device=self.w2.device) * std
            q13, s13, q2, s2 = mk.quantize_moe_weights(w13, w2)
            self.w13[e].copy_(q13[0])
            self.w13_scale[e].copy_(s13[0])
            self.w2[e].copy_(q2[0])
            self.w2_scale[e].copy_(s2[0])

    def dequantized(self):
        """``(w13, w2)`` in float (the stored weights, or int8 times scales)."""
        if not self.quantized:
            return self.w13, self.w2
        return (self.w13.float() * self.w13_scale[..., None], self.w2.float() * self.w2_scale[..., None])

    def forward(self, y: torch.Tensor, step: StepInfo) -> torch.Tensor:
        shape = y.shape
        y2 = y.reshape(-1, shape[-1])
        if step.consistent:
            logits = mk.invariant_linear(y2.float(), self.gate.weight.float(),
                                         backend=step.backend_for("invariant_linear"))
        else:
            logits = F.linear(y2.float(), self.gate.weight.float())      # router in fp32 (weight kept fp32)
        topk_w, topk_ids = mk.moe_route(logits, top_k=self.top_k, renormalize=True,
                                        backend=step.backend_for("moe_route"))
        x = y2
        if self.tp is not None:  # this rank's experts (or expert slices): gradients are summed
            x, topk_w = self.tp.copy_in(y2, "moe_in"), self.tp.copy_in(topk_w, "moe_weights")
        # The ids come from moe_route, so they are in range: skip the host-side check (a GPU
        # sync per layer).
        out = mk.fused_moe(x, self.w13, self.w2, topk_w, topk_ids, w13_scale=self.w13_scale,
                           w2_scale=self.w2_scale, backend=step.backend_for("fused_moe"),
                           check_ids=False, expert_map=self.expert_map, consistent=step.consistent)
        if self.tp is not None:  # partial sums of every rank's experts
            out = self.tp.reduce(out, "moe")
        return out.view(shape)


class DecoderLayer(nn.Module):
    """Postnorm: the residual is the NORMED input, scaled by alpha; the branch by beta."""

    def __init__(self, config: MiniMaxM1Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_lightning = config.is_lightning(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_lightning:
            self.self_attn = LightningAttention(config, layer_idx)
            self.attn_alpha = config.layernorm_linear_attention_alpha
            self.attn_beta = config.layernorm_linear_attention_beta
        else:
            self.self_attn = SoftmaxAttention(config, layer_idx)
            self.attn_alpha = config.layernorm_full_attention_alpha
            self.attn_beta = config.layernorm_full_attention_beta
        self.mlp_alpha, self.mlp_beta = config.layernorm_mlp_alpha, config.layernorm_mlp_beta
        self.block_sparse_moe = SparseMoE(config)
        self.postnorm = config.postnorm

    def forward(self, h: torch.Tensor, step: StepInfo) -> torch.Tensor:
        kind = "lightning" if self.is_lightning else "softmax"
        x = self.input_layernorm(h, step.consistent)
        with nvtx_range(f"mm1.layer{self.layer_idx}.{kind}"):
            a = self.self_attn(x, step)
        h = self.attn_alpha * (x if self.postnorm else h) + self.attn_beta * a
        y = self.post_attention_layernorm(h, step.consistent)
        with nvtx_range(f"mm1.layer{self.layer_idx}.moe"):
            m = self.block_sparse_moe(y, step)
        return self.mlp_alpha * (y if self.postnorm else h) + self.mlp_beta * m


class MiniMaxM1Model(nn.Module):
    def __init__(self, config: MiniMaxM1Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in config.layer_ids)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False  # see MiniMaxM1ForCausalLM.gradient_checkpointing_enable
        self.checkpoint_kwargs: dict = {}

    def forward(self, input_ids: torch.Tensor, step: StepInfo) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        # Only the cache-free pass: prefill/decode write the cache, so recomputing them would
        # write it twice (and they run under no_grad anyway).
        recompute = self.gradient_checkpointing and step.mode == "full" and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                h = activation_checkpoint(layer, h, step, **self.checkpoint_kwargs)
            else:
                h = layer(h, step)
        return self.norm(h, step.consistent)


@dataclass
class CausalLMOutput:
    logits: Optional[torch.Tensor]   # fp32
    hidden_states: torch.Tensor      # after the final norm, model dtype


class MiniMaxM1ForCausalLM(nn.Module):
    """MiniMax-M1 (or a slice of its layers) with an FP32 head.

    ``backend`` (None | "torch" | "triton" | "cuda") goes to every mm1_kernels op; an op that
    lacks that backend uses its automatic choice (see :func:`mm1_model.backends.op_backend`).
    An unknown name is refused here and whenever ``model.backend`` is set.

    Weights of a model built from a config alone are initialized deterministically
    (:meth:`init_weights_` with ``seed=0``: every linear, expert and embedding weight drawn from
    N(0, ``config.initializer_range``²) by a generator seeded on the weights' device, every norm
    weight 1), so two models built from the same config on the same device are bitwise equal and
    none holds uninitialized memory. On the ``meta`` device there is nothing to initialize:
    ``to_empty`` then gives uninitialized storage, as for any ``nn.Module``; fill it with
    :meth:`init_weights_` (or :meth:`init_random_`) or load a checkpoint (:meth:`from_pretrained`
    builds on meta and fills every tensor from the files).
    """

    def __init__(self, config: MiniMaxM1Config, backend: Optional[str] = None,
                 tensor_parallel_size: int = 1, expert_parallel: bool = False, process_group=None,
                 consistent: bool = False):
        super().__init__()
        if not isinstance(config, MiniMaxM1Config):
            raise TypeError(f"config must be a MiniMaxM1Config, got {type(config).__name__}")
        config.validate()  # fields may have changed since the config was made
        self.config = config
        self.backend = backend
        self.consistent = consistent
        # Tensor/expert parallel (model/parallel.py) inside an initialized process group; size 1
        # is the unsharded model.
        tp = None
        if as_int(tensor_parallel_size, "tensor_parallel_size") < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if expert_parallel and tensor_parallel_size == 1:
            raise ValueError("expert_parallel=True needs tensor_parallel_size > 1 (the experts are spread "
                             "over the tensor-parallel ranks)")
        if tensor_parallel_size != 1 and consistent:
            raise ValueError("consistent=True needs tensor_parallel_size=1: the tensor-parallel all-reduces "
                             "are not part of consistent mode's fixed arithmetic yet")
        if tensor_parallel_size != 1:
            from .parallel import TensorParallel
            tp = TensorParallel.from_process_group(config, tensor_parallel_size, process_group, expert_parallel)
        self.tp = None
        self.model = MiniMaxM1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if not self.lm_head.weight.is_meta:
            self.init_weights_(seed=0)
        if tp is not None:  # this rank keeps its slices of the full model (of its init, off meta)
            from .parallel import shard_model_
            shard_model_(self, tp)

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        self._backend = check_backend(value, "backend")

    @property
    def consistent(self) -> bool:
        """Consistent mode: every token's logprob is bitwise the same from ``generate`` and from
        the training forward (``logprobs``), whatever else is in the batch."""
        return self._consistent

    @consistent.setter
    def consistent(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"consistent must be a bool, got {type(value).__name__}")
        if value and getattr(self, "tp", None) is not None:
            raise ValueError("consistent=True needs tensor_parallel_size=1: the tensor-parallel all-reduces "
                             "are not part of consistent mode's fixed arithmetic yet")
        self._consistent = value

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype = torch.bfloat16, layers=None,
                        device=None, backend: Optional[str] = None, quantize_experts: bool = False,
                        progress: bool = False, tensor_parallel_size: int = 1, expert_parallel: bool = False,
                        process_group=None, consistent: bool = False) -> MiniMaxM1ForCausalLM:
        """Load M1's checkpoint format (see ``checkpoint.load_pretrained``).

        ``device=None``: ``"cuda"`` when torch sees a GPU, else ``"cpu"``.
        ``tensor_parallel_size=W`` (inside an initialized process group of W ranks, default the
        default group): each rank reads and holds only its slices (see ``mm1_model.parallel``);
        ``expert_parallel=True`` places whole experts on ranks instead of slicing each one.
        ``consistent=True``: consistent mode (see :attr:`consistent`).
        """
        from .checkpoint import load_pretrained
        if not isinstance(consistent, bool):
            raise TypeError(f"consistent must be a bool, got {type(consistent).__name__}")
        model = load_pretrained(cls, path, dtype=dtype, layers=layers, device=device, backend=backend,
                                quantize_experts=quantize_experts, progress=progress,
                                tensor_parallel_size=tensor_parallel_size, expert_parallel=expert_parallel,
                                process_group=process_group)
        model.consistent = consistent
        return model

    def save_pretrained(self, path: str, max_shard_size: int = 5 * 2**30, progress: bool = False) -> None:
        from .checkpoint import save_pretrained
        save_pretrained(self, path, max_shard_size=max_shard_size, progress=progress)

    def reset_buffers(self):
        """Recompute slopes and RoPE frequencies (after ``to_empty`` from the meta device)."""
        for m in self.modules():
            if isinstance(m, (LightningAttention, SoftmaxAttention)):
                m.reset_buffers()
        if self.tp is not None:
            from .parallel import reset_buffers_
            reset_buffers_(self)
        return self

    @torch.no_grad()
    def init_weights_(self, seed: int = 0):
        """transformers-style init: linear, expert and embedding weights ~ N(0, initializer_range²),
        norm weights 1; drawn by a generator seeded with ``seed`` on the weights' device (so the
        same on every run there). The constructor calls it with ``seed=0``. int8 experts are
        re-quantized from fresh float draws."""
        seed = as_int(seed, "seed")
        std = self.config.initializer_range
        g = torch.Generator(device=self.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if p.is_meta:
                raise ValueError("the model is on the meta device: move it with to_empty(device=...) first")
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif p.is_floating_point():
                _fill_normal(p, std, 0.0, g)
        for m in self.modules():
            if isinstance(m, SparseMoE) and m.quantized:
                m.refill_int8_(std, g)
        return self

    @torch.no_grad()
    def init_random_(self, seed: int = 0):
        """Random weights with O(1) activations (std 1/sqrt(fan_in)), for tests and demos."""
        g = torch.Generator(device=self.device).manual_seed(as_int(seed, "seed"))  # where the weights live

        def fill(t, std, mean=0.0):
            _fill_normal(t, std, mean, g)

        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                fill(p, 0.1, 1.0)
            elif name.endswith("embed_tokens.weight"):
                fill(p, 1.0)
            elif name == "lm_head.weight":
                fill(p, 2.0 / math.sqrt(p.shape[-1]))
            else:
                fill(p, 1.0 / math.sqrt(p.shape[-1]))
        return self

    def quantize_experts_(self):
        for m in self.modules():
            if isinstance(m, SparseMoE):
                m.quantize_()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self, num_slots: int, max_len: int) -> MiniMaxM1Cache:
        """A cache of ``num_slots`` sequences of up to ``max_len`` tokens each, on the model's device."""
        return MiniMaxM1Cache(self.config, num_slots, max_len, device=self.device, dtype=self.dtype,
                              consistent=self.consistent, **self._cache_heads())

    def _cache_heads(self) -> dict:
        """The heads this rank's cache holds (all of them without tensor parallelism)."""
        if self.tp is None:
            return {}
        (h0, h1), (k0, k1) = self.tp.heads, self.tp.kv_heads
        return {"num_heads": h1 - h0, "num_kv_heads": k1 - k0}

    # ---------------------------------------------------------------- training
    supports_gradient_checkpointing = True

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None):
        """Recompute each decoder layer in the backward instead of keeping its activations
        (transformers' API): only the layer inputs ``[B, T, hidden]`` are kept, and the forward
        runs twice. Gradients are identical (every op is deterministic).

        ``gradient_checkpointing_kwargs`` go to ``torch.utils.checkpoint.checkpoint`` (default
        ``use_reentrant=False``, which needs no input that requires grad). Applies to the
        cache-free ``forward`` (hence :meth:`logprobs` and losses built on it) whenever autograd
        records it, in train or eval mode alike (M1 has no dropout); prefill/decode never.
        """
        kwargs = dict(gradient_checkpointing_kwargs or {})
        kwargs.setdefault("use_reentrant", False)
        self.model.checkpoint_kwargs = kwargs
        self.model.gradient_checkpointing = True
        return self

    def gradient_checkpointing_disable(self):
        self.model.gradient_checkpointing = False
        return self

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    # ---------------------------------------------------------------- head
    @property
    def head_ops(self):
        """The FP32 head's ops (``head_logits``, ``head_logprobs``, ``head_sample``): mm1_kernels',
        or with tensor parallelism their vocabulary-parallel versions (``mm1_model.parallel``)."""
        return mk if self.tp is None else self.tp

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.tp is not None:  # every rank's vocabulary shard, all-gathered
            return self.tp.head_logits(hidden, self.lm_head.weight, backend=op_backend("head_logits", self.backend))
        return fp32_logits(hidden, self.lm_head.weight, op_backend("head_logits", self.backend))

    def logprobs(self, input_ids: torch.Tensor, temperature: float = 1.0):
        """Per-token logprobs of ``input_ids[:, 1:]`` through mk.head_logprobs (no [T, V] tensor);
        differentiable, like :meth:`forward`."""
        input_ids = self._ids(input_ids, "input_ids", ndim=2)
        hidden = self(input_ids, return_logits=False, check_ids=False).hidden_states
        B, T, Hd = hidden.shape
        targets = torch.cat([input_ids[:, 1:], input_ids.new_full((B, 1), -100)], 1).reshape(-1)
        out = self.head_ops.head_logprobs(hidden.reshape(-1, Hd), self.lm_head.weight, targets,
                                          temperature=temperature,
                                          backend=op_backend("head_logprobs", self.backend))
        return out.logprobs.view(B, T)[:, :-1]

    # ---------------------------------------------------------------- forward passes
    def _ids(self, ids, name: str, ndim: int, check: bool = True) -> torch.Tensor:
        """Checked int64 token ids on the model's device (see ``mm1_model.checks``)."""
        return token_ids(ids, self.config.vocab_size, name, ndim=ndim, check=check).to(self.device)

    def _check_cache(self, cache) -> None:
        if not isinstance(cache, MiniMaxM1Cache):
            raise TypeError(f"cache must be a MiniMaxM1Cache (model.new_cache), got {type(cache).__name__}")
        # The two modes keep different states in a slot (consistent: at the chunk boundary).
        cache.check_fits(self.config, self.device, consistent=self.consistent, **self._cache_heads())

    def forward(self, input_ids: torch.Tensor, return_logits: bool = True,
                check_ids: bool = True) -> CausalLMOutput:
        """Equal-length batch ``[B, T]`` of int token ids, no cache; logits fp32 ``[B, T, V]``.

        The training path: logits and hidden states are differentiable w.r.t. every parameter
        (int8 experts excepted: frozen), on every backend; see :meth:`gradient_checkpointing_enable`.

        Ids must be in ``[0, vocab_size)``; checking reads two numbers back from the device (one
        sync per call); ``check_ids=False`` skips that when the caller guarantees the range.
        """
        input_ids = self._ids(input_ids, "input_ids", ndim=2, check=check_ids)
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device).expand(B, T)
        with nvtx_range("mm1.forward"):
            hidden = self.model(input_ids, StepInfo("full", pos, backend=self.backend, consistent=self.consistent))
            logits = self.logits_from_hidden(hidden) if return_logits else None
        return CausalLMOutput(logits, hidden)

    @torch.no_grad()
    def prefill(self, prompts: Sequence, cache: MiniMaxM1Cache, slot_ids=None,
                all_logits: bool = False, return_logits: bool = True, check_ids: bool = True) -> CausalLMOutput:
        """Varlen prefill: N prompts of different lengths in one packed pass.

        ``prompts``: a non-empty list of non-empty 1-D int token sequences (or an ``[N, T]``
        tensor); ``slot_ids``: N distinct slots of ``cache`` (default 0..N-1). A slot with cached
        tokens continues its sequence (chunked prefill); a slot whose length is 0 starts fresh.
        Returns fp32 logits of each prompt's last token ``[N, V]`` (or of every packed token
        ``[sum(len), V]`` with ``all_logits``; None without ``return_logits``) and the matching
        hidden states. ``check_ids=False`` skips the vocabulary range check (see :meth:`forward`).
        """
        dev = self.device
        self._check_cache(cache)
        seqs = prompt_list(prompts, self.config.vocab_size, "prompts", check=check_ids)
        n = len(seqs)
        lens = [int(s.numel()) for s in seqs]
        slots = slot_list(slot_ids, n, cache.num_slots, "prompts")
        prev = [cache.lengths[s] for s in slots]
        totals = [p + l for p, l in zip(prev, lens)]
        if max(totals) > cache.max_len:
            i = totals.index(max(totals))
            raise ValueError(f"cache too short: prompt {i} needs {totals[i]} positions in slot {slots[i]} "
                             f"({prev[i]} cached + {lens[i]} new), the cache's max_len is {cache.max_len}")
        fresh = [s for s, p in zip(slots, prev) if p == 0]
        if fresh:
            cache.lightning_states[:, fresh] = 0
        ids = torch.cat([s.to(dev) for s in seqs])[None]                                   # [1, Ttot]
        lens_t = torch.tensor(lens, device=dev)
        cu = torch.zeros(n + 1, dtype=torch.int32, device=dev)
        cu[1:] = torch.cumsum(lens_t, 0)
        seq_of_tok = torch.repeat_interleave(torch.arange(n, device=dev), lens_t)
        local = torch.arange(ids.shape[1], device=dev) - cu[:-1].long()[seq_of_tok]
        prev_t = torch.tensor(prev, device=dev)
        slots_t = torch.tensor(slots, dtype=torch.int32, device=dev)
        tq = max(lens)
        j = torch.arange(tq, device=dev)
        pad_gather = torch.minimum(cu[:-1].long()[:, None] + j, cu[1:].long()[:, None] - 1)
        pad_pos = prev_t[:, None] + torch.minimum(j[None], lens_t[:, None] - 1)
        step = StepInfo("prefill", (prev_t[seq_of_tok] + local)[None], backend=self.backend, cache=cache,
                        slots=slots_t, cu_seqlens=cu,
                        tok_slot=slots_t.long()[seq_of_tok], tok_pos=prev_t[seq_of_tok] + local,
                        pad_gather=pad_gather, pad_pos=pad_pos, unpad=seq_of_tok * tq + local,
                        kv_len=max(totals), consistent=self.consistent)
        with nvtx_range("mm1.prefill"):
            hidden = self.model(ids, step)[0]                                 # [Ttot, hidden]
            if not all_logits:
                hidden = hidden[cu[1:].long() - 1]
            logits = self.logits_from_hidden(hidden) if return_logits else None
        for s, t in zip(slots, totals):
            cache.lengths[s] = t
        return CausalLMOutput(logits, hidden)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, cache: MiniMaxM1Cache, slot_ids=None,
               return_logits: bool = True, check_ids: bool = True) -> CausalLMOutput:
        """One int token for each of B slots (``tokens [B]``, or ``[B, 1]``); returns fp32 logits
        ``[B, V]``. ``slot_ids``: B distinct prefilled slots of ``cache`` (default 0..B-1).
        ``check_ids=False`` skips the vocabulary range check (see :meth:`forward`)."""
        dev = self.device
        self._check_cache(cache)
        tokens = as_id_tensor(tokens, "tokens")
        if tokens.dim() == 2 and tokens.shape[1] == 1:
            tokens = tokens[:, 0]
        tokens = self._ids(tokens, "tokens", ndim=1, check=check_ids)
        B = tokens.numel()
        slots = slot_list(slot_ids, B, cache.num_slots, "tokens")
        pos = [cache.lengths[s] for s in slots]
        if min(pos) == 0:
            s = slots[pos.index(0)]
            raise ValueError(f"slot_ids: decode needs prefilled slots, slot {s} holds no tokens; "
                             f"prefill it first")
        if max(pos) >= cache.max_len:
            s = slots[pos.index(max(pos))]
            raise ValueError(f"cache too short: slot {s} is full (max_len {cache.max_len} positions)")
        pos_t = torch.tensor(pos, device=dev)
        slots_t = torch.tensor(slots, dtype=torch.int32, device=dev)
        ar = torch.arange(B, device=dev)
        step = StepInfo("decode", pos_t[:, None], backend=self.backend, cache=cache, slots=slots_t,
                        tok_slot=slots_t.long(), tok_pos=pos_t, pad_gather=ar[:, None],
                        pad_pos=pos_t[:, None], unpad=ar, kv_len=max(pos) + 1, consistent=self.consistent)
        with nvtx_range("mm1.decode"):
            hidden = self.model(tokens[:, None], step)[:, 0]
            logits = self.logits_from_hidden(hidden) if return_logits else None
        for s in slots:
            cache.lengths[s] += 1
        return CausalLMOutput(logits, hidden)

    def generate(self, input_ids, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, stop_tokens=None, callback=None, generator=None, pad_token_id=None,
                 return_logprobs: bool = False):
        """Greedy (``temperature=0``) or sampled generation; see ``mm1_model.generation.generate``."""
        return _generate(self, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        top_k=top_k, stop_tokens=stop_tokens, callback=callback, generator=generator,
                        pad_token_id=pad_token_id, return_logprobs=return_logprobs)


def count_parameters(config: MiniMaxM1Config):
    """(total, active per token without embedding and head), from a model built on meta."""
    with torch.device("meta"):
        model = MiniMaxM1ForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    active = 0
    for name, p in model.model.layers.named_parameters():
        n = p.numel()
        if name.endswith(".w13") or name.endswith(".w2"):
            n = n * config.num_experts_per_tok // config.num_local_experts
        active += n
    return total, active

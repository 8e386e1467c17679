"""The head's ``cuda`` backend: glue around the CUDA extension's head ops, and their fakes.

``csrc/torch_bindings.cpp`` defines (CUDA kernels only; ``csrc/head/``):

    head_forward_cuda(Tensor hidden, Tensor weight, Tensor targets, float temperature,
                      bool store_logits) -> (Tensor, Tensor, Tensor, Tensor)
        hidden [T, K], weight [V, K] (same dtype, unit stride in K), targets [T] int32/int64.
        (logprobs, lse, entropy) fp32 [T]; logits fp32 [T, V] (the tempered logits the
        statistics were computed from, bitwise) when store_logits, else an empty [0] tensor.
    head_dlogits_cuda(Tensor hidden, Tensor weight, Tensor targets, Tensor g_lp, Tensor g_lse,
                      Tensor g_ent, Tensor lse, Tensor entropy, float temperature,
                      int vocab_offset) -> Tensor
        The fp32 gradient w.r.t. the logits of one block: rows of ``hidden`` [R, K] × vocabulary
        rows ``weight`` [C, K] whose first id is ``vocab_offset``; per-row tensors [R]. [R, C].

The fakes below give them output shapes under ``torch.compile`` / FakeTensor tracing; without
the extension nothing is registered and the functions here are never called (the dispatcher
refuses ``backend="cuda"`` first, naming why).
"""
from __future__ import annotations

import torch

from .._dispatch import cuda_op_registered
from .backward import BACKWARD_VOCAB_CHUNK, TORCH_BLOCK_ELEMENTS, head_backward_blocks
from .reference import IGNORE_INDEX

# Rows of the kernels' token tile: backward blocks are whole tiles except the last.
TOKEN_TILE = 64

REGISTERED = False

if cuda_op_registered("head_forward_cuda") and cuda_op_registered("head_dlogits_cuda"):

    @torch.library.register_fake("mm1::head_forward_cuda")
    def _forward_fake(hidden, weight, targets, temperature, store_logits):
        T, V = hidden.shape[0], weight.shape[0]
        stats = [hidden.new_empty(T, dtype=torch.float32) for _ in range(3)]
        logits = hidden.new_empty((T, V) if store_logits else (0,), dtype=torch.float32)
        return (*stats, logits)

    @torch.library.register_fake("mm1::head_dlogits_cuda")
    def _dlogits_fake(hidden, weight, targets, g_lp, g_lse, g_ent, lse, entropy, temperature, vocab_offset):
        return hidden.new_empty(hidden.shape[0], weight.shape[0], dtype=torch.float32)

    REGISTERED = True


def _rows(hidden):
    """hidden with rows that do not overlap (the kernels' C API refuses a row stride below the
    width, e.g. an expanded [T, K] view with stride 0): a copy only then."""
    return hidden.contiguous() if hidden.shape[0] > 1 and hidden.stride(0) < hidden.shape[1] else hidden


def head_forward_cuda(hidden, weight, targets, temperature: float):
    """fp32 (logprobs, lse, entropy) ``[T]`` from the CUDA kernels."""
    lp, lse, ent, _ = torch.ops.mm1.head_forward_cuda(_rows(hidden), weight, targets, float(temperature), False)
    return lp, lse, ent


def head_logits_cuda(hidden, weight, temperature: float):
    """fp32 ``[T, V]`` tempered logits, bitwise those the CUDA forward's statistics use."""
    no_targets = torch.full((hidden.shape[0],), IGNORE_INDEX, dtype=torch.int64, device=hidden.device)
    return torch.ops.mm1.head_forward_cuda(_rows(hidden), weight, no_targets, float(temperature), True)[3]


def head_backward_cuda(g_lp, g_lse, g_ent, hidden, weight, targets, lse, entropy, temperature: float,
                       vocab_chunk: int = BACKWARD_VOCAB_CHUNK, need_dweight: bool = True):
    """(dhidden, dweight): CUDA logit-gradient blocks, the shared fixed-order GEMM driver."""
    rows_per_block = max(TOKEN_TILE, TORCH_BLOCK_ELEMENTS // vocab_chunk)
    hidden = _rows(hidden)

    def dz_block(t0, t1, v0, v1):
        return torch.ops.mm1.head_dlogits_cuda(
            hidden[t0:t1], weight[v0:v1], targets[t0:t1], g_lp[t0:t1], g_lse[t0:t1], g_ent[t0:t1],
            lse[t0:t1], entropy[t0:t1], float(temperature), v0)

    return head_backward_blocks(hidden, weight, dz_block, rows_per_block, vocab_chunk, need_dweight)

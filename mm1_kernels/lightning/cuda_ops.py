"""Fake (meta) implementations of the CUDA extension's lightning ops.

``csrc/torch_bindings.cpp`` defines ``torch.ops.mm1.lightning_prefill_cuda`` and
``torch.ops.mm1.lightning_decode_cuda`` (schemas below) with CUDA kernels only; these fakes give
them output shapes under ``torch.compile`` / FakeTensor tracing. Importing this module is a
no-op when the extension is not built.

    lightning_prefill_cuda(Tensor q, Tensor k, Tensor v, Tensor slopes, Tensor? initial_state,
                           Tensor? cu_seqlens, bool output_final_state, int segment_len=0,
                           int precision=0) -> (Tensor, Tensor)
        o [B, T, H, Dv] in q's dtype; final_state fp32 [N, H, D, Dv], or [0] when not requested.
        segment_len: 0 = unsplit, else a multiple of 64 (api.cuda_prefill_segment_len plans it);
        the split's workspace is allocated inside the op, not an output. precision: 0 "default",
        1 "high" (bf16 inputs; fp32/fp16 ignore it).
    lightning_decode_cuda(Tensor q, Tensor k, Tensor v, Tensor slopes, Tensor(a!) state_cache,
                          Tensor? slot_ids) -> Tensor
        o [B, H, Dv] in q's dtype; state_cache updated in place.
"""
from __future__ import annotations

import torch

from .._dispatch import cuda_op_registered
from .api import prefill_fake_outputs

REGISTERED = False

if cuda_op_registered("lightning_prefill_cuda") and cuda_op_registered("lightning_decode_cuda"):

    @torch.library.register_fake("mm1::lightning_prefill_cuda")
    def _prefill_fake(q, k, v, slopes, initial_state, cu_seqlens, output_final_state, segment_len=0, precision=0):
        return prefill_fake_outputs(q, v, cu_seqlens, output_final_state)

    @torch.library.register_fake("mm1::lightning_decode_cuda")
    def _decode_fake(q, k, v, slopes, state_cache, slot_ids):
        return q.new_empty(q.shape[:-1] + v.shape[-1:])

    REGISTERED = True

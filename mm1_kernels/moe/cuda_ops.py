"""The CUDA C++ MoE kernels (``csrc/moe/``) behind ``backend="cuda"``: fakes and Python glue.

``csrc/torch_bindings.cpp`` defines, with CUDA kernels only:

    moe_route_cuda(Tensor router_logits, int top_k, bool renormalize) -> (Tensor, Tensor)
        fp32 weights [T, k] and int32 ids [T, k].
    fused_moe_cuda(Tensor x, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids,
                   Tensor? w13_scale, Tensor? w2_scale, Tensor? expert_map) -> Tensor
        y [T, hidden] in x's dtype (contiguous).

The fakes below give them output shapes under ``torch.compile``; registering them is a no-op
when the extension is not built. :func:`check_fused_moe_cuda_args` states what the CUDA kernels
accept beyond the public op's contract (``api.fused_moe`` calls it when ``backend="cuda"``), so a
bad input fails with a ValueError naming the argument rather than in the C++ checks.
"""
from __future__ import annotations

import torch

from .._dispatch import cuda_op_registered

REGISTERED = False

if cuda_op_registered("moe_route_cuda") and cuda_op_registered("fused_moe_cuda"):

    @torch.library.register_fake("mm1::moe_route_cuda")
    def _route_fake(router_logits, top_k, renormalize):
        T = router_logits.shape[0]
        return (router_logits.new_empty(T, top_k, dtype=torch.float32),
                router_logits.new_empty(T, top_k, dtype=torch.int32))

    @torch.library.register_fake("mm1::fused_moe_cuda")
    def _fused_fake(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, expert_map):
        return x.new_empty(x.shape)

    REGISTERED = True


def _aligned(t: torch.Tensor) -> bool:
    # A FakeTensor has no address (torch.compile): the C++ op checks it when it runs.
    if torch.compiler.is_compiling():
        return True
    return t.data_ptr() % 16 == 0


def check_fused_moe_cuda_args(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
    """What the CUDA grouped GEMMs need beyond ``fused_moe``'s own checks: bf16/fp16
    activations (tensor-core operands; fp32 stays on the Triton and torch backends) and 16-byte
    aligned rows, since every tile is copied as 16-byte vectors (cp.async): x's row stride a
    multiple of 8 elements, the weights' expert and row strides multiples of 16 bytes."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"backend='cuda' of fused_moe needs bf16 or fp16 x (tensor-core operands), got "
                         f"{x.dtype}; use backend='triton' or 'torch' for fp32")
    if x.shape[0] > 1 and x.stride(0) % 8 or not _aligned(x):
        raise ValueError(f"backend='cuda' of fused_moe copies 16-byte vectors: x must be 16-byte aligned "
                         f"with x.stride(0) a multiple of 8 elements (got {x.stride(0)})")
    from .api import MAX_EXPERTS  # the C API's MM1_MOE_MAX_EXPERTS (csrc/moe/moe.h)
    if w13.shape[0] > MAX_EXPERTS:
        raise ValueError(f"backend='cuda' of fused_moe supports at most {MAX_EXPERTS} local experts "
                         f"(w13.shape[0]), got {w13.shape[0]}")
    for name, w in (("w13", w13), ("w2", w2)):
        per16 = 16 // w.element_size()
        if w.stride(0) % per16 or w.stride(1) % per16 or not _aligned(w):
            raise ValueError(f"backend='cuda' of fused_moe copies 16-byte vectors: {name} must be 16-byte "
                             f"aligned with expert and row strides multiples of {per16} elements "
                             f"(got {tuple(w.stride())})")


def moe_route_cuda(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    return torch.ops.mm1.moe_route_cuda(logits, top_k, renormalize)


def fused_moe_cuda(x, w13, w2, topk_weights, topk_ids, w13_scale=None, w2_scale=None, expert_map=None):
    return torch.ops.mm1.fused_moe_cuda(
        x, w13, w2, topk_weights.to(torch.float32).contiguous(), topk_ids.contiguous(), w13_scale, w2_scale,
        None if expert_map is None else expert_map.contiguous())

"""mm1-kernels: kernels for the MiniMax-M1 architecture.

Every op takes ``backend=None | "torch" | "triton" | "cuda"``; see ``mm1_kernels._dispatch``.
"""
from ._dispatch import BACKENDS, BackendUnavailableError, triton_interpret_enabled

if triton_interpret_enabled():
    from ._triton_interpret import patch_interpreter_bf16_dot

    patch_interpreter_bf16_dot()

from .lightning import lightning_attention, lightning_decode, lightning_slopes
from .moe import (dequantize_moe_weight, fused_moe, fused_moe_reference, moe_block_reference,
                  moe_route, moe_route_reference, quantize_moe_weights)
from .head import HeadOutput, cispo_loss, head_cispo_loss, head_logprobs, head_sample

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendUnavailableError",
    "lightning_attention", "lightning_decode", "lightning_slopes",
    "moe_route", "fused_moe", "quantize_moe_weights", "moe_route_reference",
    "fused_moe_reference", "moe_block_reference", "dequantize_moe_weight",
    "HeadOutput", "head_logprobs", "head_sample", "cispo_loss", "head_cispo_loss",
]

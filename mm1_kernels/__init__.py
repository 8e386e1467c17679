"""mm1-kernels: kernels for the MiniMax-M1 architecture.

Every op takes ``backend=None | "torch" | "triton" | "cuda"``. ``available_backends(op)`` and
``resolve_backend(op, backend, device)`` answer, from the one registry, which backends an op
has and which one a call would run; ``registered_ops()`` lists the ops. ``nvtx_range(name)``
is a context manager that marks an NVTX range (a no-op without CUDA or a profiler).
"""
from ._dispatch import (
                        BACKENDS,
                        BackendUnavailableError,
                        available_backends,
                        registered_ops,
                        resolve_backend,
                        triton_interpret_enabled,
)
from ._nvtx import nvtx_range
from .dense import invariant_linear, invariant_pointwise, invariant_sum
from .head import (
                        HeadOutput,
                        cispo_loss,
                        head_cispo_loss,
                        head_logits,
                        head_logprobs,
                        head_logprobs_reference,
                        head_sample,
                        sample_from_logits,
)
from .lightning import (
                        LIGHTNING_CHUNK,
                        lightning_attention,
                        lightning_attention_reference,
                        lightning_chunk_cache_step,
                        lightning_decode,
                        lightning_slopes,
)
from .moe import (
                        dequantize_moe_weight,
                        fused_moe,
                        fused_moe_reference,
                        moe_block_reference,
                        moe_route,
                        moe_route_reference,
                        quantize_moe_weights,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "BACKENDS", "BackendUnavailableError", "available_backends", "registered_ops",
    "resolve_backend", "triton_interpret_enabled", "nvtx_range",
    "lightning_attention", "lightning_decode", "lightning_slopes", "lightning_attention_reference",
    "lightning_chunk_cache_step", "LIGHTNING_CHUNK",
    "moe_route", "fused_moe", "quantize_moe_weights", "moe_route_reference",
    "fused_moe_reference", "moe_block_reference", "dequantize_moe_weight",
    "HeadOutput", "head_logprobs", "head_sample", "cispo_loss", "head_cispo_loss", "head_logprobs_reference",
    "head_logits", "sample_from_logits",
    "invariant_linear", "invariant_pointwise", "invariant_sum",
]

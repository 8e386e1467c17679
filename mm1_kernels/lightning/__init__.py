from . import cuda_ops as _cuda_ops  # noqa: F401  fakes for the CUDA ops; a no-op without mm1_kernels._C
from .api import lightning_attention, lightning_chunk_cache_step, lightning_decode, lightning_slopes
from .consistent import CHUNK as LIGHTNING_CHUNK
from .reference import lightning_recurrence as lightning_attention_reference

__all__ = ["LIGHTNING_CHUNK", "lightning_attention", "lightning_chunk_cache_step", "lightning_decode",
           "lightning_slopes", "lightning_attention_reference"]

"""mm1-kernels: kernels for the MiniMax-M1 architecture.

Every op takes ``backend=None | "torch" | "triton" | "cuda"``; see ``mm1_kernels._dispatch``.
"""
from ._dispatch import BACKENDS, BackendUnavailableError, triton_interpret_enabled

if triton_interpret_enabled():
    from ._triton_interpret import patch_interpreter_bf16_dot

    patch_interpreter_bf16_dot()

from .lightning import lightning_attention, lightning_decode, lightning_slopes
# (moe exports go here)
# (head exports go here)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendUnavailableError",
    "lightning_attention", "lightning_decode", "lightning_slopes",
]

"""Workaround for the Triton CPU interpreter, applied only when ``TRITON_INTERPRET=1``.

Triton 3.6's interpreter keeps bf16 tensors as raw uint16 bit patterns and hands them to
``np.matmul`` as integers, so ``tl.dot`` on bf16 operands returns garbage on the CPU (fp16
and fp32 are fine). bf16 → fp32 is exact (a 16-bit shift), so upcasting the operands before
the interpreter's matmul gives what a GPU tensor core computes: exact products accumulated in
fp32. Nothing here runs on a GPU.
"""
from __future__ import annotations

import numpy as np


def _bf16_bits_to_fp32(data: np.ndarray) -> np.ndarray:
    return (data.astype(np.uint32) << 16).view(np.float32)


def patch_interpreter_bf16_dot() -> None:
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:  # pragma: no cover - triton missing
        return
    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_mm1_patched", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            a_data = _bf16_bits_to_fp32(a.data) if a.dtype == tl.bfloat16 else a.data.astype(np.float32)
            b_data = _bf16_bits_to_fp32(b.data) if b.dtype == tl.bfloat16 else b.data.astype(np.float32)
            out = np.matmul(a_data, b_data, dtype=np.float32).astype(d.data.dtype) + d.data
            return interpreter.TensorHandle(out, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._mm1_patched = True
    builder.create_dot = create_dot

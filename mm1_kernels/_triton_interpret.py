"""Fixes for the Triton CPU interpreter, active only while this package's own kernels run.

Under ``TRITON_INTERPRET=1`` Triton executes kernels with numpy, and some of its operations do
not compute what a GPU computes (seen in Triton 3.6 through 3.9):

- ``tl.dot`` on bf16 operands: bf16 tensors are held as raw uint16 bit patterns and handed to
  ``np.matmul`` as integers, so the result is garbage.
- ``tl.dot`` on any operands goes to numpy's BLAS in fp32, whose rounding for one row of a tile
  depends on the other rows and on the CPU's BLAS kernel (seen: a head logit 2e-6 apart when
  a token is computed alone or in a batch, on one machine and not on another). A tensor core's
  result for a row depends on that row only, which is what the package's batch-invariance and
  determinism tests check. The fix multiplies in fp64 (bf16 and fp16 products are exact there,
  fp32 products too) and rounds once to fp32: the same value on every CPU, for every batch.
  This is more accurate than a GPU's in-MMA fp32 accumulation, never less; errors measured
  on a CPU are therefore the kernel's own (tiling, splits, state), not the tensor core's.
- fp32 → bf16 conversion truncates; a GPU (and torch) rounds to nearest even. Truncation
  doubles the error of every bf16 output and biases it toward zero.

The dot fix is always applied under the interpreter (its second reason is numpy's, not
Triton's). Whether the installed Triton's conversion needs the cast fix is not guessed from its
version: the first launch of one of our kernels runs a tiny probe kernel with the interpreter
as it is and compares it with torch.

Scope: :func:`interpreted_with_fixes` wraps each kernel this package launches. The fixes are
installed on the interpreter when the first of our launches begins and removed when the last
one ends, and the patched methods act only on the thread running our launch, so importing
``mm1_kernels`` changes nothing for other libraries' kernels (``tests/test_triton_interpret.py``
checks this). On a GPU, kernels are returned unchanged: none of this code runs there.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np

_lock = threading.Lock()
_installed_depth = 0          # our launches in progress, all threads
_originals: dict = {}         # method name -> the interpreter's own method (kept once captured)
_thread = threading.local()   # .depth: our launches in progress on this thread


def _active() -> bool:
    return getattr(_thread, "depth", 0) > 0


def _bf16_bits_to_fp32(data: np.ndarray) -> np.ndarray:
    return (data.astype(np.uint32) << 16).view(np.float32)


def _fp32_to_bf16_bits_rne(data: np.ndarray) -> np.ndarray:
    """fp32 values → bf16 bit patterns, rounded to nearest even (what a GPU's cvt.rn does)."""
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(data)
    if np.any(nan):  # keep NaN a (quiet) NaN instead of letting the rounding carry make it inf
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def _fixed_create_dot(self, a, b, d, *rest):
    import triton.language as tl
    from triton.runtime import interpreter

    if not _active() or not (a.dtype.is_floating() and b.dtype.is_floating()) \
            or a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:
        return _originals["create_dot"](self, a, b, d, *rest)

    def as_fp64(t):
        return _bf16_bits_to_fp32(t.data).astype(np.float64) if t.dtype == tl.bfloat16 else t.data.astype(np.float64)

    out = np.matmul(as_fp64(a), as_fp64(b)) + d.data.astype(np.float64)
    return interpreter.TensorHandle(out.astype(d.data.dtype), d.dtype.scalar)


def _fixed_cast_impl(self, src, dst_type):
    import triton.language as tl
    from triton.runtime import interpreter

    if _active() and src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        return interpreter.TensorHandle(_fp32_to_bf16_bits_rne(src.data), dst_type.scalar)
    return _originals["cast_impl"](self, src, dst_type)


_FIXES = {"create_dot": _fixed_create_dot, "cast_impl": _fixed_cast_impl}


@functools.cache
def needed_fixes() -> tuple[str, ...]:
    """The interpreter methods to correct: the dot always, the cast when a probe kernel shows it."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def probe_kernel(x_ptr, cast_ptr):
        r = tl.arange(0, 16)
        tl.store(cast_ptr + r, tl.load(x_ptr + r).to(tl.bfloat16))

    # Values strictly between bf16 neighbours, above the midpoint: RNE rounds up, truncation down.
    x = (1.0 + torch.arange(16, dtype=torch.float32) / 8) * (1 + 2.0 ** -8 + 2.0 ** -10)
    cast = torch.empty(16, dtype=torch.bfloat16)
    probe_kernel[(1,)](x, cast)
    needed = ["create_dot"]  # always: numpy's BLAS rounding is not row-independent (see above)
    if not torch.equal(cast, x.bfloat16()):
        needed.append("cast_impl")
    from triton.runtime.interpreter import InterpreterBuilder
    missing = [name for name in needed if not hasattr(InterpreterBuilder, name)]
    if missing:
        raise RuntimeError(f"Triton {triton.__version__}'s interpreter computes bf16 dots or casts "
                           f"unlike a GPU, and the methods mm1_kernels corrects ({missing}) no "
                           f"longer exist; mm1_kernels cannot run its kernels in this interpreter")
    return tuple(needed)


@contextlib.contextmanager
def interpreter_fixes():
    """Apply the needed interpreter fixes for the duration of one of our kernel launches."""
    global _installed_depth
    fixes = needed_fixes()
    if not fixes:
        yield
        return
    from triton.runtime.interpreter import InterpreterBuilder

    with _lock:
        if _installed_depth == 0:
            for name in fixes:
                # Captured once and never dropped: another thread may have looked up a patched
                # method just before we restore the class, and it still needs the original.
                _originals.setdefault(name, getattr(InterpreterBuilder, name))
                setattr(InterpreterBuilder, name, _FIXES[name])
        _installed_depth += 1
    _thread.depth = getattr(_thread, "depth", 0) + 1
    try:
        yield
    finally:
        _thread.depth -= 1
        with _lock:
            _installed_depth -= 1
            if _installed_depth == 0:
                for name in fixes:
                    setattr(InterpreterBuilder, name, _originals[name])


class _InterpretedKernel:
    """An interpreted kernel whose launches (``kernel[grid](...)``) run with the fixes on."""

    def __init__(self, kernel):
        self.kernel = kernel
        functools.update_wrapper(self, kernel.fn if hasattr(kernel, "fn") else kernel)

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            with interpreter_fixes():
                return launch(*args, **kwargs)
        return run

    def __getattr__(self, name):
        return getattr(self.kernel, name)


def interpreted_with_fixes(kernel):
    """Decorator for every kernel this package launches (put it above ``@triton.jit``).

    A compiled (GPU) kernel comes back unchanged; an interpreted one comes back wrapped so
    that its launches run with :func:`interpreter_fixes`.
    """
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return _InterpretedKernel(kernel)
    return kernel

"""One place for the test suite's error measures and tolerances (DESIGN.md, "Numerics contract").

    from numerics import TOL, rel_err, max_abs_err, assert_close_to_reference, case_id

- ``rel_err(out, ref)``: ‖out − ref‖_F / ‖ref‖_F in fp64 (a zero reference counts as norm 1e-300,
  so a zero output against a zero reference is error 0, anything else is huge).
- ``max_abs_err(out, ref)``: max |out − ref| in fp64.
- ``TOL[dtype]`` / ``tol_for(dtype)``: the contract's relative bound per *input* dtype:
  fp32 1e-5, bf16 and fp16 1e-2.
- ``naive_error_bound(naive_err)``: the flash-attention criterion, ``NAIVE_FACTOR`` (2) × the
  error of the same computation done naively in the input dtype.
- ``assert_close_to_reference(out, ref, dtype=..., naive=...)``: finite, and relative error
  ≤ the dtype's bound; for 16-bit inputs with ``naive`` given (the naive output as a tensor, or
  its relative error as a float) also ≤ 2 × the naive error. Returns the relative error.
- ``bf16_ulp(x)``: the spacing of bf16 numbers at |x| (elementwise bounds on bf16 outputs).
- ``case_id(...)`` / ``dtype_name(dtype)``: readable pytest ids such as ``T65-H2-bf16-varlen``.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
NAIVE_FACTOR = 2.0
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.int8: "int8", torch.int32: "i32", torch.int64: "i64"}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bf16"`` (for ids and messages)."""
    return _SHORT.get(dtype, str(dtype).replace("torch.", ""))


def tol_for(dtype: torch.dtype) -> float:
    """The contract's relative-error bound for outputs computed from inputs of ``dtype``."""
    try:
        return TOL[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for input dtype {dtype}") from None


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ‖out − ref‖ / ‖ref‖, computed in fp64 on the CPU."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out − ref| in fp64 (0 for empty tensors)."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return (out - ref).abs().max().item() if out.numel() else 0.0


def naive_error_bound(naive_err: float, factor: float = NAIVE_FACTOR) -> float:
    """The bound a kernel's error must meet against the naive computation's error."""
    return factor * naive_err


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |x| (fp64): 2^(floor(log2|x|) − 7); the subnormal spacing at 0."""
    a = x.detach().cpu().double().abs()
    tiny = torch.finfo(torch.bfloat16).tiny
    e = torch.floor(torch.log2(a.clamp_min(tiny)))
    return torch.exp2(e - 7).clamp_min(tiny * 2.0 ** -7)


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, *, dtype: torch.dtype | None = None,
                              naive=None, tol: float | None = None, what: str = "output") -> float:
    """Check ``out`` against the fp64 ``ref`` under the numerics contract; returns the relative error.

    dtype: the *input* dtype that sets the bound (default ``out.dtype``).
    naive: for 16-bit inputs, the same computation done naively in the input dtype — its output
      (a tensor) or its relative error (a float); then the error must also be ≤ 2 × naive's.
    tol: overrides the dtype's bound (e.g. an op-specific tighter one).
    """
    dtype = out.dtype if dtype is None else dtype
    bound = tol_for(dtype) if tol is None else tol
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert bool(torch.isfinite(out).all()), f"{what}: non-finite values (an unwritten element?)"
    err = rel_err(out, ref)
    detail = f"(max abs {max_abs_err(out, ref):.3e}" + (")" if tol is not None else
                                                          f", {dtype_name(dtype)} inputs)")
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.1e} {detail}"
    if naive is not None and dtype in (torch.bfloat16, torch.float16):
        naive_err = float(naive) if isinstance(naive, Real) else rel_err(naive, ref)
        limit = naive_error_bound(naive_err)
        assert err <= limit, (f"{what}: relative error {err:.3e} > {NAIVE_FACTOR:g} × naive "
                              f"{dtype_name(dtype)} error {naive_err:.3e} {detail}")
    return err


def case_id(*parts, **fields) -> str:
    """A readable test id: ``case_id(T=65, H=2, dtype=torch.bfloat16, varlen=True)`` → ``T65-H2-bf16-varlen``.

    Positional parts are used as they are (dtypes shortened); keyword fields become ``<name><value>``,
    except dtypes (``bf16``), ``True`` (just the name), ``False``/``None`` (left out) and string
    values (just the value).
    """
    out = []
    for p in parts:
        out.append(dtype_name(p) if isinstance(p, torch.dtype) else str(p))
    for name, value in fields.items():
        if isinstance(value, torch.dtype):
            out.append(dtype_name(value))
        elif value is True:
            out.append(name)
        elif value is False or value is None:
            continue
        elif isinstance(value, str):
            out.append(value)
        elif isinstance(value, float) and math.isfinite(value) and value == int(value):
            out.append(f"{name}{int(value)}")
        else:
            out.append(f"{name}{value}")
    return "-".join(out)

"""Batch-invariant dense arithmetic for consistent mode (``mm1_model``'s ``consistent=True``)."""
from .api import invariant_linear
from .invariant import invariant_pointwise, invariant_sum

__all__ = ["invariant_linear", "invariant_sum", "invariant_pointwise"]

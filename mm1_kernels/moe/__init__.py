from .api import fused_moe, moe_route, quantize_moe_weights
from .reference import dequantize_moe_weight, fused_moe_reference, moe_block_reference, moe_route_reference

__all__ = ["moe_route", "fused_moe", "quantize_moe_weights", "moe_route_reference",
           "fused_moe_reference", "moe_block_reference", "dequantize_moe_weight"]

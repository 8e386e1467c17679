from .api import lightning_attention, lightning_decode, lightning_slopes

__all__ = ["lightning_attention", "lightning_decode", "lightning_slopes"]

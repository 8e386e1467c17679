from .api import HeadOutput, cispo_loss, head_cispo_loss, head_logprobs, head_sample

__all__ = ["HeadOutput", "cispo_loss", "head_cispo_loss", "head_logprobs", "head_sample"]

from .api import HeadOutput, cispo_loss, head_cispo_loss, head_logits, head_logprobs, head_sample, sample_from_logits
from .reference import head_reference as head_logprobs_reference

__all__ = ["HeadOutput", "cispo_loss", "head_cispo_loss", "head_logprobs", "head_sample", "head_logprobs_reference",
           "head_logits", "sample_from_logits"]

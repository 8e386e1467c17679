"""The thin MiniMax-M1 wrapper (imported as ``mm1_model``): exact M1 math, every hot op from mm1_kernels.

    from mm1_model import MiniMaxM1Config, MiniMaxM1ForCausalLM
    model = MiniMaxM1ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, layers=None,
                                                 device="cuda", backend=None)
    logits = model(input_ids).logits                      # fp32 [B, T, V]
    tokens = model.generate(input_ids, max_new_tokens=32, temperature=0.0)
    model.save_pretrained(path)

Names are imported lazily, so ``python -m mm1_model`` can choose the Triton mode
(``TRITON_INTERPRET``) before mm1_kernels is first imported.
"""
import importlib

_EXPORTS = {
    "MiniMaxM1Config": "config", "m1_attn_type_list": "config",
    "MiniMaxM1ForCausalLM": "modeling", "CausalLMOutput": "modeling", "count_parameters": "modeling",
    "MiniMaxM1Cache": "cache",
    "CheckpointError": "checkpoint", "expected_keys": "checkpoint", "parse_layers": "checkpoint",
    "generate": "generation", "M1_TEMPERATURE": "generation", "M1_TOP_P": "generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)

"""Drop-in entry points for other engines, each in its own module, each importing its engine lazily.

- ``mm1_kernels.integrations.transformers``: patch a transformers ``MiniMaxForCausalLM``.
- ``mm1_kernels.integrations.vllm``: vLLM's ``fused_experts`` and lightning-attention conventions.
- ``mm1_kernels.integrations.sglang``: SGLang's ``fused_experts`` and lightning decode conventions.
- ``mm1_kernels.integrations.fla``: a ``chunk_simple_gla``-compatible entry for fla users.

Importing this package (or any of these modules) never imports the engine itself.
"""

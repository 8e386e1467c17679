"""MiniMaxM1Config: every field of MiniMax-M1's config.json, with M1's values as defaults.

Reads the original ``config.json`` (``model_type`` "minimax_m1", ``attn_type_list``,
``layernorm_*_alpha``) and transformers' renamed one (``model_type`` "minimax", ``layer_types``,
``*_alpha_factor``, ``rope_parameters``). One field is ours: ``layers``, the GLOBAL indices of
the decoder layers this model holds (None = all). A slice keeps ``num_hidden_layers`` at the
checkpoint's count, so slopes and layer types stay those of the full model.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

M1_LAYERS = 80
M1_ALPHA = (2 * M1_LAYERS) ** 0.25  # 3.5565588200778455
# M1's remote-code pointers; save_pretrained leaves them out (it ships no remote code).
M1_AUTO_MAP = {"AutoConfig": "configuration_minimax_m1.MiniMaxM1Config",
               "AutoModelForCausalLM": "modeling_minimax_m1.MiniMaxM1ForCausalLM"}


def m1_attn_type_list(num_layers: int = M1_LAYERS, period: int = 8) -> List[int]:
    """0 = lightning, 1 = softmax; softmax at every ``period``-th layer (7, 15, ..., for M1)."""
    return [1 if (i + 1) % period == 0 else 0 for i in range(num_layers)]


@dataclass
class MiniMaxM1Config:
    # --- M1's config.json, field for field ---
    architectures: List[str] = field(default_factory=lambda: ["MiniMaxM1ForCausalLM"])
    auto_map: dict = field(default_factory=lambda: dict(M1_AUTO_MAP))
    model_type: str = "minimax_m1"
    vocab_size: int = 200064
    hidden_size: int = 6144
    intermediate_size: int = 9216
    num_hidden_layers: int = M1_LAYERS
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 128
    rotary_dim: int = 64
    rope_theta: float = 10000000.0
    attn_type_list: List[int] = field(default_factory=m1_attn_type_list)
    num_local_experts: int = 32
    num_experts_per_tok: int = 2
    shared_intermediate_size: int = 0
    shared_moe_mode: str = "sigmoid"
    hidden_act: str = "silu"
    max_position_embeddings: int = 10240000
    rms_norm_eps: float = 1e-5
    postnorm: bool = True
    layernorm_full_attention_alpha: float = M1_ALPHA
    layernorm_full_attention_beta: float = 1.0
    layernorm_linear_attention_alpha: float = M1_ALPHA
    layernorm_linear_attention_beta: float = 1.0
    layernorm_mlp_alpha: float = M1_ALPHA
    layernorm_mlp_beta: float = 1.0
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0
    sliding_window: Optional[int] = None
    use_cache: bool = True
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    torch_dtype: str = "bfloat16"   # not in M1's file; written by save_pretrained
    transformers_version: str = "4.45.2"
    # --- ours ---
    layers: Optional[List[int]] = None
    # The lightning output norm's eps (the original constructor default, not a config field).
    lightning_norm_eps: float = 1e-6

    _OURS = ("layers", "lightning_norm_eps")

    def __post_init__(self):
        if len(self.attn_type_list) != self.num_hidden_layers:
            raise ValueError(f"attn_type_list has {len(self.attn_type_list)} entries for "
                             f"{self.num_hidden_layers} layers")
        if self.layers is not None:
            self.layers = [int(i) for i in self.layers]
            bad = [i for i in self.layers if not 0 <= i < self.num_hidden_layers]
            if bad or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"layers must be distinct indices in [0, {self.num_hidden_layers}), "
                                 f"got {self.layers}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary_dim must be even and in (0, head_dim], got {self.rotary_dim}")
        if self.shared_intermediate_size:
            raise NotImplementedError("shared experts (shared_intermediate_size > 0) are not part of M1")

    # ---- derived ----
    @property
    def layer_ids(self) -> List[int]:
        """Global indices of the layers held, in order."""
        return list(range(self.num_hidden_layers)) if self.layers is None else list(self.layers)

    def is_lightning(self, layer_idx: int) -> bool:
        return self.attn_type_list[layer_idx] == 0

    # ---- presets ----
    @classmethod
    def full(cls, **kw) -> "MiniMaxM1Config":
        """MiniMax-M1 (40k and 80k share it)."""
        return cls(**kw)

    @classmethod
    def m1_slice(cls, layers, **kw) -> "MiniMaxM1Config":
        """Real M1 width, only the given GLOBAL layers of the 80 (slopes and types as in the 80)."""
        return cls(layers=list(layers), **kw)

    @classmethod
    def tiny(cls, num_periods: int = 1, **kw) -> "MiniMaxM1Config":
        """A CPU-sized model with M1's structure: 7 lightning + 1 softmax layer per period,
        partial rotary, GQA, top-2 of several experts, M1's alpha rule (2L)^(1/4)."""
        n = 8 * num_periods
        alpha = (2 * n) ** 0.25
        base = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=n,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rotary_dim=8,
                    rope_theta=10000.0, attn_type_list=m1_attn_type_list(n), num_local_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=4096,
                    layernorm_full_attention_alpha=alpha, layernorm_linear_attention_alpha=alpha,
                    layernorm_mlp_alpha=alpha, torch_dtype="float32")
        base.update(kw)
        return cls(**base)

    # ---- (de)serialization ----
    @classmethod
    def from_dict(cls, d: dict) -> "MiniMaxM1Config":
        """Accept the original M1 config.json or transformers' renamed MiniMaxConfig."""
        d = dict(d)
        if "layer_types" in d and "attn_type_list" not in d:
            d["attn_type_list"] = [1 if t == "full_attention" else 0 for t in d.pop("layer_types")]
        renames = {"full_attn_alpha_factor": "layernorm_full_attention_alpha",
                   "full_attn_beta_factor": "layernorm_full_attention_beta",
                   "linear_attn_alpha_factor": "layernorm_linear_attention_alpha",
                   "linear_attn_beta_factor": "layernorm_linear_attention_beta",
                   "mlp_alpha_factor": "layernorm_mlp_alpha", "mlp_beta_factor": "layernorm_mlp_beta",
                   "dtype": "torch_dtype"}
        for old, new in renames.items():
            if old in d:
                d.setdefault(new, d.pop(old))
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None)
        if isinstance(rope, dict) and "rope_theta" in rope:
            d.setdefault("rope_theta", rope["rope_theta"])
        if d.get("model_type") == "minimax":
            # transformers' port rotates the whole head (no rotary_dim field)
            d.setdefault("rotary_dim", d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"])
        if d.get("head_dim") is None and "hidden_size" in d and "num_attention_heads" in d:
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        names = {f.name for f in dataclasses.fields(cls)}
        if d.get("model_type") == "minimax":
            d["model_type"] = "minimax_m1"
            d["architectures"] = ["MiniMaxM1ForCausalLM"]
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json_file(cls, path: str) -> "MiniMaxM1Config":
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read config {path}: {exc}") from exc
        return cls.from_dict(d)

    @classmethod
    def from_pretrained(cls, path: str) -> "MiniMaxM1Config":
        return cls.from_json_file(os.path.join(path, "config.json"))

    def to_dict(self, with_ours: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not with_ours:
            for k in self._OURS:
                d.pop(k)
        return d

    def to_json_dict(self) -> dict:
        """What save_pretrained writes: M1's fields (no auto_map), plus ``layers`` for a slice."""
        d = self.to_dict()
        d.pop("auto_map")
        if self.layers is not None:
            d["layers"] = list(self.layers)  # ours; other loaders ignore unknown fields
        return d

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(self.to_json_dict(), f, indent=2)

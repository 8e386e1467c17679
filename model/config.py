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
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

M1_LAYERS = 80
M1_ALPHA = (2 * M1_LAYERS) ** 0.25  # 3.5565588200778455
# M1's remote-code pointers; save_pretrained leaves them out (it ships no remote code).
M1_AUTO_MAP = {"AutoConfig": "configuration_minimax_m1.MiniMaxM1Config",
               "AutoModelForCausalLM": "modeling_minimax_m1.MiniMaxM1ForCausalLM"}

_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rotary_dim",
                  "num_local_experts", "num_experts_per_tok", "max_position_embeddings")
# float fields: True = must be > 0, False = must be >= 0
_FLOATS = {"rope_theta": True, "rms_norm_eps": True, "lightning_norm_eps": True,
           "initializer_range": False}
_FINITE_FLOATS = ("layernorm_full_attention_alpha", "layernorm_full_attention_beta",
                  "layernorm_linear_attention_alpha", "layernorm_linear_attention_beta",
                  "layernorm_mlp_alpha", "layernorm_mlp_beta")
_LAYER_TYPES = {"linear_attention": 0, "full_attention": 1}


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
        self.validate()

    def validate(self) -> MiniMaxM1Config:
        """Refuse a config the model cannot run exactly (ValueError/TypeError naming the field).

        Called at construction and again when a model is built (fields can change in between).
        """
        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"config field {name} must be an int, got {v!r}")
            if v <= 0:
                raise ValueError(f"config field {name} must be positive, got {v}")
        for name, positive in _FLOATS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"config field {name} must be a number, got {v!r}")
            if not math.isfinite(v) or (v <= 0 if positive else v < 0):
                raise ValueError(f"config field {name} must be finite and "
                                 f"{'> 0' if positive else '>= 0'}, got {v}")
        for name in _FINITE_FLOATS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"config field {name} must be a finite number, got {v!r}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(f"config field num_experts_per_tok ({self.num_experts_per_tok}) must be "
                             f"<= num_local_experts ({self.num_local_experts})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config field num_attention_heads ({self.num_attention_heads}) must be a "
                             f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"config field rotary_dim must be even and in (0, head_dim={self.head_dim}], "
                             f"got {self.rotary_dim}")
        types = self.attn_type_list
        if not isinstance(types, (list, tuple)):
            raise TypeError(f"config field attn_type_list must be a list of 0/1, got {type(types).__name__}")
        if len(types) != self.num_hidden_layers:
            raise ValueError(f"config field attn_type_list has {len(types)} entries for "
                             f"num_hidden_layers={self.num_hidden_layers}")
        bad = [(i, t) for i, t in enumerate(types) if isinstance(t, bool) or t not in (0, 1)]
        if bad:
            raise ValueError(f"config field attn_type_list values must be 0 (lightning) or 1 (softmax), "
                             f"got {bad[0][1]!r} at index {bad[0][0]}")
        self.attn_type_list = [int(t) for t in types]
        for name in ("postnorm", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"config field {name} must be a bool, got {getattr(self, name)!r}")
        # Fields of M1's file that the model would otherwise ignore: refused rather than giving a
        # silently different model (M1 has untied embeddings and no sliding window).
        if self.tie_word_embeddings:
            raise NotImplementedError("config field tie_word_embeddings=True is not supported: M1's LM head "
                                      "is a separate weight")
        if self.sliding_window is not None:
            raise NotImplementedError(f"config field sliding_window={self.sliding_window!r} is not supported: "
                                      f"M1's softmax layers attend to the whole sequence (use None)")
        if self.hidden_act != "silu":
            raise ValueError(f"config field hidden_act must be 'silu' (M1's), got {self.hidden_act!r}")
        if self.layers is not None:
            layers = self.layers
            if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__") or any(
                    isinstance(i, bool) or not isinstance(i, int) for i in layers):
                raise TypeError(f"config field layers must be a list of ints or None, got {layers!r}")
            self.layers = list(layers)
            bad = [i for i in self.layers if not 0 <= i < self.num_hidden_layers]
            if not self.layers or bad or len(set(self.layers)) != len(self.layers):
                raise ValueError(f"config field layers must be distinct indices in "
                                 f"[0, {self.num_hidden_layers}), got {self.layers}")
            if self.layers != sorted(self.layers):
                raise ValueError(f"config field layers must be in increasing order (the model runs them "
                                 f"in this order), got {self.layers}")
        if self.shared_intermediate_size:
            if self.shared_intermediate_size < 0:
                raise ValueError(f"config field shared_intermediate_size must be >= 0, "
                                 f"got {self.shared_intermediate_size}")
            raise NotImplementedError("shared experts (shared_intermediate_size > 0) are not part of M1")
        return self

    # ---- derived ----
    @property
    def layer_ids(self) -> List[int]:
        """Global indices of the layers held, in order."""
        return list(range(self.num_hidden_layers)) if self.layers is None else list(self.layers)

    def is_lightning(self, layer_idx: int) -> bool:
        return self.attn_type_list[layer_idx] == 0

    # ---- presets ----
    @classmethod
    def full(cls, **kw) -> MiniMaxM1Config:
        """MiniMax-M1 (40k and 80k share it)."""
        return cls(**kw)

    @classmethod
    def m1_slice(cls, layers, **kw) -> MiniMaxM1Config:
        """Real M1 width, only the given GLOBAL layers of the 80 (slopes and types as in the 80)."""
        return cls(layers=list(layers), **kw)

    @classmethod
    def tiny(cls, num_periods: int = 1, **kw) -> MiniMaxM1Config:
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
    def from_dict(cls, d: dict) -> MiniMaxM1Config:
        """Accept the original M1 config.json or transformers' renamed MiniMaxConfig."""
        if not isinstance(d, dict):
            raise TypeError(f"a config must be a dict (a JSON object), got {type(d).__name__}")
        d = dict(d)
        if "layer_types" in d and "attn_type_list" not in d:
            types = d.pop("layer_types")
            bad = [t for t in types if t not in _LAYER_TYPES] if isinstance(types, list) else [types]
            if bad:
                raise ValueError(f"config field layer_types values must be one of {sorted(_LAYER_TYPES)}, "
                                 f"got {bad[0]!r}")
            d["attn_type_list"] = [_LAYER_TYPES[t] for t in types]
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
            if d.get("head_dim") is None:
                d["head_dim"] = cls._derived_head_dim(d)
            d.setdefault("rotary_dim", d["head_dim"])
        if d.get("head_dim") is None and "hidden_size" in d and "num_attention_heads" in d:
            d["head_dim"] = cls._derived_head_dim(d)
        names = {f.name for f in dataclasses.fields(cls)}
        if d.get("model_type") == "minimax":
            d["model_type"] = "minimax_m1"
            d["architectures"] = ["MiniMaxM1ForCausalLM"]
        return cls(**{k: v for k, v in d.items() if k in names})

    @staticmethod
    def _derived_head_dim(d: dict) -> int:
        hidden, heads = d.get("hidden_size", 6144), d.get("num_attention_heads", 64)
        if (isinstance(hidden, bool) or isinstance(heads, bool) or not isinstance(hidden, int)
                or not isinstance(heads, int) or heads <= 0 or hidden % heads):
            raise ValueError(f"config field head_dim is missing and hidden_size ({hidden!r}) is not a "
                             f"positive multiple of num_attention_heads ({heads!r})")
        return hidden // heads

    @classmethod
    def from_json_file(cls, path: str) -> MiniMaxM1Config:
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read config {path}: {exc}") from exc
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as exc:  # same type, with the file named
            raise type(exc)(f"{path}: {exc}") from exc

    @classmethod
    def from_pretrained(cls, path: str) -> MiniMaxM1Config:
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

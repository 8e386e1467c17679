"""Parity with transformers' MiniMaxForCausalLM on a tiny random model with the same weights.

transformers' port rotates the whole head in softmax layers (it ignores rotary_dim), so the
comparison uses rotary_dim == head_dim; the partial-rotary model is checked against the fp64
transcription of M1_REFERENCE in test_model.py. fp32 throughout.
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "MiniMaxForCausalLM"):  # pragma: no cover
    pytest.skip("this transformers has no MiniMax port", allow_module_level=True)

from numerics import rel_err as rel  # noqa: E402

pytestmark = pytest.mark.slow

from mm1_model import MiniMaxM1Config, MiniMaxM1ForCausalLM  # noqa: E402


def hf_config(c: MiniMaxM1Config, block_size: int = 8):
    return transformers.MiniMaxConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        layer_types=["full_attention" if t else "linear_attention" for t in c.attn_type_list],
        num_local_experts=c.num_local_experts, num_experts_per_tok=c.num_experts_per_tok,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        full_attn_alpha_factor=c.layernorm_full_attention_alpha,
        full_attn_beta_factor=c.layernorm_full_attention_beta,
        linear_attn_alpha_factor=c.layernorm_linear_attention_alpha,
        linear_attn_beta_factor=c.layernorm_linear_attention_beta,
        mlp_alpha_factor=c.layernorm_mlp_alpha, mlp_beta_factor=c.layernorm_mlp_beta,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        block_size=block_size, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(ours, transformers') with the same weights: ours saved in M1's format, loaded by transformers."""
    cfg = MiniMaxM1Config.tiny(rotary_dim=16)
    ours = MiniMaxM1ForCausalLM(cfg).float().init_random_(3).eval()
    path = str(tmp_path_factory.mktemp("hf"))
    ours.save_pretrained(path, max_shard_size=300_000)
    hf_config(cfg).save_pretrained(path)  # transformers reads its own config fields
    hf = transformers.MiniMaxForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, hf, path


def test_logits_match_transformers(pair):
    ours, hf, _ = pair
    # 21 tokens: several of transformers' 8-token lightning blocks and a partial one
    ids = torch.randint(0, ours.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits.float()
        got = ours(ids).logits
    assert rel(got, want) < 1e-4


def test_transformers_weights_load_into_ours(pair, tmp_path):
    """transformers' in-memory names and its own saved checkpoint both load into our model."""
    ours, hf, path = pair
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    hf_path = str(tmp_path / "hf_saved")
    hf.save_pretrained(hf_path)
    ids = torch.randint(0, ours.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits.float()
        for p in (str(tmp_path), hf_path):
            m = MiniMaxM1ForCausalLM.from_pretrained(p, dtype=torch.float32, device="cpu")
            assert json.load(open(os.path.join(p, "config.json")))["model_type"] == "minimax"
            assert rel(m(ids).logits, want) < 1e-4


def test_greedy_decode_matches_transformers(pair):
    ours, hf, _ = pair
    ids = torch.randint(0, ours.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, max_new_tokens=5), want)

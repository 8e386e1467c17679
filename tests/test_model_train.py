"""The model trains (issue 12): gradients reach every parameter through the logits, the
logprobs and the fused CISPO head on every backend, the Triton backend's gradients match the
torch backend's, gradient checkpointing gives the same gradients, int8 experts stay frozen,
generation records no graph, and one CISPO step (``python -m mm1_model rl-demo``) trains."""
import pytest
import torch

import mm1_kernels as mk
from mm1_model import MiniMaxM1Config, MiniMaxM1ForCausalLM
from mm1_model.rl_demo import build_model, cispo_step, trainable_parameters

from numerics import rel_err

# Model gradients on two backends: the ops differ in accumulation order only (fp32 kernels),
# and the gradient of a whole 8-layer model amplifies that a little (issue 12's bound).
GRAD_TOL = 1e-4


def tiny_model(backend=None):
    """The embedded tiny model (7 lightning layers + 1 softmax layer, fp32, as rl-demo builds it)."""
    return build_model(seed=0, backend=backend)


def training_loss(model, ids):
    """A loss through all three training paths: ``.logits``, ``.logprobs`` and
    ``mk.head_cispo_loss`` on the final hidden states (with some ratios clipped)."""
    g = torch.Generator().manual_seed(1)
    B, T = ids.shape
    out = model(ids)
    lp = model.logprobs(ids)                                             # [B, T-1]
    hidden = out.hidden_states[:, :-1].reshape(-1, model.config.hidden_size)
    old = lp.detach().reshape(-1) + 0.3 * torch.randn(B * (T - 1), generator=g)   # some r outside the clip
    adv = torch.randn(B, 1, generator=g).expand(B, T - 1).reshape(-1)
    cispo = mk.head_cispo_loss(hidden, model.lm_head.weight, ids[:, 1:].reshape(-1), old, adv,
                               eps_high=0.2, backend=model.backend)
    proj = torch.randn(out.logits.shape, generator=g)
    return (out.logits * proj).mean() + lp.mean() + cispo


def gradients(model, ids):
    model.zero_grad(set_to_none=True)
    training_loss(model, ids).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, MiniMaxM1Config.tiny().vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def torch_grads(ids):
    return gradients(tiny_model("torch"), ids)


def assert_every_parameter_trained(model, grads, experts=True):
    kinds = {"lightning": 0, "softmax": 0}
    for layer in model.model.layers:
        kinds["lightning" if layer.is_lightning else "softmax"] += 1
    assert all(kinds.values()), f"the model must hold both attention kinds, got {kinds}"
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for must in ("embed_tokens", "lm_head", "qkv_proj", "output_gate", "self_attn.norm", "q_proj", "o_proj",
                 "block_sparse_moe.gate", "input_layernorm", "post_attention_layernorm", "model.norm",
                 *(("block_sparse_moe.w13", "block_sparse_moe.w2") if experts else ())):
        assert any(must in n for n in names), must
    for n in names:
        g = grads[n]
        assert g is not None, f"{n}: no gradient"
        assert bool(torch.isfinite(g).all()), f"{n}: non-finite gradient"
        assert g.abs().max().item() > 0, f"{n}: zero gradient"


def test_training_path_records_the_graph(ids):
    model = tiny_model("torch")
    assert model(ids).logits.requires_grad
    assert model.logprobs(ids).requires_grad
    with torch.no_grad():  # and the caller can still turn it off
        assert not model(ids).logits.requires_grad


def test_every_parameter_gets_a_gradient(ids, torch_grads):
    assert_every_parameter_trained(tiny_model("torch"), torch_grads)


def test_triton_gradients_match_torch(ids, torch_grads):
    model = tiny_model("triton")
    grads = gradients(model, ids)
    assert_every_parameter_trained(model, grads)
    errs = {n: rel_err(grads[n], torch_grads[n]) for n in torch_grads}
    bad = {n: e for n, e in errs.items() if not e <= GRAD_TOL}
    assert not bad, f"triton vs torch gradients beyond {GRAD_TOL}: {bad}"


def test_gradient_checkpointing_same_gradients(ids, torch_grads):
    model = tiny_model("torch")
    calls, layer0 = [], model.model.layers[0]
    forward = layer0.forward
    layer0.forward = lambda *a: calls.append(1) or forward(*a)   # counts recomputations too
    assert not model.is_gradient_checkpointing
    assert model.gradient_checkpointing_enable() is model and model.is_gradient_checkpointing
    grads = gradients(model, ids)
    # Two forwards (.logits and .logprobs), each recomputed once in the backward.
    assert len(calls) == 4, f"layer 0 ran {len(calls)} times; with checkpointing it must be recomputed"
    for n, g in torch_grads.items():
        assert torch.equal(grads[n], g), f"{n}: checkpointing changed the gradient ({rel_err(grads[n], g):.2e})"
    model.gradient_checkpointing_disable()
    calls.clear()
    model(ids).logits.sum().backward()
    assert len(calls) == 1 and not model.is_gradient_checkpointing


def test_int8_experts_are_frozen(ids):
    model = tiny_model("torch").quantize_experts_()
    moe = model.model.layers[0].block_sparse_moe
    assert moe.w13.dtype == torch.int8 and not moe.w13.requires_grad and not moe.w2.requires_grad
    with pytest.raises(RuntimeError, match="floating point"):
        moe.w13.requires_grad_(True)                    # torch refuses: int8 weights cannot train
    grads = gradients(model, ids)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert sorted(frozen) == sorted(n for n, _ in model.named_parameters() if n.endswith((".w13", ".w2")))
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    # Everything else, the router included, still trains through the experts' input gradient.
    assert_every_parameter_trained(model, grads, experts=False)
    assert len(trainable_parameters(model)) == len(grads)


def test_generation_records_no_graph():
    model = tiny_model("torch")
    assert all(p.requires_grad for p in model.parameters())
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    tokens, lps = model.generate(prompts, max_new_tokens=3, temperature=1.0, top_p=0.95, return_logprobs=True,
                                 generator=torch.Generator().manual_seed(0))
    assert not lps.requires_grad and lps.grad_fn is None
    cache = model.new_cache(2, 8)
    out = model.prefill(prompts, cache)
    assert not out.logits.requires_grad and not out.hidden_states.requires_grad
    out = model.decode(out.logits.argmax(-1), cache)
    assert not out.logits.requires_grad and not out.hidden_states.requires_grad
    assert torch.is_grad_enabled()
    assert all(p.grad is None for p in model.parameters())


def test_cispo_step_trains():
    model = build_model(seed=0, backend="torch")
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-3, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prompts = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    seen = []
    stats = cispo_step(model, opt, prompts, group_size=3, max_new_tokens=4,
                       generator=torch.Generator().manual_seed(0), on_before_step=seen.append)
    assert seen == [stats]
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()), stats
    assert 0.0 <= stats["reward"] <= 1.0 and stats["grad_norm"] > 0
    # fp32, same weights: prefill + decode and the full forward differ in summation order only.
    assert stats["max_abs"] < 1e-4 and stats["pearson"] > 0.9999, stats
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert not unchanged, f"the step left these parameters unchanged: {unchanged}"


def test_rl_demo_command(capsys):
    from mm1_model.__main__ import cli
    cli(["rl-demo", "--prompts", "1", "--group", "2", "--new-tokens", "3", "--prompt-len", "4"])
    out = capsys.readouterr().out
    for what in ("loss", "reward", "max |Δ|", "mean |Δ|", "Pearson", "AdamW step"):
        assert what in out, what


def test_cispo_step_needs_a_group():
    model = MiniMaxM1ForCausalLM(MiniMaxM1Config.tiny(), backend="torch")
    opt = torch.optim.AdamW(trainable_parameters(model))
    with pytest.raises(ValueError, match="group_size"):
        cispo_step(model, opt, torch.zeros(1, 3, dtype=torch.long), group_size=1, max_new_tokens=2)

"""mm1_kernels.integrations.transformers on a tiny random transformers MiniMaxForCausalLM.

The truth is the unpatched transformers model with the same weights (the patch must change
nothing but precision): fp32 logits and greedy generations equal, bf16 within the numerics
contract against an fp64 run of the unpatched model, every patched op seen in the dispatch,
the lightning state cache in fp32, training gradients equal to transformers' own.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "MiniMaxForCausalLM"):  # pragma: no cover
    pytest.skip("this transformers has no MiniMax port", allow_module_level=True)

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from mm1_kernels.integrations import transformers as mm1_tf  # noqa: E402

from numerics import assert_close_to_reference, rel_err  # noqa: E402

LAYERS = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
V = 96


def tiny_model(initializer_range: float, seed: int = 0):
    """4 layers (3 lightning, 1 softmax), 2 heads of 16, 4 experts top-2, fp32, eval mode."""
    cfg = transformers.MiniMaxConfig(
        vocab_size=V, hidden_size=32, intermediate_size=24, num_hidden_layers=len(LAYERS),
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, layer_types=LAYERS,
        num_local_experts=4, num_experts_per_tok=2, block_size=8, max_position_embeddings=128,
        initializer_range=initializer_range, tie_word_embeddings=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.MiniMaxForCausalLM(cfg).float().eval()


def patched(model, **flags):
    return mm1_tf.apply_mm1_kernels(copy.deepcopy(model), **flags)


def fp64_truth(model):
    """The unpatched model in fp64 (its default grouped_mm experts have no fp64 path: eager)."""
    m = copy.deepcopy(model)
    m.config._experts_implementation = "eager"
    return m.double()


class RecordMM1(TorchDispatchMode):
    """Records the names of the ``torch.ops.mm1.*`` ops dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("mm1."):
            self.ops.add(name.split(".")[1])
        return func(*args, **(kwargs or {}))


def ids_of(shape, seed=0):
    return torch.randint(1, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ref():
    # initializer_range 0.2 makes every activation O(1), so 1e-5 equality is a sharp test.
    return tiny_model(0.2)


@pytest.fixture(scope="module")
def pat(ref):
    return patched(ref)


def test_import_does_not_import_transformers():
    code = ("import sys, mm1_kernels.integrations.transformers as m; "
            "assert callable(m.apply_mm1_kernels); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


def test_fp32_logits_equal_unpatched_and_ops_run(ref, pat):
    # 21 tokens: two full 8-token transformers blocks and a partial one; a left-padded row.
    ids = ids_of((2, 21))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            want = ref(ids, **kwargs).logits
            with RecordMM1() as rec:
                got = pat(ids, **kwargs).logits
            assert got.dtype == torch.float32
            assert rel_err(got, want) <= 1e-5
            assert {"lightning_attention", "moe_route", "fused_moe"} <= rec.ops
    assert mm1_tf.patched_pieces(pat) == {"lightning": True, "moe": True, "fp32_head": True}


def test_greedy_generate_identical_with_fp32_state(ref, pat):
    ids = ids_of((2, 10), seed=1)
    ids[0, :2] = 0
    mask = (torch.arange(10) >= 2).long().expand(2, -1).clone()
    mask[1] = 1
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        with RecordMM1() as rec:
            out = pat.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                               return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    assert {"lightning_attention", "lightning_decode", "moe_route", "fused_moe"} <= rec.ops
    cache = out.past_key_values
    for i, kind in enumerate(LAYERS):
        if kind == "linear_attention":
            state = cache.linear_cache[i]
            assert state.dtype == torch.float32 and state.shape == (2, 2, 16, 16)


def test_bf16_within_contract_fp32_logits_and_state():
    model = tiny_model(0.05)  # at 0.2 the random model is chaotic in bf16, patched or not
    ids = ids_of((2, 21), seed=2)
    with torch.no_grad():
        truth = fp64_truth(model)(ids).logits
        ref16 = copy.deepcopy(model).to(torch.bfloat16)
        pat16 = patched(ref16)
        naive = ref16(ids).logits
        got = pat16(ids).logits
        assert naive.dtype == torch.bfloat16 and got.dtype == torch.float32
        assert_close_to_reference(got, truth, dtype=torch.bfloat16, naive=naive, what="bf16 logits")

        out = pat16.generate(ids[:, :8], max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        states = [out.past_key_values.linear_cache[i] for i, t in enumerate(LAYERS) if t == "linear_attention"]
        assert all(s.dtype == torch.float32 for s in states)

        # A cache the unpatched bf16 model filled (bf16 states) is upgraded to fp32 in place.
        prefill = ref16(ids[:, :8], use_cache=True)
        cache = prefill.past_key_values
        assert cache.linear_cache[0].dtype == torch.bfloat16
        nxt = prefill.logits[:, -1:].argmax(-1)
        step = pat16(nxt, past_key_values=cache, use_cache=True)
        assert all(cache.linear_cache[i].dtype == torch.float32
                   for i, t in enumerate(LAYERS) if t == "linear_attention")
        want = ref16(torch.cat([ids[:, :8], nxt], 1)).logits[:, -1:]
        assert rel_err(step.logits, want) < 2e-2


def test_loss_from_head_logprobs(ref, pat):
    ids = ids_of((2, 12), seed=3)
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        want = ref(ids, labels=labels)
        with RecordMM1() as rec:
            got = pat(ids, labels=labels)
        assert "head_logprobs" in rec.ops
        assert got.logits is not None and got.logits.dtype == torch.float32  # eval: logits kept
        assert rel_err(got.loss, want.loss) <= 1e-5
        n = torch.tensor(7.0)
        assert rel_err(pat(ids, labels=labels, num_items_in_batch=n).loss,
                       ref(ids, labels=labels, num_items_in_batch=n).loss) <= 1e-5
        assert pat(ids, labels=labels, skip_logits=True).logits is None
        tup = pat(ids, labels=labels, return_dict=False)
        assert torch.is_tensor(tup[0]) and tup[0].dim() == 0


def test_training_matches_transformers(ref):
    """Every patched op has a backward: a training step through the patched model gives the
    loss and gradients of transformers' own (lightning alone, the fp32 head alone, everything)."""
    ids = ids_of((1, 9), seed=4)
    base = copy.deepcopy(ref).train()
    base.zero_grad()
    want = base(ids, labels=ids).loss
    want.backward()
    for flags in (dict(moe=False, fp32_head=False), dict(lightning=False, moe=False), {}):
        model = patched(ref, **flags).train()
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert rel_err(loss, want) <= 1e-5, flags
        for name, p in base.named_parameters():
            assert rel_err(model.get_parameter(name).grad, p.grad) <= 1e-4, (flags, name)
    with torch.no_grad():  # training mode without gradients: logits skipped with labels
        assert patched(ref).train()(ids, labels=ids).logits is None


def test_class_patch_idempotent_and_revertible(ref):
    from transformers.models.minimax import modeling_minimax as mm

    classes = (mm.MiniMaxLightningAttention, mm.MiniMaxTopKRouter, mm.MiniMaxExperts, mm.MiniMaxForCausalLM)
    originals = [c.__dict__["forward"] for c in classes]
    ids = ids_of((1, 11), seed=5)
    try:
        mm1_tf.apply_mm1_kernels_to_minimax()
        first = [c.__dict__["forward"] for c in classes]
        mm1_tf.apply_mm1_kernels_to_minimax()
        assert [c.__dict__["forward"] for c in classes] == first
        assert all(f is not o for f, o in zip(first, originals))
        assert mm1_tf.patched_pieces() == {"lightning": True, "moe": True, "fp32_head": True}
        model = mm.MiniMaxForCausalLM(ref.config).float().eval()
        model.load_state_dict(ref.state_dict())
        with torch.no_grad(), RecordMM1() as rec:
            got = model(ids).logits
        assert {"lightning_attention", "moe_route", "fused_moe"} <= rec.ops
        mm1_tf.apply_mm1_kernels_to_minimax(moe=False)  # other flags: re-patched
        assert mm.MiniMaxExperts.__dict__["forward"] is originals[2]
    finally:
        mm1_tf.revert_mm1_kernels_to_minimax()
    assert [c.__dict__["forward"] for c in classes] == originals
    assert mm1_tf.patched_pieces() == {"lightning": False, "moe": False, "fp32_head": False}
    with torch.no_grad():
        assert rel_err(got, ref(ids).logits) <= 1e-5


def test_instance_patch_revert_and_arguments(ref):
    m = patched(ref)
    assert "forward" in m.model.layers[0].self_attn.__dict__
    mm1_tf.revert_mm1_kernels(m)
    assert not any("forward" in mod.__dict__ for mod in m.modules())
    with pytest.raises(TypeError, match="MiniMaxForCausalLM"):
        mm1_tf.apply_mm1_kernels(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="lightning"):
        mm1_tf.apply_mm1_kernels(m, lightning=1)


def test_triton_backend_through_the_patch(ref, pat, monkeypatch):
    """The same parity with every op on its Triton kernel (the interpreter on a CPU)."""
    monkeypatch.setenv("MM1_BACKEND", "triton")
    ids = ids_of((1, 10), seed=6)
    kw = dict(max_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        with RecordMM1() as rec:
            got = pat.generate(ids, **kw)
    assert {"lightning_attention", "lightning_decode", "moe_route", "fused_moe"} <= rec.ops
    assert torch.equal(got.sequences, want.sequences)
    for step_got, step_want in zip(got.logits, want.logits):  # the prefill's last row, then decode
        assert rel_err(step_got, step_want) <= 1e-5


def test_experts_follow_transformers_expert_parallel_sentinel(ref, pat):
    """transformers marks an expert on another rank with the id E (its experts skip that one-hot
    class): the patched experts must add exactly zero for it, as the unpatched ones do."""
    mlp_ref = next(m for m in fp64_truth(ref).modules() if type(m).__name__ == "MiniMaxExperts")
    mlp_pat = next(m for m in pat.modules() if type(m).__name__ == "MiniMaxExperts")
    E = mlp_pat.gate_up_proj.shape[0]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, mlp_pat.gate_up_proj.shape[-1], generator=g)
    ids = torch.tensor([[0, E], [E, 2], [1, 3], [E, E], [2, 0]])
    w = torch.rand(5, 2, generator=g)
    want = mlp_ref(x.double(), ids, w.double())
    got = mlp_pat(x, ids, w)
    assert torch.isfinite(got).all()
    assert torch.equal(got[3], torch.zeros_like(got[3]))           # both experts on other ranks
    assert_close_to_reference(got, want, tol=1e-5)

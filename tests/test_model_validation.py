"""Every model-level entry point refuses bad input with a TypeError/ValueError that names the
argument or config field (never a silent wrong answer, never an IndexError from deep inside);
a model built from a config alone holds deterministic weights; model/ uses only mm1_kernels'
public API and its modules import without a cycle."""
import ast
import inspect
import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

from mm1_model import CheckpointError, MiniMaxM1Cache, MiniMaxM1Config, MiniMaxM1ForCausalLM, parse_layers
from mm1_model.checkpoint import SINGLE_NAME, checkpoint_tensors

MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model")
V = 512  # the tiny config's vocabulary


@pytest.fixture(scope="module")
def small():
    """Two layers of the tiny model (one lightning, one softmax): every path, little work."""
    return MiniMaxM1ForCausalLM(MiniMaxM1Config.tiny(layers=[6, 7])).eval()


@pytest.fixture(scope="module")
def saved(small, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("small"))
    small.save_pretrained(path)
    return path


def prefilled(model, num_slots=3, max_len=8, lens=(3, 2)):
    cache = model.new_cache(num_slots, max_len)
    model.prefill([torch.arange(1, n + 1) for n in lens], cache, return_logits=False)
    return cache


# ------------------------------------------------------------------ slot ids
BAD_SLOTS = [
    pytest.param([-1, 0], ValueError, r"slot_ids must be in \[0, 3\)", id="slot-negative"),
    pytest.param([0, 3], ValueError, r"slot_ids must be in \[0, 3\)", id="slot-out-of-range"),
    pytest.param([1, 1], ValueError, r"slot_ids must be distinct.*\[1\]", id="slot-duplicate"),
    pytest.param([0], ValueError, r"slot_ids must give one slot for each of the 2", id="slot-count"),
    pytest.param([0.0, 1.0], TypeError, r"slot_ids must hold integer", id="slot-float"),
    pytest.param(torch.tensor([0.0, 1.0]), TypeError, r"slot_ids must hold integer", id="slot-float-tensor"),
]


@pytest.mark.parametrize("slots, exc, match", BAD_SLOTS)
def test_prefill_refuses_bad_slot_ids(small, slots, exc, match):
    cache = small.new_cache(3, 8)
    with pytest.raises(exc, match=match):
        small.prefill([[1, 2], [3]], cache, slot_ids=slots)
    assert cache.lengths == [0, 0, 0]  # nothing was written


@pytest.mark.parametrize("slots, exc, match", BAD_SLOTS)
def test_decode_refuses_bad_slot_ids(small, slots, exc, match):
    cache = prefilled(small)
    with pytest.raises(exc, match=match):
        small.decode(torch.tensor([1, 2]), cache, slot_ids=slots)
    assert cache.lengths == [3, 2, 0]


def test_decode_refuses_an_empty_slot(small):
    cache = prefilled(small)
    with pytest.raises(ValueError, match=r"slot_ids: decode needs prefilled slots, slot 2"):
        small.decode([5, 6], cache, slot_ids=[0, 2])


def test_cache_reset_refuses_bad_slots(small):
    cache = small.new_cache(2, 4)
    with pytest.raises(ValueError, match=r"slots must be in \[0, 2\)"):
        cache.reset([2])


# ------------------------------------------------------------------ token ids
def _entry(model, name, ids):
    """Call entry point ``name`` with token ids ``ids`` (each entry's own argument shape)."""
    if name == "forward":
        return model(ids)
    if name == "logprobs":
        return model.logprobs(ids)
    if name == "generate":
        return model.generate(ids, max_new_tokens=1)
    if name == "generate-list":
        return model.generate(list(ids), max_new_tokens=1)
    if name == "prefill":
        return model.prefill(list(ids), model.new_cache(len(ids), 8))
    if name == "decode":
        cache = prefilled(model, num_slots=len(ids), lens=(2,) * len(ids))
        return model.decode(ids[:, -1], cache)
    raise AssertionError(name)


ENTRIES = ["forward", "logprobs", "generate", "generate-list", "prefill", "decode"]
ARG = {"forward": "input_ids", "logprobs": "input_ids", "generate": "input_ids",
       "generate-list": r"input_ids\[1\]", "prefill": r"prompts\[1\]", "decode": "tokens"}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("bad", [pytest.param(V, id="id-eq-vocab"), pytest.param(-1, id="id-negative")])
def test_token_ids_outside_the_vocab(small, entry, bad):
    ids = torch.tensor([[1, 2, 3], [4, 5, bad]])
    with pytest.raises(ValueError, match=rf"{ARG[entry]}: token ids must be in \[0, {V}\)"):
        _entry(small, entry, ids)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="float-ids"),
                                   pytest.param(torch.bool, id="bool-ids")])
def test_token_ids_must_be_integers(small, entry, dtype):
    ids = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=dtype)
    arg = ARG[entry].replace(r"\[1\]", r"\[0\]")
    with pytest.raises(TypeError, match=rf"{arg} must hold integer token ids"):
        _entry(small, entry, ids)


def test_float_ids_in_a_python_list(small):
    with pytest.raises(TypeError, match=r"prompts\[0\] must hold integer token ids"):
        small.prefill([[1.0, 2.5]], small.new_cache(1, 8))


@pytest.mark.parametrize("call, exc, match", [
    pytest.param(lambda m: m(torch.tensor([1, 2])), ValueError, r"input_ids must be 2-D", id="forward-1d"),
    pytest.param(lambda m: m(torch.zeros(1, 0, dtype=torch.long)), ValueError, r"input_ids is empty",
                 id="forward-empty"),
    pytest.param(lambda m: m.prefill([], m.new_cache(1, 8)), ValueError, r"prompts is empty", id="prefill-no-prompts"),
    pytest.param(lambda m: m.prefill([[1], []], m.new_cache(2, 8)), ValueError, r"prompts\[1\] is an empty prompt",
                 id="prefill-empty-prompt"),
    pytest.param(lambda m: m.prefill([1, 2, 3], m.new_cache(3, 8)), ValueError, r"prompts\[0\] must be a 1-D",
                 id="prefill-scalar-prompts"),
    pytest.param(lambda m: m.prefill(torch.tensor([1, 2, 3]), m.new_cache(3, 8)), ValueError,
                 r"prompts: a tensor of prompts must be \[N, T\]", id="prefill-1d-tensor"),
    pytest.param(lambda m: m.decode(torch.zeros(0, dtype=torch.long), m.new_cache(1, 8)), ValueError,
                 r"tokens is empty", id="decode-no-tokens"),
    pytest.param(lambda m: m.generate([], max_new_tokens=1), ValueError, r"input_ids is empty",
                 id="generate-no-prompts"),
    pytest.param(lambda m: m.generate([[1], []], max_new_tokens=1), ValueError,
                 r"input_ids\[1\] is an empty prompt", id="generate-empty-prompt"),
    pytest.param(lambda m: m.generate(torch.tensor([1, 2]), max_new_tokens=1), ValueError,
                 r"input_ids must be 2-D", id="generate-1d-tensor"),
])
def test_empty_or_misshapen_prompts(small, call, exc, match):
    with pytest.raises(exc, match=match):
        call(small)


# ------------------------------------------------------------------ generate's own arguments
@pytest.mark.parametrize("kw, exc, match", [
    pytest.param(dict(max_new_tokens=-1), ValueError, r"max_new_tokens must be >= 0", id="max-new-negative"),
    pytest.param(dict(max_new_tokens=2.0), TypeError, r"max_new_tokens must be an int", id="max-new-float"),
    pytest.param(dict(pad_token_id=V), ValueError, r"pad_token_id must be a token id", id="pad-out-of-vocab"),
    pytest.param(dict(stop_tokens=[3, -2]), ValueError, r"stop_tokens must be token ids", id="stop-out-of-vocab"),
])
def test_generate_refuses_bad_arguments(small, kw, exc, match):
    kw.setdefault("max_new_tokens", 1)
    with pytest.raises(exc, match=match):
        small.generate(torch.tensor([[1, 2]]), **kw)


def test_generate_zero_new_tokens_returns_the_prompts(small):
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(small.generate(ids, max_new_tokens=0), ids)


# ------------------------------------------------------------------ backend names
def test_unknown_backend_at_construction():
    with pytest.raises(ValueError, match=r"backend: unknown backend 'cuda2'"):
        MiniMaxM1ForCausalLM(MiniMaxM1Config.tiny(layers=[7]), backend="cuda2")


def test_unknown_backend_when_set(small):
    with pytest.raises(ValueError, match=r"backend: unknown backend 'Triton'"):
        small.backend = "Triton"
    with pytest.raises(TypeError, match=r"backend must be None or one of"):
        small.backend = 3
    assert small.backend is None


def test_unknown_backend_in_from_pretrained(saved):
    with pytest.raises(ValueError, match=r"backend: unknown backend 'gpu'"):
        MiniMaxM1ForCausalLM.from_pretrained(saved, dtype=torch.float32, device="cpu", backend="gpu")


# ------------------------------------------------------------------ caches
@pytest.mark.parametrize("num_slots, max_len, exc, match", [
    pytest.param(-1, 8, ValueError, r"num_slots must be >= 1", id="cache-negative-slots"),
    pytest.param(0, 8, ValueError, r"num_slots must be >= 1", id="cache-zero-slots"),
    pytest.param(2, -4, ValueError, r"max_len must be >= 1", id="cache-negative-len"),
    pytest.param(2, 8.0, TypeError, r"max_len must be an int", id="cache-float-len"),
])
def test_cache_sizes(small, num_slots, max_len, exc, match):
    with pytest.raises(exc, match=match):
        small.new_cache(num_slots, max_len)


def test_cache_with_fewer_slots_than_prompts(small):
    with pytest.raises(ValueError, match=r"cache has 2 slot\(s\), too few for 3 prompts.*num_slots >= 3"):
        small.prefill([[1], [2], [3]], small.new_cache(2, 8))


def test_cache_too_short_for_the_prompt(small):
    with pytest.raises(ValueError, match=r"cache too short: prompt 1 needs 5 positions.*max_len is 4"):
        small.prefill([[1, 2], [1, 2, 3, 4, 5]], small.new_cache(2, 4))


def test_cache_too_short_for_a_new_token(small):
    cache = prefilled(small, num_slots=1, max_len=3, lens=(3,))
    with pytest.raises(ValueError, match=r"cache too short: slot 0 is full \(max_len 3"):
        small.decode([1], cache)


def test_cache_of_another_model(small):
    other = MiniMaxM1Cache(MiniMaxM1Config.tiny(layers=[5, 7]), 1, 8, dtype=small.dtype)
    with pytest.raises(ValueError, match=r"cache was made for another model"):
        small.prefill([[1, 2]], other)
    with pytest.raises(TypeError, match=r"cache must be a MiniMaxM1Cache"):
        small.prefill([[1, 2]], {"keys": None})


# ------------------------------------------------------------------ config fields
def _cfg(**kw):
    return MiniMaxM1Config.tiny(**kw)


BAD_CONFIGS = [
    pytest.param(dict(vocab_size=0), ValueError, "vocab_size must be positive", id="vocab-zero"),
    pytest.param(dict(hidden_size=-64), ValueError, "hidden_size must be positive", id="hidden-negative"),
    pytest.param(dict(intermediate_size=0), ValueError, "intermediate_size must be positive", id="inter-zero"),
    pytest.param(dict(num_local_experts=0, num_experts_per_tok=0), ValueError, "num_local_experts must be positive",
                 id="experts-zero"),
    pytest.param(dict(head_dim=16.0), TypeError, "head_dim must be an int", id="head-dim-float"),
    pytest.param(dict(num_experts_per_tok=5), ValueError, r"num_experts_per_tok \(5\) must be <= num_local_experts",
                 id="topk-over-experts"),
    pytest.param(dict(num_key_value_heads=3), ValueError, r"num_attention_heads \(4\) must be a multiple of "
                 r"num_key_value_heads \(3\)", id="heads-not-divisible"),
    pytest.param(dict(rotary_dim=7), ValueError, "rotary_dim must be even", id="rotary-odd"),
    pytest.param(dict(rms_norm_eps=0.0), ValueError, "rms_norm_eps must be finite and > 0", id="eps-zero"),
    pytest.param(dict(lightning_norm_eps=-1e-6), ValueError, "lightning_norm_eps must be finite and > 0",
                 id="lightning-eps-negative"),
    pytest.param(dict(rope_theta=0.0), ValueError, "rope_theta must be finite and > 0", id="rope-theta-zero"),
    pytest.param(dict(rope_theta=math.inf), ValueError, "rope_theta must be finite", id="rope-theta-inf"),
    pytest.param(dict(layernorm_mlp_alpha=math.nan), ValueError, "layernorm_mlp_alpha must be a finite",
                 id="alpha-nan"),
    pytest.param(dict(attn_type_list=[0] * 7), ValueError, r"attn_type_list has 7 entries for num_hidden_layers=8",
                 id="types-length"),
    pytest.param(dict(attn_type_list=[0] * 7 + [2]), ValueError, r"attn_type_list values must be 0.*got 2 at index 7",
                 id="types-value"),
    pytest.param(dict(hidden_act="gelu"), ValueError, "hidden_act must be 'silu'", id="act-not-silu"),
    pytest.param(dict(layers=[3, 3]), ValueError, "layers must be distinct", id="config-layers-duplicate"),
    pytest.param(dict(layers=[8]), ValueError, r"layers must be distinct indices in \[0, 8\)",
                 id="config-layers-range"),
    pytest.param(dict(layers=[3, 1]), ValueError, "layers must be in increasing order", id="config-layers-order"),
    pytest.param(dict(postnorm="no"), TypeError, "postnorm must be a bool", id="postnorm-not-bool"),
    pytest.param(dict(tie_word_embeddings=True), NotImplementedError, "tie_word_embeddings", id="tied-embeddings"),
    pytest.param(dict(sliding_window=4096), NotImplementedError, "sliding_window", id="sliding-window"),
    pytest.param(dict(shared_intermediate_size=64), NotImplementedError, "shared experts", id="shared-experts"),
]


@pytest.mark.parametrize("kw, exc, match", BAD_CONFIGS)
def test_config_refuses_bad_fields(kw, exc, match):
    with pytest.raises(exc, match=match):
        _cfg(**kw)


def test_config_changed_after_construction_is_checked_by_the_model():
    cfg = _cfg(layers=[7])
    cfg.num_experts_per_tok = 9
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MiniMaxM1ForCausalLM(cfg)


@pytest.mark.parametrize("field, value", [pytest.param("rope_theta", 0, id="json-rope-theta"),
                                          pytest.param("num_key_value_heads", 3, id="json-kv-heads"),
                                          pytest.param("rms_norm_eps", -1.0, id="json-eps")])
def test_config_json_refused_naming_the_field(saved, tmp_path, field, value):
    d = json.load(open(os.path.join(saved, "config.json")))
    d[field] = value
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=rf"config.json: .*{field}"):
        MiniMaxM1Config.from_pretrained(str(tmp_path))
    for f in os.listdir(saved):
        if f != "config.json":
            os.symlink(os.path.join(saved, f), tmp_path / f)
    with pytest.raises(CheckpointError, match=rf"config.json: .*{field}"):
        MiniMaxM1ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, device="cpu")


def test_transformers_layer_types_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"layer_types values must be one of"):
        MiniMaxM1Config.from_dict({"model_type": "minimax", "num_hidden_layers": 2,
                                   "layer_types": ["linear_attention", "sliding_attention"]})


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("dtype", [pytest.param(torch.int32, id="stored-int"),
                                   pytest.param(torch.bool, id="stored-bool")])
def test_floating_weight_stored_as_int_or_bool(small, tmp_path, dtype):
    key = "model.layers.7.self_attn.q_proj.weight"
    tensors = {n: t.detach().contiguous() for n, t in checkpoint_tensors(small)}
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, str(tmp_path / SINGLE_NAME))
    small.config.save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' in .* is stored as (I32|BOOL)"):
        MiniMaxM1ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("layers, exc, match", [
    pytest.param([6, 6], ValueError, r"layers must not repeat an index, got \[6\]", id="layers-duplicate"),
    pytest.param([6, 8], ValueError, r"layers must be a non-empty selection within \[0, 8\)", id="layers-out-of-range"),
    pytest.param([-1], ValueError, r"layers must be a non-empty selection", id="layers-negative"),
    pytest.param("5:5", ValueError, r"layers must be a non-empty selection", id="layers-empty"),
    pytest.param("6-7", ValueError, r"layers must look like 'a:b'", id="layers-bad-string"),
    pytest.param([6.0], TypeError, r"layers must be an int", id="layers-float"),
])
def test_layers_refused(saved, layers, exc, match):
    with pytest.raises(exc, match=match):
        parse_layers(layers, 8)
    with pytest.raises(exc, match=match):
        MiniMaxM1ForCausalLM.from_pretrained(saved, dtype=torch.float32, device="cpu", layers=layers)


def test_from_pretrained_dtype_must_be_floating(saved):
    with pytest.raises(TypeError, match=r"dtype must be a floating torch.dtype"):
        MiniMaxM1ForCausalLM.from_pretrained(saved, dtype=torch.int8, device="cpu")


def test_from_pretrained_defaults_to_a_device_that_exists(saved):
    assert inspect.signature(MiniMaxM1ForCausalLM.from_pretrained).parameters["device"].default is None
    m = MiniMaxM1ForCausalLM.from_pretrained(saved, dtype=torch.float32)
    assert m.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------ a model from a config alone
def test_config_only_model_is_initialized_deterministically(poison_outputs):
    """torch.empty is poisoned with NaN here: a weight the init forgot would show."""
    cfg = MiniMaxM1Config.tiny(layers=[6, 7])
    a, b = MiniMaxM1ForCausalLM(cfg), MiniMaxM1ForCausalLM(cfg)
    torch.manual_seed(123)  # the global RNG plays no part
    c = MiniMaxM1ForCausalLM(cfg)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, q) and torch.equal(p, r), name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() / cfg.initializer_range - 1) < 0.2, name
    out = a(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_init_weights_refills_int8_experts():
    m = MiniMaxM1ForCausalLM(MiniMaxM1Config.tiny(layers=[7])).quantize_experts_()
    moe = m.model.layers[0].block_sparse_moe
    before = moe.w13.clone()
    m.init_weights_(seed=1)
    assert moe.w13.dtype == torch.int8 and not torch.equal(moe.w13, before)
    assert torch.isfinite(moe.w13_scale).all()


# ------------------------------------------------------------------ structure of model/
def _imports(path):
    tree = ast.parse(open(path).read())
    for node in tree.body:  # module level only: a lazy import inside a function cannot cycle at import
        if isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield 0, a.name, []


def test_model_modules_import_without_a_cycle():
    graph = {}
    for fn in os.listdir(MODEL_DIR):
        if fn.endswith(".py"):
            deps = _imports(os.path.join(MODEL_DIR, fn))
            graph[fn[:-3]] = {(mod or names[0]).split(".")[0] for level, mod, names in deps if level == 1}
    state = {}

    def visit(m, path):
        assert state.get(m) != "open", f"import cycle in model/: {' -> '.join(path + [m])}"
        if state.get(m) is None:
            state[m] = "open"
            for dep in graph.get(m, ()):
                visit(dep, path + [m])
            state[m] = "done"
    for m in graph:
        visit(m, [])
    assert "modeling" not in graph["generation"]

"""M1's checkpoint format: round trip, original and transformers key names, layer ranges, dtype,
int8 on load, and a clear error for every kind of broken checkpoint."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mm1_model import CheckpointError, MiniMaxM1Config, MiniMaxM1ForCausalLM, expected_keys
from mm1_model.checkpoint import checkpoint_tensors


@pytest.fixture(scope="module")
def tiny():
    return MiniMaxM1ForCausalLM(MiniMaxM1Config.tiny()).float().init_random_(1).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt"))
    tiny.save_pretrained(path, max_shard_size=200_000)  # several shards
    return path


def load(path, **kw):
    kw.setdefault("dtype", torch.float32)
    return MiniMaxM1ForCausalLM.from_pretrained(path, device="cpu", **kw)


def test_round_trip_is_exact(tiny, saved, ids):
    files = sorted(f for f in os.listdir(saved) if f.endswith(".safetensors"))
    assert len(files) > 2 and files[0].startswith("model-00001-of-")
    index = json.load(open(os.path.join(saved, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(expected_keys(tiny.config))  # M1's original names
    cfg = json.load(open(os.path.join(saved, "config.json")))
    assert cfg["attn_type_list"] == tiny.config.attn_type_list and "layernorm_mlp_alpha" in cfg
    m = load(saved)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, tiny(ids).logits)
    for (n1, t1), (n2, t2) in zip(checkpoint_tensors(m), checkpoint_tensors(tiny)):
        assert n1 == n2 and torch.equal(t1, t2)


def test_loads_hand_written_original_format(tiny, tmp_path, ids):
    """A checkpoint laid out like the published one: M1's config.json, original key names
    (per-expert w1/w2/w3), shards in arbitrary order, and the index."""
    tensors = {n: t.detach().clone() for n, t in checkpoint_tensors(tiny)}
    names = sorted(tensors)[::-1]
    shards = [names[0::3], names[1::3], names[2::3]]
    weight_map = {}
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in shard}, str(tmp_path / fn), metadata={"format": "pt"})
        weight_map.update({n: fn for n in shard})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = tiny.config.to_dict()
    cfg["auto_map"] = {"AutoConfig": "configuration_minimax_m1.MiniMaxM1Config"}  # unknown fields are ignored
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = load(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, tiny(ids).logits)


def _write_transformers_layout(tiny, tmp_path):
    sd = {}
    for k, v in tiny.state_dict().items():
        k = k.replace("block_sparse_moe.gate.", "mlp.gate.")
        k = k.replace("block_sparse_moe.w13", "mlp.experts.gate_up_proj")
        k = k.replace("block_sparse_moe.w2", "mlp.experts.down_proj")
        sd[k] = v.clone()
    sd["model.layers.0.self_attn.slope_rate"] = torch.ones(4, 1, 1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    c = tiny.config
    hf = {"model_type": "minimax", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
          "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
          "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
          "head_dim": c.head_dim, "num_local_experts": c.num_local_experts, "num_experts_per_tok": 2,
          "layer_types": ["full_attention" if t else "linear_attention" for t in c.attn_type_list],
          "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
          "full_attn_alpha_factor": c.layernorm_full_attention_alpha,
          "linear_attn_alpha_factor": c.layernorm_linear_attention_alpha,
          "mlp_alpha_factor": c.layernorm_mlp_alpha, "rms_norm_eps": c.rms_norm_eps}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return str(tmp_path)


def test_loads_transformers_renamed_keys(tiny, tmp_path, ids):
    """transformers v5 names: mlp.gate, stacked mlp.experts.gate_up_proj / down_proj, plus the
    derived buffers it keeps in its state dict; and its renamed config fields."""
    c = tiny.config
    m = load(_write_transformers_layout(tiny, tmp_path))
    assert m.config.rotary_dim == c.head_dim  # transformers' port rotates the whole head
    m.model.layers[7].self_attn.rotary_dim = c.rotary_dim  # same weights, M1's partial rotary
    m.model.layers[7].self_attn.inv_freq = tiny.model.layers[7].self_attn.inv_freq
    with torch.no_grad():
        assert torch.equal(m(ids).logits, tiny(ids).logits)


def test_layer_range(tiny, saved, ids):
    m = load(saved, layers="2:8")
    assert [layer.layer_idx for layer in m.model.layers] == list(range(2, 8))
    assert m.config.num_hidden_layers == 8
    for layer, ref in zip(m.model.layers, tiny.model.layers[2:]):
        assert torch.equal(layer.self_attn.slopes if layer.is_lightning else layer.self_attn.inv_freq,
                           ref.self_attn.slopes if ref.is_lightning else ref.self_attn.inv_freq)
        for (n1, p1), (n2, p2) in zip(layer.named_parameters(), ref.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
    # a saved slice is a slice of the 8-layer checkpoint: global indices, reloadable, sub-sliceable
    out = os.path.join(saved + "-slice")
    m.save_pretrained(out)
    assert "model.layers.7.self_attn.q_proj.weight" in json.load(
        open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    m2 = load(out, layers=[6, 7])
    with torch.no_grad():
        m3 = load(saved, layers=(6, 8))
        assert torch.equal(m2(ids).logits, m3(ids).logits)
    with pytest.raises(CheckpointError, match=r"layers \[1\] are not in the checkpoint"):
        load(out, layers="1:3")


def test_dtype_conversion_and_int8_on_load(tiny, saved, ids):
    m = load(saved, dtype=torch.bfloat16)
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert m.model.layers[0].block_sparse_moe.gate.weight.dtype == torch.float32
    assert m.model.layers[0].self_attn.slopes.dtype == torch.float32
    q = load(saved, quantize_experts=True)
    ref = load(saved).quantize_experts_()
    for lq, lr in zip(q.model.layers, ref.model.layers):
        assert lq.block_sparse_moe.w13.dtype == torch.int8
        for name in ("w13", "w2", "w13_scale", "w2_scale"):
            assert torch.equal(getattr(lq.block_sparse_moe, name), getattr(lr.block_sparse_moe, name))
    with torch.no_grad():
        assert torch.equal(q(ids).logits, ref(ids).logits)


def test_transformers_stacked_experts_int8_on_load(tiny, tmp_path):
    """The stacked layout is read expert by expert and quantized on load exactly like
    quantize_experts_() (its down_proj arrives before gate_up_proj: every expert waits for it)."""
    path = _write_transformers_layout(tiny, tmp_path)
    q = load(path, quantize_experts=True)
    ref = load(path).quantize_experts_()
    for lq, lr in zip(q.model.layers, ref.model.layers):
        for name in ("w13", "w2", "w13_scale", "w2_scale"):
            assert torch.equal(getattr(lq.block_sparse_moe, name), getattr(lr.block_sparse_moe, name))


# ------------------------------------------------------------------ broken checkpoints
def _copy(src, dst):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return dst


def _rewrite_shard(path, key, fn):
    """Apply ``fn(dict)`` to the shard holding ``key``; returns that shard's file name."""
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    shard = index["weight_map"][key]
    with safe_open(os.path.join(path, shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors, index)
    save_file(tensors, os.path.join(path, shard))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return shard


KEY = "model.layers.3.self_attn.qkv_proj.weight"


def test_missing_tensor(saved, tmp_path):
    p = _copy(saved, str(tmp_path / "c"))

    def drop(t, index):
        del t[KEY]
        del index["weight_map"][KEY]
    _rewrite_shard(p, KEY, drop)
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*qkv_proj"):
        load(p)
    load(p, layers="4:8")  # a range that does not need it loads


def test_index_names_a_tensor_the_file_lacks(saved, tmp_path):
    p = _copy(saved, str(tmp_path / "c"))
    shard = _rewrite_shard(p, KEY, lambda t, index: t.pop(KEY))
    with pytest.raises(CheckpointError, match=rf"{KEY}.*{shard}.*does not hold it"):
        load(p)


def test_unexpected_tensor(saved, tmp_path):
    p = _copy(saved, str(tmp_path / "c"))
    bogus = "model.layers.3.self_attn.bogus.weight"

    def add(t, index):
        t[bogus] = torch.zeros(3)
        index["weight_map"][bogus] = index["weight_map"][KEY]
    shard = _rewrite_shard(p, KEY, add)
    with pytest.raises(CheckpointError, match=rf"unexpected tensor '{bogus}' in .*{shard}"):
        load(p)


def test_misshapen_tensor(saved, tmp_path):
    p = _copy(saved, str(tmp_path / "c"))
    key = "model.layers.7.block_sparse_moe.experts.2.w3.weight"

    def shrink(t, index):
        t[key] = t[key][:-1].clone()
    shard = _rewrite_shard(p, key, shrink)
    with pytest.raises(CheckpointError, match=rf"'{key}' in .*{shard} has shape \[95, 64\], expected \[96, 64\]"):
        load(p)


def test_broken_index(saved, tmp_path):
    p = _copy(saved, str(tmp_path / "c"))
    index = os.path.join(p, "model.safetensors.index.json")
    text = open(index).read()
    open(index, "w").write(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="broken index .*model.safetensors.index.json"):
        load(p)
    open(index, "w").write(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="broken index"):
        load(p)
    wm = json.loads(text)
    wm["weight_map"][KEY] = "model-00099-of-00099.safetensors"
    open(index, "w").write(json.dumps(wm))
    with pytest.raises(CheckpointError, match=rf"{KEY}.*model-00099-of-00099.safetensors.*does not exist"):
        load(p)


def test_truncated_file(saved, tmp_path):
    p = _copy(saved, str(tmp_path / "c"))
    shard = json.load(open(os.path.join(p, "model.safetensors.index.json")))["weight_map"][KEY]
    data = open(os.path.join(p, shard), "rb").read()
    open(os.path.join(p, shard), "wb").write(data[:-100])
    with pytest.raises(CheckpointError, match=rf"{shard} \(truncated or corrupt\?\)"):
        load(p)


def test_never_unpickles(tmp_path, tiny):
    torch.save({"x": torch.zeros(1)}, str(tmp_path / "pytorch_model.bin"))
    tiny.config.save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="pickle files .*never loaded"):
        load(str(tmp_path))
    with pytest.raises(CheckpointError, match="does not exist"):
        load(str(tmp_path / "nowhere"))

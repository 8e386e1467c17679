"""Tensor and expert parallelism on torch.distributed (gloo on CPU, world sizes spawned here).

The tiny model is saved with ``save_pretrained`` and loaded at W = 2 and 4 ranks, tensor
parallel (TP) and expert parallel (EP); each world size is spawned once and runs every case,
saving what it computed; the tests compare that with the unsharded model in this process:
every rank's parameters are bitwise the unsharded model's slices (int8 experts included),
each rank reads from the checkpoint exactly the elements it holds, logits / logprobs / the
FP32 head's statistics and gradients match to fp32 tolerance and are bitwise the same on every
rank, greedy and sampled tokens are identical on every rank (and equal the unsharded ones).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

import mm1_kernels as mk
from mm1_model import MiniMaxM1Config, MiniMaxM1ForCausalLM
from mm1_model import checkpoint as ckpt_mod
from mm1_model.parallel import TensorParallel, collective_bytes_per_token, per_rank_memory

from numerics import TOL, rel_err

F32 = TOL[torch.float32]
IDS = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(3))
PROMPTS = [torch.tensor([5, 77, 300, 2]), torch.tensor([9, 411]), torch.tensor([100, 101, 102])]
T_HEAD = 6
# (name, from_pretrained keyword arguments); the head and generation checks run in every case.
# hf_*: transformers' layout (stacked gate_up_proj / down_proj experts, read expert by expert).
CASES = {2: [("tp", {}), ("ep", {"expert_parallel": True}), ("tp_int8", {"quantize_experts": True}),
             ("hf_tp_int8", {"quantize_experts": True}), ("hf_ep", {"expert_parallel": True}),
             ("tp_triton", {"backend": "triton"})],  # the Triton kernels (interpreter) on the shards
         4: [("tp", {}), ("ep", {"expert_parallel": True})]}


def _head_inputs(cfg):
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(T_HEAD, cfg.hidden_size, generator=g)
    targets = torch.randint(0, cfg.vocab_size, (T_HEAD,), generator=g)
    targets[2] = -100
    coef = torch.randn(3, T_HEAD, generator=g)
    return hidden, targets, coef


def _head(ops, hidden, weight, targets, coef, backend):
    h = hidden.clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = ops.head_logprobs(h, w, targets, temperature=0.7, backend=backend)
    ((out.logprobs * coef[0]).sum() + (out.lse * coef[1]).sum() + (out.entropy * coef[2]).sum()).backward()
    return [t.detach() for t in out] + [h.grad, w.grad]


def _outputs(model, rank=0, full=True, triton_head=False):
    """What a case computes, sharded or not (``full``: also sampling and the head)."""
    out = {}
    with torch.no_grad():
        out["logits"] = model(IDS).logits
        if model.backend == "triton":  # the interpreter is slow: the forward only
            return out
        out["logprobs"] = model.logprobs(IDS)
    out["greedy"] = model.generate(PROMPTS, max_new_tokens=3)
    if not full:
        return out
    cache = model.new_cache(len(PROMPTS), 8)
    out["prefill"] = model.prefill(PROMPTS, cache).logits
    out["decode"] = model.decode(out["prefill"].argmax(-1), cache).logits
    out["sampled"] = model.generate(PROMPTS, max_new_tokens=2, temperature=1.0, top_p=0.9,
                                    generator=torch.Generator().manual_seed(7))
    hidden, targets, coef = _head_inputs(model.config)
    # per-rank seeds: the ranks still agree (rank 0's draw is broadcast)
    out["sampled_own_seed"] = model.head_ops.head_sample(hidden, model.lm_head.weight, temperature=1.0, top_k=50,
                                                         generator=torch.Generator().manual_seed(100 + rank))
    out["head"] = _head(model.head_ops, hidden, model.lm_head.weight, targets, coef, "torch")
    h, w = hidden.clone().requires_grad_(), model.lm_head.weight.detach().clone().requires_grad_()
    loss = model.head_ops.head_cispo_loss(h, w, targets, old_logprobs=coef[0] - 6.0, advantages=coef[1],
                                          eps_low=0.2, backend="torch")
    loss.backward()
    out["cispo"] = [loss.detach(), h.grad, w.grad]
    if triton_head:  # the Triton head kernels (interpreter) under the vocabulary-parallel merge
        out["head_triton"] = _head(model.head_ops, hidden, model.lm_head.weight, targets, coef, "triton")
    return out


class _Recorder:
    """A safetensors file handle that counts the elements read through it."""

    def __init__(self, f, log):
        self.f, self.log = f, log

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, key):
        t = self.f.get_tensor(key)
        self.log.append(t.numel())
        return t

    def get_slice(self, key):
        return _RecordedSlice(self.f.get_slice(key), self.log)


class _RecordedSlice:
    def __init__(self, s, log):
        self.s, self.log = s, log

    def get_dtype(self):
        return self.s.get_dtype()

    def get_shape(self):
        return self.s.get_shape()

    def __getitem__(self, idx):
        t = self.s[idx]
        self.log.append(t.numel())
        return t


def _worker(rank, world, paths, out_dir, init_file):
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):  # loopback: no dependence on how the host name resolves
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        opened = ckpt_mod._open
        for name, kw in CASES[world]:
            log = []
            ckpt_mod._open = lambda file: _Recorder(opened(file), log)
            try:
                model = MiniMaxM1ForCausalLM.from_pretrained(paths[name.startswith("hf_")], dtype=torch.float32,
                                                             device="cpu", tensor_parallel_size=world, **kw)
            finally:
                ckpt_mod._open = opened
            model.tp.comm_bytes.clear()  # one trunk forward: what collective_bytes_per_token predicts
            with torch.no_grad():
                model(IDS, return_logits=False)
            comm = dict(model.tp.comm_bytes)
            r = _outputs(model, rank, full=name == "tp", triton_head=name == "tp" and world == 2)
            r["comm"] = comm
            r["read"] = sum(log)
            r["state"] = {k: v.clone() for k, v in model.state_dict().items()}
            r["cache_heads"] = model.new_cache(1, 4).layout[2:]
            if name == "tp":  # built from a config: the rank's slices of the unsharded init
                cfg = MiniMaxM1Config.tiny()
                with torch.no_grad():
                    r["from_config"] = MiniMaxM1ForCausalLM(cfg, tensor_parallel_size=world)(IDS).logits
                # training through the sharded layers: gradients of a sharded and a replicated weight
                model.zero_grad()
                model.logprobs(IDS).sum().backward()
                r["grads"] = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
            results[name] = r
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny model's checkpoint (M1's layout, several shards), and the same weights in
    transformers' layout (one file, stacked experts), as a pair of paths."""
    model = MiniMaxM1ForCausalLM(MiniMaxM1Config.tiny()).float().init_random_(1).eval()
    path = str(tmp_path_factory.mktemp("tiny_tp"))
    model.save_pretrained(path, max_shard_size=300_000)
    hf = str(tmp_path_factory.mktemp("tiny_tp_hf"))
    model.config.save_pretrained(hf)
    renamed = {"block_sparse_moe.gate.": "mlp.gate.", "block_sparse_moe.w13": "mlp.experts.gate_up_proj",
               "block_sparse_moe.w2": "mlp.experts.down_proj"}
    sd = {}
    for k, v in model.state_dict().items():
        for old, new in renamed.items():
            k = k.replace(old, new)
        sd[k] = v.clone()
    save_file(sd, os.path.join(hf, "model.safetensors"))
    return path, hf


def _load(path, **kw):
    return MiniMaxM1ForCausalLM.from_pretrained(path, dtype=torch.float32, device="cpu", **kw)


@pytest.fixture(scope="module")
def reference(saved):
    """The unsharded model's outputs, per case kind (float / int8 experts)."""
    refs = {}
    for kind, kw in (("float", {}), ("int8", {"quantize_experts": True}), ("triton", {"backend": "triton"})):
        model = _load(saved[0], **kw)
        refs[kind] = {"model": model, **_outputs(model, full=kind == "float", triton_head=kind == "float")}
        if kind == "float":
            model.zero_grad()
            model.logprobs(IDS).sum().backward()
            refs[kind]["grads"] = {k: p.grad.clone() for k, p in model.named_parameters()}
    return refs


_RUNS = {}


def _spawned(world, path):
    """Every rank's results for ``world`` ranks (one spawned group per world size)."""
    if world not in _RUNS:
        out_dir = tempfile.mkdtemp(prefix=f"mm1_tp{world}_")
        mp.spawn(_worker, args=(world, path, out_dir, os.path.join(out_dir, "rendezvous")), nprocs=world)
        _RUNS[world] = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    return _RUNS[world]


def _cut(t, spec):
    """The unsharded tensor's slice that ``spec`` names (the whole tensor for None)."""
    if spec is None:
        return t
    dim, ranges = spec
    return torch.cat([t.narrow(dim, a, b - a) for a, b in ranges], dim)


def _ref_kind(case):
    return "int8" if case.endswith("int8") else "triton" if case.endswith("triton") else "float"


PARAMS = [(w, name) for w in sorted(CASES) for name, _ in CASES[w]]


@pytest.mark.parametrize("world,case", PARAMS)
def test_each_rank_holds_and_reads_only_its_slices(saved, reference, world, case):
    ranks = _spawned(world, saved)
    ref = reference[_ref_kind(case)]["model"]
    cfg = ref.config
    full = dict(ref.state_dict())
    for rank, res in enumerate(ranks):
        r = res[case]
        tp = TensorParallel(cfg, world, rank, expert_parallel=case.endswith("ep"))
        assert set(r["state"]) == set(full)
        for name, t in r["state"].items():
            assert torch.equal(t, _cut(full[name], tp.spec(name))), \
                f"rank {rank} {case}: {name} is not its slice of the unsharded model"
        # Exactly the elements this rank holds were read (norms and routers are replicated).
        held = sum(t.numel() for n, t in r["state"].items() if not n.endswith("_scale"))
        assert r["read"] == held, f"rank {rank} read {r['read']} elements from the checkpoint, holds {held}"
        (h0, h1), (k0, k1) = tp.heads, tp.kv_heads
        assert r["cache_heads"] == (h1 - h0, cfg.head_dim, k1 - k0)


@pytest.mark.parametrize("world,case", PARAMS)
def test_collective_bytes_are_what_the_model_benchmark_counts(saved, reference, world, case):
    """Every rank's all-reduce bytes for one trunk forward equal the analytic count the model
    benchmark reports (bytes per token and layer), in tensor- and expert-parallel layouts."""
    ranks = _spawned(world, saved)
    cfg = reference[_ref_kind(case)]["model"].config
    c = collective_bytes_per_token(cfg, world, act_bytes=4)  # the tests load fp32
    tokens, layers = IDS.numel(), len(cfg.layer_ids)
    for rank, res in enumerate(ranks):
        comm = res[case]["comm"]
        assert sum(comm.values()) == tokens * (layers * c["per_layer"] + c["embedding"]), (rank, case, comm)
        assert comm["lightning_norm"] == tokens * 4 * sum(cfg.is_lightning(i) for i in cfg.layer_ids)
    assert collective_bytes_per_token(cfg, 1)["per_layer"] == 0


@pytest.mark.parametrize("world,case", PARAMS)
def test_every_rank_returns_the_unsharded_results(saved, reference, world, case):
    ranks = _spawned(world, saved)
    ref = reference[_ref_kind(case)]
    for rank, res in enumerate(ranks):
        r = res[case]
        r0 = ranks[0][case]
        assert rel_err(r["logits"], ref["logits"]) <= F32, (rank, case)
        assert torch.equal(r["logits"], r0["logits"])  # bitwise the same on every rank
        if case.endswith("triton"):
            continue
        assert rel_err(r["logprobs"], ref["logprobs"]) <= F32, (rank, case)
        assert all(torch.equal(a, b) for a, b in zip(r["greedy"], ref["greedy"])), (rank, case)
        assert torch.equal(r["logprobs"], r0["logprobs"])
        if case == "tp":  # sampling: the unsharded tokens for the same seed; one answer for any seeds
            for step in ("prefill", "decode"):  # the cached path's logits, from the local-head cache
                assert rel_err(r[step], ref[step]) <= F32 and torch.equal(r[step], r0[step]), (rank, step)
            assert all(torch.equal(a, b) for a, b in zip(r["sampled"], ref["sampled"])), rank
            assert all(torch.equal(a, b) for a, b in zip(r["sampled_own_seed"], r0["sampled_own_seed"]))


@pytest.mark.parametrize("world,case,head", [(w, "tp", "head") for w in CASES] + [(2, "tp", "head_triton")])
def test_vocab_parallel_head_and_its_gradients(saved, reference, world, case, head):
    ranks = _spawned(world, saved)
    ref = reference[_ref_kind(case)][head]
    V = reference["float"]["model"].config.vocab_size
    for rank, res in enumerate(ranks):
        lp, lse, ent, dh, dw = res[case][head]
        for got, want in ((lp, ref[0]), (lse, ref[1]), (ent, ref[2]), (dh, ref[3])):
            assert rel_err(got, want) <= F32, (rank, case)
        v0 = rank * V // world
        assert rel_err(dw, ref[4][v0:v0 + V // world]) <= F32, (rank, case)
        for got, want in zip(res[case][head][:3], ranks[0][case][head][:3]):
            assert torch.equal(got, want)  # every rank merges the same statistics in the same order
        if head == "head":  # the CISPO loss on the vocabulary-parallel head, and its gradients
            loss, dh, dw = res[case]["cispo"]
            want = reference["float"]["cispo"]
            assert rel_err(loss, want[0]) <= F32 and rel_err(dh, want[1]) <= F32
            assert rel_err(dw, want[2][v0:v0 + V // world]) <= F32


@pytest.mark.parametrize("world", sorted(CASES))
def test_built_from_a_config_and_trained_through_the_shards(saved, reference, world):
    ranks = _spawned(world, saved)
    cfg = MiniMaxM1Config.tiny()
    with torch.no_grad():
        want = MiniMaxM1ForCausalLM(cfg)(IDS).logits
    ref = reference["float"]
    for rank, res in enumerate(ranks):
        assert rel_err(res["tp"]["from_config"], want) <= F32
        tp = TensorParallel(cfg, world, rank)
        grads = res["tp"]["grads"]
        assert set(grads) == set(ref["grads"])
        for name, g in grads.items():
            assert rel_err(g, _cut(ref["grads"][name], tp.spec(name))) <= F32, f"rank {rank}: gradient of {name}"


def test_size_one_is_the_unsharded_model(saved, reference):
    m = _load(saved[0], tensor_parallel_size=1)
    assert m.tp is None and m.head_ops is mk
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, reference["float"]["logits"])


def test_refusals_name_the_argument(capsys):
    cfg = MiniMaxM1Config.tiny()
    with pytest.raises(RuntimeError, match="tensor_parallel_size=2 needs an initialized"):
        MiniMaxM1ForCausalLM(cfg, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="num_attention_heads"):
        TensorParallel(cfg, 8, 0)
    with pytest.raises(ValueError, match="num_local_experts"):
        TensorParallel(MiniMaxM1Config.tiny(num_attention_heads=8, num_key_value_heads=2), 8, 0,
                       expert_parallel=True)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        MiniMaxM1ForCausalLM(cfg, tensor_parallel_size=0)
    with pytest.raises(ValueError, match="expert_parallel=True needs tensor_parallel_size > 1"):
        MiniMaxM1ForCausalLM(cfg, expert_parallel=True)
    with pytest.raises(ValueError, match="consistent=True needs tensor_parallel_size=1"):
        MiniMaxM1ForCausalLM(cfg, tensor_parallel_size=2, consistent=True)
    from mm1_model.__main__ import main
    for argv, what in ((["--tp", "0"], "--tp must be"), (["--ep"], "--ep needs --tp")):
        with pytest.raises(SystemExit):
            main(argv)
        assert what in capsys.readouterr().err


def test_per_rank_memory_of_the_full_model():
    """The README's table: M1 at TP=8, from the sharded meta model, against a count by hand."""
    cfg = MiniMaxM1Config.full()
    E, I, Hd, L, V = (cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size,
                      cfg.num_hidden_layers, cfg.vocab_size)
    mem = per_rank_memory(cfg, 8)
    # int8 w13 and w2 slices (1 byte each) plus fp32 scales: w13's rows, w2's full rows.
    assert mem["experts"] == L * E * (3 * (I // 8) * Hd + 2 * (I // 8) * 4 + Hd * 4)
    assert 54e9 < L * E * 3 * I * Hd / 8 < 55e9  # the 54 B expert parameters per GPU
    assert mem["embed_head"] == 2 * (V // 8) * Hd * 2
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    gib, h100, h200 = 2**30, 81559 * 2**20, 143771 * 2**20
    for label, kw in (("int8 experts", {}), ("int8 experts, `--ep`", {"expert_parallel": True}),
                      ("bf16 experts", {"int8_experts": False})):
        m = per_rank_memory(cfg, 8, **kw)
        left = [f"{(cap - m['weights']) / gib:.1f} GiB" if cap > m["weights"] else "does not fit"
                for cap in (h100, h200)]
        row = (f"| {label} | {m['experts'] / gib:.2f} GiB | {m['attention'] / gib:.2f} GiB | "
               f"{m['embed_head'] / gib:.2f} GiB | {m['other'] / gib:.2f} GiB | **{m['weights'] / gib:.2f} GiB** | "
               f"{left[0]} | {left[1]} |")
        assert row in readme, row

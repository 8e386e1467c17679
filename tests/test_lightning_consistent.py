"""Consistent mode for lightning attention (docs/m1_math.md §3.6): every token's output from the
slot-cached step (prefill, continued prefill, decode, in any batch and slot) is bitwise the one
``lightning_attention(whole_sequence, consistent=True)`` gives it, on each backend."""
import pytest
import torch

import mm1_kernels as mk
from mm1_kernels.lightning import triton_prefill

H, D, DV = 2, 16, 32
C = mk.LIGHTNING_CHUNK
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Triton: the interpreter on CPU
BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16]


def _qkv(T, dtype, seed, B=1):
    g = torch.Generator().manual_seed(seed)
    # silu-like inputs (the model's): mostly positive, some negative, so signs and cancellation vary
    q, k = (torch.nn.functional.silu(torch.randn(B, T, H, D, generator=g) * 2).to(DEV, dtype) for _ in range(2))
    v = torch.nn.functional.silu(torch.randn(B, T, H, DV, generator=g) * 2).to(DEV, dtype)
    return q, k, v


def _slopes():
    return mk.lightning_slopes(H, 1, 4).to(DEV)


def _single_pass(q, k, v, backend):
    return mk.lightning_attention(q, k, v, _slopes(), backend=backend, consistent=True)[0]


class Cache:
    """A consistent-mode slot cache as an engine holds it: states, partial chunks, host lengths."""

    def __init__(self, slots, dtype):
        self.state = torch.zeros(slots, H, D, DV, device=DEV)
        # Garbage in unused rows: the step must never read a row past a slot's partial length.
        self.pk = torch.full((slots, C, H, D), float("nan"), dtype=dtype, device=DEV)
        self.pv = torch.full((slots, C, H, DV), float("nan"), dtype=dtype, device=DEV)
        self.lengths = [0] * slots

    def step(self, pieces, slots, backend, varlen=True):
        """One call: ``pieces[n]`` = (q, k, v) ``[1, t_n, ·]`` new tokens of the sequence in slot
        ``slots[n]`` (< 0: padding). Returns each piece's output."""
        cached = torch.tensor([self.lengths[s] if s >= 0 else 0 for s in slots], device=DEV)
        slot_ids = torch.tensor(slots, dtype=torch.int32, device=DEV)
        if varlen:
            q, k, v = (torch.cat([p[i] for p in pieces], 1) for i in range(3))
            lens = torch.tensor([p[0].shape[1] for p in pieces])
            cu = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(lens, 0).int()]).to(DEV)
            o = mk.lightning_chunk_cache_step(q, k, v, _slopes(), self.state, self.pk, self.pv, slot_ids, cached,
                                              cu_seqlens=cu, backend=backend)
            outs = list(o[0].split(lens.tolist()))
        else:  # equal lengths as rows (decode: one token each)
            q, k, v = (torch.cat([p[i] for p in pieces], 0) for i in range(3))
            o = mk.lightning_chunk_cache_step(q, k, v, _slopes(), self.state, self.pk, self.pv, slot_ids, cached,
                                              backend=backend)
            outs = list(o)
        for s, p in zip(slots, pieces):
            if s >= 0:
                self.lengths[s] += p[0].shape[1]
        return outs


# Prompt lengths around the chunk boundaries, then decode and continued prefill that cross 64 and 128.
PROMPTS = [1, 5, 63, 64, 65, 130]
SLOTS = [4, 0, 6, 2, 5, 1]          # not in order: any slot works
GROWTH = [2, 70, 1, 66, 3, 0]       # continued-prefill pieces after the first decode steps
DECODE_STEPS = (3, 2)


def _schedule_outputs(seqs, backend, dtype):
    """Run every sequence through prefill (all at once, varlen), decode steps (rows, with a padding
    row), continued prefill in pieces of other sizes, then more decode steps on a subset in
    another order. Returns each sequence's outputs concatenated."""
    cache = Cache(7, dtype)
    done = [0] * len(seqs)
    outs = [[] for _ in seqs]

    def take(n, t):
        q, k, v = seqs[n]
        piece = tuple(x[:, done[n]:done[n] + t] for x in (q, k, v))
        done[n] += t
        return piece

    def call(ns, ts, varlen=True, pad=False):
        pieces = [take(n, t) for n, t in zip(ns, ts)]
        slots = [SLOTS[n] for n in ns]
        if pad:  # a padding row in the middle: zero output, no slot touched
            pieces.insert(1, tuple(torch.ones_like(x) for x in pieces[0]))
            slots.insert(1, -1)
        got = cache.step(pieces, slots, backend, varlen)
        if pad:
            assert not got[1].any()
            del got[1]
        for n, o in zip(ns, got):
            outs[n].append(o.reshape(-1, H, DV))

    everyone = list(range(len(seqs)))
    call(everyone, PROMPTS)
    for _ in range(DECODE_STEPS[0]):
        call(everyone, [1] * len(seqs), varlen=False, pad=True)
    grow = [n for n in everyone if GROWTH[n]]
    call(grow, [GROWTH[n] for n in grow])
    subset = [3, 0, 4]
    for _ in range(DECODE_STEPS[1]):
        call(subset, [1] * len(subset), varlen=False)
    return [torch.cat(o) for o in outs], done


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_pieces_are_bitwise_the_single_pass(backend, dtype):
    total = [p + DECODE_STEPS[0] + g + (DECODE_STEPS[1] if n in (3, 0, 4) else 0)
             for n, (p, g) in enumerate(zip(PROMPTS, GROWTH))]
    seqs = [_qkv(t, dtype, seed=n) for n, t in enumerate(total)]
    got, done = _schedule_outputs(seqs, backend, dtype)
    assert done == total
    for n, (q, k, v) in enumerate(seqs):
        want = _single_pass(q, k, v, backend)[0]
        assert got[n].dtype == dtype and got[n].shape == want.shape
        assert torch.equal(got[n], want), (n, (got[n].float() - want.float()).abs().max().item())
        # ... and close to the exact recurrence (the single pass is the usual kernel)
        ref = mk.lightning_attention_reference(q.cpu(), k.cpu(), v.cpu(), _slopes().cpu())[0][0].to(DEV)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert torch.allclose(want.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_pass_is_batch_invariant(backend):
    """A sequence's consistent outputs do not depend on the rest of the batch (rows or varlen)."""
    dtype = torch.bfloat16
    q, k, v = _qkv(130, dtype, seed=7, B=3)
    alone = [_single_pass(q[b:b + 1], k[b:b + 1], v[b:b + 1], backend) for b in range(3)]
    assert torch.equal(_single_pass(q, k, v, backend), torch.cat(alone))
    lens = [130, 17, 70]
    packed = [x[b:b + 1, :n] for b, n in enumerate(lens) for x in (q, k, v)]
    qp, kp, vp = (torch.cat(packed[i::3], 1) for i in range(3))
    cu = torch.tensor([0, 130, 147, 217], dtype=torch.int32, device=DEV)
    o = mk.lightning_attention(qp, kp, vp, _slopes(), cu_seqlens=cu, backend=backend, consistent=True)[0]
    for b, n in enumerate(lens):
        assert torch.equal(o[0, cu[b]:cu[b] + n],
                           _single_pass(q[b:b + 1, :n], k[b:b + 1, :n], v[b:b + 1, :n], backend)[0])


def test_consistent_triton_never_splits_a_sequence(monkeypatch):
    """On a GPU the default prefill splits a long sequence into segments when the programs would
    leave SMs idle; consistent mode must not (a split changes where the state is summed)."""
    q, k, v = _qkv(320, torch.float32, seed=3)
    unsplit = _single_pass(q, k, v, "triton")
    monkeypatch.setattr(triton_prefill, "choose_segment_len", lambda *a, **kw: 128)
    assert torch.equal(_single_pass(q, k, v, "triton"), unsplit)
    split = mk.lightning_attention(q, k, v, _slopes(), backend="triton")[0]
    assert torch.allclose(split, unsplit, rtol=1e-5, atol=1e-5)
    assert not torch.equal(split, unsplit)  # the split is another arithmetic: what the mode avoids


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_holds_the_boundary_state_and_the_partial_chunk(backend):
    """After 150 tokens in two calls the slot holds the state after token 128 and tokens 128..149."""
    dtype = torch.bfloat16
    q, k, v = _qkv(150, dtype, seed=5)
    cache = Cache(3, dtype)
    cache.step([tuple(x[:, :40] for x in (q, k, v))], [2], backend)
    cache.step([tuple(x[:, 40:] for x in (q, k, v))], [2], backend)
    boundary = mk.lightning_attention(q[:, :128], k[:, :128], v[:, :128], _slopes(), output_final_state=True,
                                      backend=backend, consistent=True)[1]
    assert torch.equal(cache.state[2], boundary[0])
    assert torch.equal(cache.pk[2, :22], k[0, 128:]) and torch.equal(cache.pv[2, :22], v[0, 128:])
    assert not cache.state[0].any() and cache.pk[0].isnan().all()  # other slots untouched


@pytest.mark.parametrize("backend", BACKENDS)
def test_consistent_lightning_attention_keeps_its_backward(backend):
    """consistent=True trains: the default mode's backward (same gradients for the same upstream
    gradients; the loss is linear so that they do not depend on the forward's last bits)."""
    q, k, v = (x.requires_grad_() for x in _qkv(70, torch.float32, seed=9))
    g = torch.Generator().manual_seed(10)
    init, w_o, w_final = (torch.randn(shape, generator=g).to(DEV) for shape in ((1, H, D, DV), (1, 70, H, DV),
                                                                                  (1, H, D, DV)))
    init.requires_grad_()
    grads = []
    for consistent in (False, True):
        o, final = mk.lightning_attention(q, k, v, _slopes(), init, True, backend=backend, consistent=consistent)
        grads.append(torch.autograd.grad(((o * w_o).sum() + (final * w_final).sum()), (q, k, v, init)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_cache_step_compiles_fullgraph():
    """Static shapes, no host sync with check_ids=False: the step traces as one graph."""
    q, k, v = _qkv(5, torch.bfloat16, seed=11, B=2)

    def step(q, k, v, cache):
        o = mk.lightning_chunk_cache_step(q, k, v, _slopes(), cache.state, cache.pk, cache.pv,
                                          torch.tensor([2, 0], dtype=torch.int32, device=DEV),
                                          torch.tensor([3, 60], device=DEV), check_ids=False, backend="torch")
        return o, mk.lightning_attention(q, k, v, _slopes(), backend="torch", consistent=True)[0]

    caches = [Cache(3, torch.bfloat16) for _ in range(2)]
    for c in caches:
        c.pk.zero_(), c.pv.zero_()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, caches[0])
    want = step(q, k, v, caches[1])
    for a, b in zip(got + (caches[0].state, caches[0].pk, caches[0].pv),
                    want + (caches[1].state, caches[1].pk, caches[1].pv)):
        assert torch.equal(a, b)


def test_cache_step_reads_nothing_back_to_the_host():
    """Past the argument checks (``check_ids=False``, slopes checked once per tensor), a step
    is device arithmetic only: no ``.item()``-style read (aten._local_scalar_dense), which
    would stall every decode step on a GPU and break CUDA-graph capture."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                CountReads.reads += 1
            return func(*args, **(kwargs or {}))

    S, H, D = 3, 2, 16
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 5, H, D, generator=g) for _ in range(3))
    partial_k, partial_v = (torch.randn(S, 64, H, D, generator=g) for _ in range(2))
    slopes, state = torch.rand(H, generator=g), torch.zeros(S, H, D, D)
    args = (q, k, v, slopes, state, partial_k, partial_v, torch.tensor([2, 0], dtype=torch.int32),
            torch.tensor([70, 3]))
    mk.lightning_chunk_cache_step(*args, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32),
                                  backend="torch", check_ids=False)  # the slopes' one-time check
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with CountReads():  # sees the op's Python part and the custom op as one call
        mk.lightning_chunk_cache_step(*args, cu_seqlens=cu, backend="torch", check_ids=False)
    # The custom op's body runs with the mode off, so its packing and storing are called here.
    from mm1_kernels.lightning.consistent import pack_partial_chunks, store_partial_chunks_

    with CountReads():
        packed = pack_partial_chunks(q, k, v, partial_k, partial_v, args[7], args[8], cu)
        store_partial_chunks_(packed[1], packed[2], partial_k, partial_v, args[7], args[8], cu, packed[3], 5)
    assert CountReads.reads == 0


def test_validation_names_the_argument():
    q, k, v = _qkv(3, torch.float32, seed=0)
    state, pk, pv = (torch.zeros(2, *shape, device=DEV) for shape in ((H, D, DV), (C, H, D), (C, H, DV)))
    slots, cached = torch.tensor([0], dtype=torch.int32, device=DEV), torch.tensor([0], device=DEV)

    def call(**kw):
        args = dict(q=q, k=k, v=v, slopes=_slopes(), state_cache=state, partial_k=pk, partial_v=pv,
                    slot_ids=slots, cached_lens=cached, backend="torch")
        args.update(kw)
        return mk.lightning_chunk_cache_step(**args)

    empty = call(q=q[:, :0], k=k[:, :0], v=v[:, :0])       # no new token: nothing changes
    assert empty.shape == (1, 0, H, DV) and not state.any() and not pk.any()
    with pytest.raises(ValueError, match="partial_k"):
        call(partial_k=torch.zeros(2, C - 1, H, D, device=DEV))
    with pytest.raises((TypeError, ValueError), match="partial_v"):
        call(partial_v=torch.zeros(2, C, H, DV, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(ValueError, match="cached_lens"):
        call(cached_lens=torch.tensor([-1], device=DEV))
    with pytest.raises(ValueError, match="cached_lens"):
        call(cached_lens=torch.tensor([0, 0], device=DEV))
    with pytest.raises(ValueError, match="slot_ids"):
        call(slot_ids=torch.tensor([2], dtype=torch.int32, device=DEV))
    with pytest.raises(RuntimeError, match="q"):
        call(q=q.clone().requires_grad_())
    with pytest.raises(mk.BackendUnavailableError, match="lightning_chunk_cache_step"):
        call(backend="cuda")
    with pytest.raises(ValueError, match="state_cache"):
        mk.lightning_attention(q, k, v, _slopes(), state_cache=state, slot_ids=slots, consistent=True)
    with pytest.raises(TypeError, match="consistent"):
        mk.lightning_attention(q, k, v, _slopes(), consistent=1)


# ------------------------------------------------------------------ the model's lightning layers
def _lightning_model(backend, dtype, consistent=True):
    from mm1_model import MiniMaxM1Config, MiniMaxM1ForCausalLM
    cfg = MiniMaxM1Config.tiny(num_hidden_layers=2, attn_type_list=[0, 0])
    return MiniMaxM1ForCausalLM(cfg, backend=backend, consistent=consistent).to(DEV, dtype).init_random_(0).eval()


@pytest.mark.parametrize("backend,dtype", [
    ("torch", torch.float32), ("torch", torch.bfloat16),
    # every op of the model through the interpreter: ~20 s of CPU (the kernel is covered above)
    pytest.param("triton", torch.bfloat16, marks=pytest.mark.slow)], ids=["torch-fp32", "torch-bf16", "triton-bf16"])
def test_model_generation_path_is_bitwise_its_forward(backend, dtype):
    """Lightning-only layers (softmax attention is another test's): prefill, decode across the
    64-token boundary and a continued prefill give each token the hidden state of the forward."""
    model = _lightning_model(backend, dtype)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in (70, 9)]
    cache = model.new_cache(3, 80)
    slots = [2, 0]
    hidden = [[] for _ in seqs]
    out = model.prefill([seqs[0][:61], seqs[1][:2]], cache, slot_ids=slots, all_logits=True)
    for n, h in enumerate(out.hidden_states.split([61, 2])):
        hidden[n].append(h)
    for t in range(4):                          # sequence 0 crosses 64
        out = model.decode(torch.stack([seqs[0][61 + t], seqs[1][2 + t]]), cache, slot_ids=slots)
        for n in range(2):
            hidden[n].append(out.hidden_states[n:n + 1])
    out = model.prefill([seqs[1][6:], seqs[0][65:]], cache, slot_ids=slots[::-1], all_logits=True)
    for n, h in zip((1, 0), out.hidden_states.split([3, 5])):
        hidden[n].append(h)
    assert cache.lengths == [9, 0, 70]
    for n, ids in enumerate(seqs):
        want = model(ids[None].to(DEV), return_logits=False).hidden_states[0]
        assert torch.equal(torch.cat(hidden[n]), want), n


def test_model_cache_keeps_partial_chunks_only_in_consistent_mode():
    model = _lightning_model("torch", torch.bfloat16)
    cache, plain = model.new_cache(3, 80), _lightning_model("torch", torch.bfloat16, False).new_cache(3, 80)
    keys, values = cache.partial_chunk(0)
    assert keys.shape == values.shape == (3, C, 4, 16) and keys.dtype == torch.bfloat16
    # two layers x (64 rows x H x D) x 2 bytes x (k and v) per slot on top of the plain cache
    assert cache.nbytes() - plain.nbytes() == 2 * 3 * C * 4 * 16 * 2 * 2
    with pytest.raises(ValueError, match="consistent=True"):
        plain.partial_chunk(0)
    with pytest.raises(ValueError, match="consistent=False"):
        model.prefill([[1, 2, 3]], plain)
    with pytest.raises(ValueError, match="consistent"):
        cache.check_fits(model.config, cache.lightning_states.device, consistent=False)

"""The main job: python -m mm1_model [--checkpoint DIR [--layers a:b]].

With no arguments it builds the embedded default model (on CPU the tiny M1-structured model
from a fixed seed; on a GPU a real-width slice of M1 sized to the GPU's memory), saves and
reloads it through the checkpoint path, runs a batched varlen prefill and greedy decode with
the torch reference backend, replays the same tokens through every other backend, prints the
logit agreement, and prints prefill and decode tokens/s per backend.

``python -m mm1_model rl-demo [--backend triton ...]``: one CISPO step on the tiny model
(``mm1_model.rl_demo``).
"""
import os

import torch

# Triton kernels run on the CPU only through the interpreter, which must be chosen before
# mm1_kernels defines them (mm1_model's __init__ imports nothing, so this is still early enough).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import mm1_kernels as mk  # noqa: E402
from mm1_kernels import BackendUnavailableError, nvtx_range, resolve_backend, triton_interpret_enabled  # noqa: E402
from mm1_kernels.progress import progress_bar  # noqa: E402

from .config import MiniMaxM1Config  # noqa: E402
from .modeling import MiniMaxM1ForCausalLM  # noqa: E402

GiB = 2**30


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def default_model(args, device):
    """The embedded default: tiny on CPU; an M1-width slice sized to the GPU on a GPU."""
    if device.type != "cuda":
        cfg = MiniMaxM1Config.tiny()
        dtype = torch.float32
        what = "tiny M1-structured model (7 lightning + 1 softmax layer, fp32, seed 0)"
    else:
        free = torch.cuda.mem_get_info()[0]
        per_layer = 11.4e9  # bytes of one M1 layer in bf16 (lightning ~5.69 B params)
        head = 4.95e9      # embedding + LM head in bf16
        n = int(max(2, min(8, (0.4 * free - head) // per_layer)))  # two copies during the reload
        cfg = MiniMaxM1Config.m1_slice(range(8 - n, 8))  # ends at softmax layer 7
        dtype = torch.bfloat16
        what = f"M1-width slice, layers {cfg.layers} of 80 (bf16, seed 0)"
    with torch.device("meta"):
        model = MiniMaxM1ForCausalLM(cfg)
    model.to(dtype).to_empty(device=device).reset_buffers().init_random_(args.seed).eval()
    return model, what


def checkpoint_round_trip(model, device, dtype):
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    tmp = tempfile.mkdtemp(prefix="mm1_ckpt_")
    try:
        if shutil.disk_usage(tmp).free < 1.2 * params:
            print(f"checkpoint round trip: skipped ({params / GiB:.1f} GiB does not fit the disk at {tmp})")
            return model
        t0 = time.perf_counter()
        model.save_pretrained(tmp, max_shard_size=max(2**20, params // 4), progress=True)
        t1 = time.perf_counter()
        loaded = MiniMaxM1ForCausalLM.from_pretrained(tmp, dtype=dtype, device=device, progress=True)
        t2 = time.perf_counter()
        shards = len([f for f in os.listdir(tmp) if f.endswith(".safetensors")])
        same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
        print(f"checkpoint round trip: {shards} safetensors shards + index, {params / 2**20:.1f} MiB, "
              f"save {t1 - t0:.2f}s, load {t2 - t1:.2f}s, weights {'bitwise identical' if same else 'DIFFER'}")
        if not same:
            raise SystemExit("checkpoint round trip changed the weights")
        return loaded
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_prompts(cfg, lengths, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lengths]


@torch.no_grad()
def run_backend(model, backend, prompts, steps, forced_tokens=None, label=""):
    """Varlen prefill then greedy decode; with ``forced_tokens [steps, B]`` the tokens are those given
    (so every backend sees the reference's sequence). Returns logits, tokens and timings."""
    model.backend = backend
    dev = model.device
    cache = model.new_cache(len(prompts), max(len(p) for p in prompts) + steps + 1)
    _sync(dev)
    t0 = time.perf_counter()
    with nvtx_range(f"mm1.main.prefill.{backend}"):
        out = model.prefill(prompts, cache)
    _sync(dev)
    t_prefill = time.perf_counter() - t0
    logits, tokens = [out.logits], []
    tok = out.logits.argmax(-1)
    t_decode = 0.0
    for s in progress_bar(range(steps), desc=f"decode [{label}]", file=sys.stdout):
        if forced_tokens is not None:
            tok = forced_tokens[s]
        tokens.append(tok)
        _sync(dev)
        t0 = time.perf_counter()
        with nvtx_range(f"mm1.main.decode.{backend}"):
            out = model.decode(tok, cache)
        _sync(dev)
        t_decode += time.perf_counter() - t0
        logits.append(out.logits)
        tok = out.logits.argmax(-1)
    model.backend = None
    return dict(logits=logits, tokens=torch.stack(tokens) if tokens else None,
                prefill_s=t_prefill, decode_s=t_decode)


def backends_to_compare(device, requested):
    names = requested.split(",") if requested else ["triton", "cuda"]
    usable = []
    for b in names:
        if b == "torch":
            continue
        try:  # the model's lightning prefill is the op every backend must run
            resolve_backend("lightning_attention", b, device)
            usable.append(b)
        except BackendUnavailableError as exc:
            print(f"backend {b}: not run here ({str(exc).split(': ', 2)[-1]})")
    return usable


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mm1_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="an M1-format checkpoint directory (default: the embedded model)")
    p.add_argument("--layers", help="global layers a:b (half-open) of the checkpoint to load")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default=None)
    p.add_argument("--int8-experts", action="store_true", help="quantize experts to int8 on load")
    p.add_argument("--prompt-lens", default=None, help="comma-separated prompt lengths (a varlen batch)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode steps per prompt")
    p.add_argument("--backends", default=None, help="backends to check against torch (default triton,cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (run under torchrun "
                   "--nproc-per-node TP; needs --checkpoint)")
    p.add_argument("--ep", action="store_true", help="with --tp: expert parallel (whole experts per rank)")
    args = p.parse_args(argv)
    if args.tp < 1:
        p.error(f"--tp must be >= 1, got {args.tp}")
    if args.ep and args.tp == 1:
        p.error("--ep needs --tp > 1 (the experts are spread over the tensor-parallel ranks)")
    if args.tp > 1:
        _init_distributed(args)

    device = torch.device(args.device or (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                                          else "cpu"))
    on_gpu = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"mm1_model main job | torch {torch.__version__} | mm1_kernels {mk.__version__} | device "
          f"{torch.cuda.get_device_name(device) if on_gpu else 'cpu'}"
          f"{' | Triton through the interpreter (TRITON_INTERPRET=1)' if triton_interpret_enabled() else ''}")

    t_start = time.perf_counter()
    if args.checkpoint:
        dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
        model = MiniMaxM1ForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, layers=args.layers,
                                                     device=device, quantize_experts=args.int8_experts,
                                                     progress=True, tensor_parallel_size=args.tp,
                                                     expert_parallel=args.ep)
        what = f"checkpoint {args.checkpoint}, layers {model.config.layer_ids[0]}..{model.config.layer_ids[-1]}"
    else:
        model, what = default_model(args, device)
        dtype = model.dtype
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    n_lin = sum(cfg.is_lightning(i) for i in cfg.layer_ids)
    print(f"model: {what}\n  {len(cfg.layer_ids)} layers ({n_lin} lightning, {len(cfg.layer_ids) - n_lin} softmax) "
          f"of a {cfg.num_hidden_layers}-layer model, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads x "
          f"{cfg.head_dim}, {cfg.num_local_experts} experts top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}, "
          f"{n_params / 1e6:.2f} M params, {str(dtype).replace('torch.', '')}"
          f"{', int8 experts' if model.model.layers[0].block_sparse_moe.quantized else ''}")
    if not args.checkpoint:
        model = checkpoint_round_trip(model, device, dtype)

    lens = ([int(x) for x in args.prompt_lens.split(",")] if args.prompt_lens
            else ([300, 1024, 77, 513] if on_gpu else [23, 61, 9, 40]))
    steps = args.new_tokens if args.new_tokens is not None else (32 if on_gpu else 8)
    prompts = make_prompts(cfg, lens, args.seed)
    n_prompt = sum(lens)
    print(f"workload: varlen batch of {len(lens)} prompts (lengths {lens}, {n_prompt} tokens), "
          f"then {steps} greedy decode steps")

    others = backends_to_compare(device, args.backends)
    # warm-up (kernel compilation, allocator) outside the timings
    run_backend(model, "torch", prompts, 1, label="torch warm-up")

    def timed(backend, n_steps, forced_tokens, reps):
        """Best of ``reps`` runs (the CPU is often shared); logits and tokens of the first."""
        runs = [run_backend(model, backend, prompts, n_steps, forced_tokens,
                            label=f"{backend} {i + 1}/{reps}") for i in range(reps)]
        best = dict(runs[0])
        best["prefill_s"] = min(r["prefill_s"] for r in runs)
        best["decode_s"] = min(r["decode_s"] for r in runs)
        best["reps"] = reps
        return best

    ref = timed("torch", steps, None, 3)
    results = {"torch": ref}
    forced = ref["tokens"]
    interp_steps = steps if on_gpu else min(steps, 4)  # the interpreter is slow: fewer steps
    for b in others:
        if on_gpu:
            run_backend(model, b, prompts, 2, label=f"{b} warm-up")  # compiles every kernel shape
        results[b] = timed(b, interp_steps, None if forced is None else forced[:interp_steps],
                           3 if on_gpu else 1)

    print("\nagreement with the torch reference backend (fp32 logits; relative L2 error, max abs, argmax match):")
    if not others:
        print("  (no other backend runs here)")
    for b in others:
        r = results[b]
        n = len(r["logits"])
        pre = (_rel(r["logits"][0], ref["logits"][0]), (r["logits"][0] - ref["logits"][0]).abs().max().item())
        dec = [(_rel(a, c), (a - c).abs().max().item()) for a, c in zip(r["logits"][1:], ref["logits"][1:n])]
        match = torch.cat([a.argmax(-1) == c.argmax(-1) for a, c in zip(r["logits"], ref["logits"][:n])])
        note = " (Triton interpreter on CPU)" if b == "triton" and not on_gpu else ""
        print(f"  {b:6s}{note}: prefill rel {pre[0]:.2e} max|d| {pre[1]:.2e}; "
              f"decode ({n - 1} steps) worst rel {max((d[0] for d in dec), default=0):.2e} "
              f"max|d| {max((d[1] for d in dec), default=0):.2e}; argmax {int(match.sum())}/{match.numel()}")

    print("\nthroughput (after warm-up; best of the runs shown):")
    for b, r in results.items():
        n = len(r["logits"]) - 1
        note = " (Triton interpreter: a correctness path, not a speed)" if b == "triton" and not on_gpu else ""
        dec = f"{len(lens) * n / r['decode_s']:9.1f} tok/s ({n} steps x {len(lens)} seqs)" if n else "n/a"
        runs = f"[{r['reps']} run{'s' if r['reps'] > 1 else ''}]"
        print(f"  {b:6s} {runs} prefill {n_prompt / r['prefill_s']:9.1f} tok/s "
              f"({n_prompt} tokens in {r['prefill_s']:.3f}s); decode {dec}{note}")

    p0 = prompts[0][:8]
    sample = model.generate([p0], max_new_tokens=8, temperature=1.0, top_p=0.95,
                            generator=torch.Generator(device=device).manual_seed(args.seed))
    print(f"\nsampled continuation (temperature 1.0, top_p 0.95, M1's recommended): "
          f"{sample[0][len(p0):].tolist()}")
    print(f"greedy continuation of prompt 0 (torch): {forced[:, 0].tolist() if forced is not None else []}")
    if model.tp is not None:
        _report_communication(model, prompts)
    print(f"done in {time.perf_counter() - t_start:.1f}s")


def _init_distributed(args):
    """``--tp W`` under torchrun: join the group (NCCL on GPUs, gloo on CPUs), one GPU per rank;
    only rank 0 prints."""
    import torch.distributed as dist
    if not args.checkpoint:
        raise ValueError("--tp needs --checkpoint DIR (each rank loads its slices of it)")
    if "RANK" not in os.environ:
        raise ValueError(f"--tp {args.tp}: run under torchrun --nproc-per-node {args.tp} -m mm1_model ...")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")


def _report_communication(model, prompts):
    """Bytes each rank sends into each kind of collective, per token and layer, for one prefill."""
    model.tp.comm_bytes.clear()
    run_backend(model, "torch", prompts, 0)
    n_tok, n_layers = sum(len(p) for p in prompts), len(model.config.layer_ids)
    print(f"\ntensor parallel x{model.tp.size}{' (expert parallel)' if model.tp.expert_parallel else ''}: "
          f"collective bytes per rank for one prefill, per token and layer:")
    for what, n in sorted(model.tp.comm_bytes.items()):
        print(f"  {what:16s} {n / n_tok / n_layers:10.1f}")


def cli(argv=None):
    from .checkpoint import CheckpointError
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["rl-demo"]:  # python -m mm1_model rl-demo [...]: one CISPO step (rl_demo.py)
            from .rl_demo import main as rl_demo
            return rl_demo(argv[1:])
        main(argv)
    except (CheckpointError, ValueError, TypeError, BackendUnavailableError) as exc:
        raise SystemExit(f"error: {exc}") from exc


if __name__ == "__main__":
    cli()

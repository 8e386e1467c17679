"""M1's checkpoint format: sharded safetensors + ``model.safetensors.index.json`` (docs/m1_math.md §7).

Loading reads the original key names (``block_sparse_moe.experts.E.w1.weight``, ...) and
transformers' renamed ones (``mlp.gate.weight``, ``mlp.experts.gate_up_proj``, ...), converts
dtypes, keeps only a range of layers, and reads one tensor at a time straight into the
parameters of a model built on the meta device, so host memory stays near one tensor (the
shards are memory-mapped). Experts can be quantized to int8 on load, one expert at a time.
Saving writes the original names. Safetensors only: pickle files are never opened.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import mm1_kernels as mk
from mm1_kernels.progress import progress_bar

from .backends import check_backend
from .checks import as_int
from .config import MiniMaxM1Config
from .parallel import read_slice

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
# Buffers other ports save beside the weights; all are derived from the config and recomputed.
_DERIVED = (".self_attn.slope_rate", ".self_attn.query_decay", ".self_attn.key_decay",
            ".self_attn.diagonal_decay", ".rotary_emb.inv_freq", "rotary_emb.original_inv_freq")
# safetensors dtype names of floating tensors; every weight of the model is floating.
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_RENAMED = {"mlp.gate.weight": "block_sparse_moe.gate.weight",
            "mlp.experts.gate_up_proj": "block_sparse_moe.w13",
            "mlp.experts.down_proj": "block_sparse_moe.w2"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: the message names the tensor and the file."""


def parse_layers(layers, num_layers: int) -> Optional[List[int]]:
    """None | "a:b" | (a, b) | range | list -> sorted global indices (a:b and (a, b) are half-open).

    Refuses (naming ``layers``) an empty selection, an index outside ``[0, num_layers)`` and a
    repeated index.
    """
    if layers is None:
        return None
    given = layers
    if isinstance(layers, str):
        a, colon, b = layers.partition(":")
        try:
            if not colon:
                raise ValueError
            layers = range(int(a) if a.strip() else 0, int(b) if b.strip() else num_layers)
        except ValueError:
            raise ValueError(f"layers must look like 'a:b' (half-open, either end optional), "
                             f"got {given!r}") from None
    elif isinstance(layers, tuple) and len(layers) == 2:
        layers = range(as_int(layers[0], "layers"), as_int(layers[1], "layers"))
    elif isinstance(layers, (bytes, float, int)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers must be None, 'a:b', (a, b), a range or a list of ints, got {given!r}")
    out = sorted(as_int(i, "layers") for i in layers)
    if not out or out[0] < 0 or out[-1] >= num_layers:
        raise ValueError(f"layers must be a non-empty selection within [0, {num_layers}), got {given!r}")
    if len(set(out)) != len(out):
        dup = sorted({i for i in out if out.count(i) > 1})
        raise ValueError(f"layers must not repeat an index, got {dup} more than once in {given!r}")
    return out


# ------------------------------------------------------------------------------ reading
def checkpoint_files(path: str) -> Dict[str, str]:
    """``{tensor name: shard file}`` from the index, or from a single model.safetensors."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"broken index {index}: {type(exc).__name__}: {exc}") from exc
        for name, fn in weight_map.items():
            if not fn.endswith(".safetensors") or os.path.basename(fn) != fn:
                raise CheckpointError(f"index {index} maps tensor {name!r} to {fn!r}: "
                                      f"only .safetensors files in the checkpoint directory are read")
            if not os.path.exists(os.path.join(path, fn)):
                raise CheckpointError(f"index {index} maps tensor {name!r} to file {fn!r}, "
                                      f"which does not exist")
        return dict(weight_map)
    single = os.path.join(path, SINGLE_NAME)
    if os.path.exists(single):
        with _open(single) as f:
            return {k: SINGLE_NAME for k in f.keys()}
    pickles = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    why = f" (found pickle files {pickles[:3]}: they are never loaded)" if pickles else ""
    raise CheckpointError(f"no {INDEX_NAME} or {SINGLE_NAME} in {path}{why}")


def _open(file: str):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read safetensors file {file} (truncated or corrupt?): {exc}") from exc


class _Loader:
    """Maps checkpoint tensors onto a model's parameters and tracks what is still missing."""

    def __init__(self, model, config: MiniMaxM1Config):
        self.model = model
        self.params = dict(model.named_parameters())
        self.params.update(dict(model.named_buffers()))
        self.local = {g: n for n, g in enumerate(config.layer_ids)}
        self.num_layers = config.num_hidden_layers
        self.I = config.intermediate_size
        self.E = config.num_local_experts
        self.missing = set(expected_keys(config))
        self.staged: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}  # int8: experts being assembled
        # Tensor parallel: every read takes only this rank's slice (mm1_model.parallel); the
        # checkpoint's shapes are checked against the unsharded model's, built on meta.
        self.tp = getattr(model, "tp", None)
        shapes_of = model
        if self.tp is not None:
            from .modeling import MiniMaxM1ForCausalLM
            with torch.device("meta"):
                shapes_of = MiniMaxM1ForCausalLM(config)
        self.full_shapes = {n: tuple(p.shape) for n, p in shapes_of.named_parameters()}

    def target(self, key: str):
        """(kind, local layer, detail, original name) for a key; None for a layer outside the range."""
        if key.endswith(_DERIVED):
            return None
        m = _LAYER_RE.match(key)
        if not m:
            return ("plain" if key in self.params else "unexpected", None, key, key)
        g, rest = int(m.group(1)), m.group(2)
        if g >= self.num_layers:
            return ("unexpected", None, key, key)
        if g not in self.local:
            return None
        n = self.local[g]
        rest = _RENAMED.get(rest, rest)
        original = f"model.layers.{g}.{rest}"
        e = _EXPERT_RE.match(rest)
        if e:
            if int(e.group(1)) >= self.E:
                return ("unexpected", None, key, key)
            return ("expert", n, (int(e.group(1)), e.group(2)), original)
        if rest in ("block_sparse_moe.w13", "block_sparse_moe.w2"):
            return ("stacked", n, rest.rsplit(".", 1)[1], original)
        name = f"model.layers.{n}.{rest}"
        return ("plain", n, name, original) if name in self.params else ("unexpected", None, key, key)

    def expected_shape(self, t) -> Tuple[int, ...]:
        kind, n, detail, _ = t
        if kind == "plain":
            return self.full_shapes[detail]
        if kind == "stacked":
            return self.full_shapes[f"model.layers.{n}.block_sparse_moe.{detail}"]
        _, which = detail
        hidden = self.model.config.hidden_size
        return (hidden, self.I) if which == "w2" else (self.I, hidden)

    def _spec(self, name: str):
        return None if self.tp is None else self.tp.spec(name)

    def _expert_spec(self, which: str, stacked: bool = False):
        """This rank's cut of one expert's w1/w3 ``[I, hidden]`` or w2 ``[hidden, I]``; ``stacked``:
        of its ``[2I, hidden]`` rows in transformers' gate_up stack (w3 = rows I..2I)."""
        spec = None if self.tp is None else self.tp.expert_spec(which)
        if not stacked or which == "w2":
            return spec
        dim, ranges = spec or (0, [(0, self.I)])
        off = self.I if which == "w3" else 0
        return dim, [(a + off, b + off) for a, b in ranges]

    def _owns(self, e: int) -> bool:
        return self.tp is None or self.tp.owns_expert(e)

    @torch.no_grad()
    def load(self, t, stored):
        """Fill the target of ``t`` from ``stored``, a lazy safetensors slice (``get_slice``), reading
        only what this rank holds."""
        kind, n, detail, original = t
        if kind == "plain":
            p = self.params[detail]
            p.copy_(read_slice(stored, self._spec(detail)).to(device=p.device, dtype=p.dtype))
            self.missing.discard(original)
            return
        moe = self.model.model.layers[n].block_sparse_moe
        g = self.model.config.layer_ids[n]
        if kind == "stacked":  # read one expert at a time
            for e in range(self.E):
                if not self._owns(e):  # another rank's expert: never read
                    for which in (("w1", "w3") if detail == "w13" else ("w2",)):
                        self._expert(moe, g, e, which, None)
                    continue
                if detail == "w13":
                    self._expert(moe, g, e, "w1", read_slice(stored, self._expert_spec("w1", True), (e,)))
                    self._expert(moe, g, e, "w3", read_slice(stored, self._expert_spec("w3", True), (e,)))
                else:
                    self._expert(moe, g, e, "w2", read_slice(stored, self._expert_spec("w2"), (e,)))
            return
        e, which = detail
        self._expert(moe, g, e, which, read_slice(stored, self._expert_spec(which)) if self._owns(e) else None)

    def _expert(self, moe, g: int, e: int, which: str, w: Optional[torch.Tensor]):
        """One expert's w1, w2 or w3 (this rank's slice; None: an expert another rank holds)."""
        self.missing.discard(f"model.layers.{g}.block_sparse_moe.experts.{e}.{which}.weight")
        if w is None:
            return
        if self.tp is not None:
            e -= self.tp.experts[0]  # index in this rank's stack
        I = moe.w13.shape[1] // 2  # this rank's rows of each half
        if not moe.quantized:
            dst = moe.w2[e] if which == "w2" else moe.w13[e, :I] if which == "w1" else moe.w13[e, I:]
            dst.copy_(w.to(device=dst.device, dtype=dst.dtype))
            return
        # int8 on load: assemble one expert, quantize it, drop it. Parts wait in the checkpoint's
        # dtype (transformers' stacked layout delivers every expert's w2 before any w1/w3), and
        # become float only for the one expert being quantized.
        parts = self.staged.setdefault((g, e), {})
        parts[which] = w.to(device=moe.w13.device)
        if len(parts) == 3:
            del self.staged[(g, e)]
            w13 = torch.cat([parts["w1"], parts["w3"]], 0)[None]
            quantize = mk.quantize_moe_weights if self.tp is None else self.tp.quantize_experts
            q13, s13, q2, s2 = quantize(w13, parts["w2"][None])
            moe.w13[e].copy_(q13[0])
            moe.w13_scale[e].copy_(s13[0])
            moe.w2[e].copy_(q2[0])
            moe.w2_scale[e].copy_(s2[0])


def expected_keys(config: MiniMaxM1Config) -> List[str]:
    """Every tensor name (original M1 names) a checkpoint of ``config``'s layers must hold."""
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for g in config.layer_ids:
        p = f"model.layers.{g}."
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        if config.is_lightning(g):
            keys += [p + f"self_attn.{n}.weight" for n in ("qkv_proj", "output_gate", "out_proj", "norm")]
        else:
            keys += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
        keys.append(p + "block_sparse_moe.gate.weight")
        keys += [p + f"block_sparse_moe.experts.{e}.{w}.weight"
                 for e in range(config.num_local_experts) for w in ("w1", "w2", "w3")]
    return keys


def load_state_into(model, path: str, strict: bool = True, progress: bool = False) -> None:
    """Fill ``model`` (already on its device, right dtypes) from the checkpoint in ``path``."""
    weight_map = checkpoint_files(path)
    loader = _Loader(model, model.config)
    by_file: Dict[str, List[str]] = {}
    for key, fn in weight_map.items():
        by_file.setdefault(fn, []).append(key)
    total = len(weight_map)
    bar = progress_bar(total=total, desc="loading", unit="tensor", enabled=progress)
    for fn in sorted(by_file):
        file = os.path.join(path, fn)
        with _open(file) as f:
            present = set(f.keys())
            for key in by_file[fn]:
                if key not in present:
                    raise CheckpointError(f"the index maps tensor {key!r} to {file}, which does not hold it")
                t = loader.target(key)
                bar.update(1)
                if t is None:
                    continue
                if t[0] == "unexpected":
                    if strict:
                        raise CheckpointError(f"unexpected tensor {key!r} in {file}: not part of a "
                                              f"MiniMax-M1 model with this config")
                    continue
                stored = f.get_slice(key)
                dtype = stored.get_dtype()
                if dtype not in _FLOAT_DTYPES:
                    raise CheckpointError(f"tensor {key!r} in {file} is stored as {dtype}; a weight must "
                                          f"be a floating tensor ({', '.join(_FLOAT_DTYPES)})")
                shape = tuple(stored.get_shape())
                want = loader.expected_shape(t)
                if shape != want:
                    raise CheckpointError(f"tensor {key!r} in {file} has shape {list(shape)}, "
                                          f"expected {list(want)}")
                try:
                    # lazy: the loader reads only its slice (a stacked expert tensor, transformers'
                    # layout, expert by expert)
                    loader.load(t, stored)
                except (SafetensorError, OSError) as exc:
                    raise CheckpointError(f"cannot read tensor {key!r} from {file}: {exc}") from exc
                del stored
    bar.close()
    if loader.missing:
        miss = sorted(loader.missing, key=_natural)
        raise CheckpointError(f"checkpoint {path} lacks {len(miss)} tensor(s), e.g. {miss[:5]}")


def _natural(s: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", s)]


def load_pretrained(cls, path: str, dtype=torch.bfloat16, layers=None, device=None, backend=None,
                    quantize_experts: bool = False, progress: bool = False, strict: bool = True,
                    tensor_parallel_size: int = 1, expert_parallel: bool = False, process_group=None):
    """Build ``cls`` on the meta device, allocate it on ``device`` and fill it tensor by tensor.

    ``layers``: GLOBAL layer indices to keep (list/range, ``"a:b"`` or ``(a, b)``, half-open;
    distinct, within the checkpoint); the slice keeps the checkpoint's ``num_hidden_layers``, so
    slopes and layer types are those of the full model. The router weight stays fp32 (the
    router runs in fp32). ``device=None``: ``"cuda"`` when torch sees a GPU, else ``"cpu"``.
    Every tensor of the model is read from the checkpoint (a missing one is an error), so a
    loaded model holds no uninitialized memory.

    ``tensor_parallel_size=W`` (inside an initialized process group of W ranks): the model is
    built sharded (``mm1_model.parallel``) and each rank reads only its slices of each tensor
    (safetensors slicing of the memory-mapped shards), never another rank's; int8 experts get
    the unsharded model's scales.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    check_backend(backend, "backend")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoint_files(path)  # a missing directory or broken index fails before anything is built
    try:
        config = MiniMaxM1Config.from_pretrained(path)
    except (TypeError, ValueError) as exc:  # the message names the file and the field
        raise CheckpointError(str(exc)) from exc
    wanted = parse_layers(layers, config.num_hidden_layers)
    if wanted is not None:
        have = set(config.layer_ids)
        if not set(wanted) <= have:
            raise CheckpointError(f"layers {sorted(set(wanted) - have)} are not in the checkpoint {path} "
                                  f"(it holds {config.layer_ids if config.layers else 'all'})")
        config.layers = wanted
    with torch.device("meta"):
        model = cls(config, backend=backend, tensor_parallel_size=tensor_parallel_size,
                    expert_parallel=expert_parallel, process_group=process_group)
    model.to(dtype)  # slopes, RoPE frequencies and the router stay fp32
    if quantize_experts:
        for layer in model.model.layers:
            layer.block_sparse_moe.make_int8(device="meta")
    model.to_empty(device=device)
    model.reset_buffers()
    load_state_into(model, path, strict=strict, progress=progress)
    return model.eval()


# ------------------------------------------------------------------------------ writing
def checkpoint_tensors(model) -> Iterator[Tuple[str, torch.Tensor]]:
    """(original M1 name, tensor) for every weight, experts split per expert, GLOBAL layer indices."""
    cfg = model.config
    yield "model.embed_tokens.weight", model.model.embed_tokens.weight
    for g, layer in zip(cfg.layer_ids, model.model.layers):
        p = f"model.layers.{g}."
        yield p + "input_layernorm.weight", layer.input_layernorm.weight
        yield p + "post_attention_layernorm.weight", layer.post_attention_layernorm.weight
        names = ("qkv_proj", "output_gate", "out_proj") if layer.is_lightning else ("q_proj", "k_proj",
                                                                                    "v_proj", "o_proj")
        for n in names:
            yield p + f"self_attn.{n}.weight", getattr(layer.self_attn, n).weight
        if layer.is_lightning:
            yield p + "self_attn.norm.weight", layer.self_attn.norm.weight
        moe = layer.block_sparse_moe
        yield p + "block_sparse_moe.gate.weight", moe.gate.weight
        I, dt = cfg.intermediate_size, model.dtype
        for e in range(cfg.num_local_experts):
            if moe.quantized:  # saved dequantized: the format has no int8 experts
                w13 = (moe.w13[e].float() * moe.w13_scale[e][:, None]).to(dt)
                w2 = (moe.w2[e].float() * moe.w2_scale[e][:, None]).to(dt)
            else:
                w13, w2 = moe.w13[e], moe.w2[e]
            yield p + f"block_sparse_moe.experts.{e}.w1.weight", w13[:I]
            yield p + f"block_sparse_moe.experts.{e}.w2.weight", w2
            yield p + f"block_sparse_moe.experts.{e}.w3.weight", w13[I:]
    yield "model.norm.weight", model.model.norm.weight
    yield "lm_head.weight", model.lm_head.weight


def save_pretrained(model, path: str, max_shard_size: int = 5 * 2**30, progress: bool = False) -> None:
    """Write ``config.json``, shards ``model-0000i-of-0000n.safetensors`` and the index."""
    if getattr(model, "tp", None) is not None:
        raise NotImplementedError("save_pretrained: this model is tensor-parallel (each rank holds slices); "
                                  "save from a tensor_parallel_size=1 model")
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    d = cfg.to_json_dict()
    d["torch_dtype"] = str(model.dtype).replace("torch.", "")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=2)
    # Plan shards from shapes (no data touched), then write them one at a time.
    plan: List[List[str]] = [[]]
    size, total = 0, 0
    for name, t in checkpoint_tensors(model):
        nbytes = t.numel() * (t.element_size() if t.dtype != torch.int8 else model.dtype.itemsize)
        if plan[-1] and size + nbytes > max_shard_size:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
        total += nbytes
    n = len(plan)
    shard_of = {name: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, names in enumerate(plan) for name in names}
    bar = progress_bar(total=len(shard_of), desc="saving", unit="tensor", enabled=progress)
    current, current_file = {}, None
    for name, t in checkpoint_tensors(model):
        fn = shard_of[name]
        if fn != current_file and current:
            save_file(current, os.path.join(path, current_file), metadata={"format": "pt"})
            current = {}
        current_file = fn
        current[name] = t.detach().to("cpu").contiguous()
        bar.update(1)
    if current:
        save_file(current, os.path.join(path, current_file), metadata={"format": "pt"})
    bar.close()
    with open(os.path.join(path, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": shard_of}, f, indent=2)

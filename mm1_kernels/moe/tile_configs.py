"""The fused-MoE Triton tile table: data (JSON), looked up per device, weight dtype and shape.

Files (``mm1_kernels/moe/configs/``):

- ``default.json``: the table every device starts from, derived from arithmetic (below).
- ``device_name=<torch.cuda.get_device_name, spaces as _>,dtype=<bf16|fp16|int8>.json``: a
  table measured by ``python -m bench.tune_moe`` on that device for that weight dtype; when it
  exists it wins for the widths and buckets it lists (it may list only some).
- ``MM1_MOE_CONFIG=/path/file.json``: a user's table, read first (same format), for every
  weight dtype.

Format: ``{"token_buckets": [1, 16, 64, 512, 4096, null], "configs": {"<I>": [config per
bucket]}}``. Bucket i covers T in ``(token_buckets[i-1], token_buckets[i]]`` (null = no upper
bound); a config is ``BLOCK_M`` (row tile, entries of one expert), ``BLOCK_N1``/``BLOCK_K1``
(GEMM 1: columns of the gate tile — the up tile of the same columns rides along, so the
accumulators are ``BLOCK_M × 2·BLOCK_N1`` — and the reduction step over hidden),
``BLOCK_N2``/``BLOCK_K2`` (GEMM 2), ``num_warps``, ``num_stages`` and ``GROUP_M`` (row tiles
per program group: see the kernels' launch order).

Why the default shapes (M1: hidden 6144, 32 experts, top-2; I = 9216 / TP):

- T ≤ 64 (decode): an expert sees 1-4 rows, so ``BLOCK_M`` is the tensor-core minimum 16 and
  the time is the read of the touched experts' weights. Only fast when the grid keeps every SM
  streaming, so column tiles shrink as I shrinks: at T = 1 two experts are active and GEMM 1
  has 2·I/BLOCK_N1 programs (144 at TP 8 with BLOCK_N1 = 16, 288 at TP 1 with 64) for 132 SMs.
  Wide ``BLOCK_K`` gives long contiguous weight reads.
- 64 < T ≤ 4096: ~T/16 rows per expert. 64-row tiles on one warpgroup (4 warps, no duplicated
  wgmma) keep the padding waste at ~12% at T = 4096 (128-row tiles: ~25%); GEMM 1 holds
  64 × 2·64 fp32 accumulators (64 registers per thread), 24 KiB per pipeline stage, 4 stages:
  2 CTAs per SM, so one CTA's epilogue overlaps the other's main loop.
- T > 4096: ≥ 256 rows per expert, so 128-row tiles (8 warps, two warpgroups splitting the
  rows) halve the weight traffic per FLOP; the padding falls from ~25% just past T = 4096
  (64 of ~256 rows per expert) to ~6% at T = 16384; GEMM 1 still holds 128 × 2·64
  accumulators (64 per thread), not two 128 × 128 (which took 255 registers, 1 CTA/SM).
- ``GROUP_M`` = 128: the GEMMs launch programs in groups of ``GROUP_M`` row tiles × all column
  tiles, row tile fastest. A weight column tile serves an expert's row tiles back to back, read
  from HBM once per group the expert's tiles fall in (expected 1 + (tiles per expert − 1) /
  GROUP_M: 1.03 at T = 4096), and a row tile's activations are re-read by its next column tile
  GROUP_M programs later, inside the 264 co-resident programs of 2 CTAs × 132 SMs (132 at one
  CTA per SM). Smaller
  groups re-read weights more; larger ones than the co-resident window lose the activations.

Shapes not in a table take the entry of the nearest listed width; tiles are then clipped to the
problem (powers of two, ≥ 16 for ``tl.dot``) so tiny test shapes do not pay for empty tiles.
Nothing here is tuned on a GPU yet.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_FILE = CONFIG_DIR / "default.json"
FIELDS = ("BLOCK_M", "BLOCK_N1", "BLOCK_K1", "BLOCK_N2", "BLOCK_K2", "num_warps", "num_stages", "GROUP_M")
WEIGHT_DTYPES = ("bf16", "fp16", "int8")
# Shared memory a software-pipelined program may use (H100 and H200 allow 227 KiB per block;
# leave room for the epilogue's layout conversions).
SMEM_BUDGET = 160 * 1024


# Consistent mode (``fused_moe(..., consistent=True)``): one configuration for every token count,
# so a token's K accumulation order never follows the batch. BLOCK_M 16 is the decode path's
# row tile (``DIRECT``: one entry per 16-row tile), so decode and prefill run the same tiles.
CONSISTENT_CONFIG = {"BLOCK_M": 16, "BLOCK_N1": 64, "BLOCK_K1": 64, "BLOCK_N2": 64, "BLOCK_K2": 64,
                     "num_warps": 4, "num_stages": 3, "GROUP_M": 16}


def device_file(device_name: str, weight_dtype: str) -> Path:
    """Where ``bench.tune_moe`` writes (and the lookup reads) a device's measured table."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    return CONFIG_DIR / f"device_name={device_name.replace(' ', '_')},dtype={weight_dtype}.json"


def _pow2(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1 and v & (v - 1) == 0


# What the kernels can compile: tl.dot tiles are powers of two ≥ 16, warps a power of two.
RULES = {
    "BLOCK_M": (lambda v: _pow2(v) and v >= 16, "a power of two ≥ 16"),
    "BLOCK_N1": (lambda v: _pow2(v) and v >= 16, "a power of two ≥ 16"),
    "BLOCK_K1": (lambda v: _pow2(v) and v >= 16, "a power of two ≥ 16"),
    "BLOCK_N2": (lambda v: _pow2(v) and v >= 16, "a power of two ≥ 16"),
    "BLOCK_K2": (lambda v: _pow2(v) and v >= 16, "a power of two ≥ 16"),
    "num_warps": (lambda v: _pow2(v) and 1 <= v <= 16, "a power of two in [1, 16]"),
    "num_stages": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8, "an integer in [1, 8]"),
    "GROUP_M": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer"),
}


def _check_table(doc, source: str) -> dict:
    """Validate a table document; returns ``{"buckets": (...), "configs": {I: [dict, ...]}}``."""
    try:
        raw = doc["token_buckets"]
        buckets = tuple(float("inf") if b is None else int(b) for b in raw)
        configs = {int(k): [dict(c) for c in v] for k, v in doc["configs"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"MoE tile table {source}: needs 'token_buckets' and 'configs' ({exc})") from None
    if (not buckets or any(b <= a for a, b in zip(buckets, buckets[1:])) or buckets[-1] != float("inf")
            or any(isinstance(b, bool) for b in raw)):
        raise ValueError(f"MoE tile table {source}: token_buckets must strictly increase and end with null, got {raw}")
    for inter, rows in configs.items():
        if len(rows) != len(buckets):
            raise ValueError(f"MoE tile table {source}: I={inter} has {len(rows)} configs for "
                             f"{len(buckets)} token buckets")
        for cfg in rows:
            missing = [f for f in FIELDS if f not in cfg]
            bad = [f"{f}={cfg[f]!r} (must be {RULES[f][1]})" for f in FIELDS if f in cfg and not RULES[f][0](cfg[f])]
            if missing or bad:
                raise ValueError(f"MoE tile table {source}: I={inter} config {cfg}: missing {missing}, invalid {bad}")
    return {"buckets": buckets, "configs": configs}


@functools.cache
def load_table(path: str) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
    except OSError as exc:
        raise ValueError(f"MoE tile table {path} cannot be read ({exc.strerror or exc}); it comes from "
                         "MM1_MOE_CONFIG or mm1_kernels/moe/configs/") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"MoE tile table {path} is not valid JSON ({exc}); it comes from MM1_MOE_CONFIG "
                         "or mm1_kernels/moe/configs/") from None
    return _check_table(doc, path)


def format_table(configs: dict, token_buckets, comment: str, device_name: Optional[str] = None,
                 weight_dtype: Optional[str] = None) -> str:
    """The JSON text of a table, one config per line (diffs stay readable)."""
    head = {"_comment": comment, "device_name": device_name, "weight_dtype": weight_dtype,
            "token_buckets": [None if b == float("inf") else b for b in token_buckets]}
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()] + [' "configs": {']
    keys = sorted(configs, key=int, reverse=True)
    for i, inter in enumerate(keys):
        rows = ",\n".join(f"   {json.dumps({f: c[f] for f in FIELDS})}" for c in configs[inter])
        lines.append(f'  "{inter}": [\n{rows}\n  ]' + ("," if i < len(keys) - 1 else ""))
    return "\n".join(lines + [" }", "}"]) + "\n"


def _tables(device_name: Optional[str], weight_dtype: str, user_file: Optional[str]):
    """The tables consulted, most specific first."""
    out = [load_table(user_file)] if user_file else []
    if device_name:
        f = device_file(device_name, weight_dtype)
        if f.exists():
            out.append(load_table(str(f)))
    out.append(load_table(str(DEFAULT_FILE)))
    return out


def _p2(n: int) -> int:
    return max(16, 1 << max(0, int(n) - 1).bit_length())


@functools.lru_cache(maxsize=4096)
def _resolve(inter: int, hidden: int, tokens: int, device_name, weight_dtype: str, user_file):
    tables = _tables(device_name, weight_dtype, user_file)
    chosen = next((t for t in tables if any(inter / 2 <= w <= inter * 2 for w in t["configs"])), tables[-1])
    bucket = next(i for i, hi in enumerate(chosen["buckets"]) if tokens <= hi)
    key = min(chosen["configs"], key=lambda w: (abs(w - inter), w))
    c = dict(chosen["configs"][key][bucket])
    c.update(BLOCK_N1=min(c["BLOCK_N1"], _p2(inter)), BLOCK_K1=min(c["BLOCK_K1"], _p2(hidden)),
             BLOCK_N2=min(c["BLOCK_N2"], _p2(hidden)), BLOCK_K2=min(c["BLOCK_K2"], _p2(inter)))
    return c


def moe_config(inter: int, hidden: int, tokens: int, device_name: Optional[str] = None,
               weight_dtype: str = "bf16") -> dict:
    """The tile configuration for expert width ``inter``, ``hidden`` and ``tokens`` tokens.

    The first table (``MM1_MOE_CONFIG``, the device's file, the default) that lists a width
    within a factor 2 of ``inter`` decides; among its widths the nearest is taken. Tiles are
    clipped to the problem. Resolved once per argument tuple (no file access per call).
    """
    return dict(_resolve(int(inter), int(hidden), int(tokens), device_name, weight_dtype,
                         os.environ.get("MM1_MOE_CONFIG") or None))


def token_buckets() -> tuple:
    """The default table's token buckets (upper bounds; the last is infinity)."""
    return load_table(str(DEFAULT_FILE))["buckets"]


def fit_stages(stages: int, block_m: int, block_n: int, block_k: int, n_weight_tiles: int,
               act_bytes: int, weight_bytes: int) -> int:
    """Pipeline depth that keeps one stage's tiles × stages under ``SMEM_BUDGET``.

    The table is written for bf16 activations and weights; fp32 inputs double every tile, so
    the same tiles run with fewer stages rather than failing to compile.
    """
    per_stage = block_m * block_k * act_bytes + n_weight_tiles * block_k * block_n * weight_bytes
    while stages > 1 and stages * per_stage > SMEM_BUDGET:
        stages -= 1
    return stages

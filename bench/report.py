"""python -m bench.report [FILES or DIRS] [--out DIR] [--readme README.md]

Renders the stored results (default: this checkout's bench/results/*.json, where
``python -m bench`` writes, so with no arguments it includes the run just made) as markdown and
PNG plots (throughput against the swept size, one line per implementation, the measured
ceiling drawn), in --out (default: <first path>/report). GPU devices go to report.md; CPU runs,
which check the harness only, to report_cpu.md and *_cpu.png (git-ignored like *_cpu.json).
Per device it keeps the newest row of every (op, case, shape, implementation), so runs of
single ops combine. With --readme, the README's block between the markers
``<!-- bench-results:start -->`` and ``<!-- bench-results:end -->`` is replaced with the
GPU devices' tables (CPU runs are left out of the README).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .common import CPU_WARNING, RESULTS_DIR, device_slug

START, END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"


def load(paths: list[Path]) -> list[dict]:
    files = []
    for p in paths:
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    runs = []
    for f in files:
        run = json.loads(f.read_text())
        if "cases" in run and "env" in run:
            run["_file"] = str(f)
            runs.append(run)
    return sorted(runs, key=lambda r: r["created"])


def latest_per_device(runs: list[dict]) -> dict[str, dict]:
    """device name -> {"runs": [...], "rows": newest row per key, "ceilings", "env", "cpu_run"}."""
    devices: dict[str, dict] = {}
    for run in runs:  # oldest first: newer rows overwrite
        dev = devices.setdefault(run["env"]["device_name"], {"runs": [], "rows": {}})
        dev.update(env=run["env"], ceilings=run["ceilings"], cpu_run=run["cpu_run"], created=run["created"])
        dev["runs"].append(run["_file"])
        for row in run["cases"]:
            key = (row["op"], row["kind"], json.dumps(row["params"], sort_keys=True), row["impl"])
            dev["rows"][key] = dict(row, _ceilings=run["ceilings"])
    return devices


def _shape(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _num(v, fmt):
    return "" if v is None else format(v, fmt)


def markdown(devices: dict[str, dict], plots: dict[tuple, str]) -> str:
    lines = []
    for name, dev in devices.items():
        env, ceil = dev["env"], dev["ceilings"]
        lines += [f"### {name}", ""]
        if dev["cpu_run"]:
            lines += [f"> **{CPU_WARNING}**", ""]
        lines += [f"SMs {env.get('sm_count')}, torch {env['torch']}, triton {env['triton']}, "
                  f"CUDA {env['cuda']}, commit `{(env.get('git_commit') or '?')[:10]}`"
                  f"{' (dirty)' if env.get('git_dirty') else ''}, latest run {dev['created']}. "
                  f"Ceilings measured in the same run: copy **{ceil['copy_GBps']:,.4g} GB/s**, "
                  f"bf16 matmul **{ceil['matmul_bf16_TFLOPs']:,.4g} TFLOP/s**.", ""]
        groups: dict[tuple, list] = {}
        for (op, kind, _, _), row in dev["rows"].items():
            groups.setdefault((op, kind), []).append(row)
        for (op, kind), rows in groups.items():
            lines += [f"#### {op} {kind}", ""]
            if (name, op, kind) in plots:
                lines += [f"![{op} {kind}]({plots[(name, op, kind)]})", ""]
            lines += ["| shape | impl | median ms | floor ms | TFLOP/s | GB/s | % of ceiling | peak MiB | status |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---|"]
            not_run = {}
            for r in rows:
                if r["status"] == "skipped":
                    not_run.setdefault(r["impl"], r.get("message", ""))
                    continue
                ok = r["status"] == "ok"
                frac = f"{100 * r['fraction']:.1f} ({r['bound']})" if ok and "fraction" in r else ""
                peak = _num(r.get("peak_mem_bytes") and r["peak_mem_bytes"] / 2**20, ",.0f")
                status = "ok" if ok else f"{r['status']}: {r.get('message', '')}".replace("|", "/")[:120]
                lines.append(f"| {_shape(r['params'])} | {r['impl']} | {_num(r.get('median_ms'), '.3f')} | "
                             f"{_num(r.get('floor_ms'), '.3f')} | {_num(r.get('TFLOPs'), '.3g')} | "
                             f"{_num(r.get('GBps'), ',.4g')} | {frac} | {peak} | {status} |")
            lines.append("")
            if not_run:
                lines += ["Not run: " + "; ".join(f"{k}: {v}" for k, v in not_run.items()), ""]
    return "\n".join(lines)


def plot(devices: dict[str, dict], out_dir: Path) -> dict[tuple, str]:
    """One PNG per (device, op, kind): TFLOP/s and GB/s against the swept size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = {}
    for name, dev in devices.items():
        groups: dict[tuple, list] = {}
        for (op, kind, _, _), row in dev["rows"].items():
            if row["status"] == "ok" and "TFLOPs" in row:
                groups.setdefault((op, kind), []).append(row)
        for (op, kind), rows in groups.items():
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            lines: dict[str, list] = {}
            for r in rows:
                label = r["impl"] + (f" ({r['series']})" if r.get("series") else "")
                lines.setdefault(label, []).append(r)
            for ax, metric, ceiling, unit in (
                    (axes[0], "TFLOPs", dev["ceilings"]["matmul_bf16_TFLOPs"], "TFLOP/s"),
                    (axes[1], "GBps", dev["ceilings"]["copy_GBps"], "GB/s")):
                for label, rs in sorted(lines.items()):
                    rs = sorted(rs, key=lambda r: r["params"][r["x"]])
                    ax.plot([r["params"][r["x"]] for r in rs], [r[metric] for r in rs], "o-", label=label)
                ax.axhline(ceiling, color="k", ls="--", lw=1, label=f"measured ceiling {ceiling:,.4g}")
                ax.set_xscale("log", base=2)
                ax.set_xlabel(rows[0]["x"])
                ax.set_ylabel(unit)
                ax.grid(alpha=0.3)
            axes[1].legend(fontsize=7, loc="best")
            title = f"{op} {kind} — {name}"
            fig.suptitle(title + ("\n" + CPU_WARNING if dev["cpu_run"] else ""), fontsize=9)
            fig.tight_layout()
            path = out_dir / f"{device_slug(name)}_{op}_{kind}{'_cpu' if dev['cpu_run'] else ''}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            made[(name, op, kind)] = path.name
    return made


def update_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} block to replace")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{block}\n{END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path, help=f"result files or directories (default {RESULTS_DIR})")
    ap.add_argument("--out", type=Path, help="where report.md and the PNGs go (default: <first path>/report)")
    ap.add_argument("--readme", type=Path, help="also replace the README's bench-results block")
    args = ap.parse_args(argv)
    paths = args.paths or [RESULTS_DIR]
    runs = load(paths)
    if not runs:
        print(f"no result files in {', '.join(map(str, paths))}; run python -m bench first")
        return 1
    first = paths[0] if paths[0].is_dir() else paths[0].parent
    out_dir = args.out or first / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    devices = latest_per_device(runs)
    plots = plot(devices, out_dir)
    gpus = {n: d for n, d in devices.items() if not d["cpu_run"]}
    cpus = {n: d for n, d in devices.items() if d["cpu_run"]}
    print(f"newest run: {runs[-1]['_file']} ({runs[-1]['created']})")
    for name, group in (("report.md", gpus), ("report_cpu.md", cpus)):
        if group:
            (out_dir / name).write_text("# Benchmark results\n\n" + markdown(group, plots))
            n_runs = sum(len(d["runs"]) for d in group.values())
            n_plots = sum(1 for k in plots if k[0] in group)
            print(f"report: {out_dir / name} ({n_runs} runs, {len(group)} devices, {n_plots} plots)")
    if cpus:
        print(CPU_WARNING)
    if args.readme:  # the README shows GPU numbers only: a CPU run checks the harness
        rel = os.path.relpath(out_dir, args.readme.resolve().parent)
        block = (markdown(gpus, {k: f"{rel}/{v}" for k, v in plots.items()}) if gpus else
                 "No GPU results yet: run `python -m bench all` on a GPU, then "
                 "`python -m bench.report --readme README.md`.")
        update_readme(args.readme, block)
        print(f"updated {args.readme} ({len(gpus)} GPU devices)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

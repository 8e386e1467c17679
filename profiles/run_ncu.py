"""python -m profiles.run_ncu OP KIND [--param K=V ...] [--impl NAME] [--out DIR] [--dry-run]

One benchmark case under Nsight Compute, at the card's own clocks (--clock-control none),
with the sections that say what limits a kernel: speed of light, memory workload, compute
workload, warp state, occupancy and launch statistics. Only the calls inside the case's
capture range are profiled (profiles/case.py starts and stops the profiler after warm-up).
Writes DIR/<name>.ncu.ncu-rep, DIR/<name>.ncu.summary.txt (one line per kernel) and
DIR/<name>.ncu.details.csv. Without ncu or a GPU it says so and exits 0.
"""
import sys

from . import _tools

SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "MemoryWorkloadAnalysis_Chart",
            "ComputeWorkloadAnalysis", "WarpStateStats", "Occupancy", "LaunchStats")


def commands(a) -> list[list[str]]:
    rep = str(a.out / _tools.report_name(a, "ncu"))
    profile = ["ncu", "--clock-control", "none", "--profile-from-start", "off", "--target-processes", "all",
               "--nvtx", "--launch-count", "64", "--force-overwrite", "--export", rep]
    for s in SECTIONS:
        profile += ["--section", s]
    profile += _tools.case_command(a)
    summary = ["ncu", "--import", rep + ".ncu-rep", "--print-summary", "per-kernel", "--log-file", rep + ".summary.txt"]
    details = ["ncu", "--import", rep + ".ncu-rep", "--page", "details", "--csv", "--log-file", rep + ".details.csv"]
    return [profile, summary, details]


def main(argv=None) -> int:
    a = _tools.parse_args("python -m profiles.run_ncu", __doc__, argv, iters=1)
    return _tools.run("ncu", commands(a), a)


if __name__ == "__main__":
    sys.exit(main())

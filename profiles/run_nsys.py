"""python -m profiles.run_nsys OP KIND [--param K=V ...] [--impl NAME] [--out DIR] [--dry-run]

One benchmark case under Nsight Systems: CUDA, NVTX and OS-runtime traces of the calls
inside the case's capture range (cudaProfilerStart/Stop in profiles/case.py), then the kernel
and NVTX summaries as CSV (DIR/<name>.nsys_cuda_gpu_kern_sum.csv, ..._nvtx_sum.csv). Works
for the model too (``model prefill``), where the NVTX ranges show each layer's phases.
Without nsys or a GPU it says so and exits 0; some containers forbid the tracing nsys needs,
in which case nsys's own error is printed.
"""
import sys

from . import _tools


def commands(a) -> list[list[str]]:
    rep = str(a.out / _tools.report_name(a, "nsys"))
    profile = ["nsys", "profile", "--trace", "cuda,nvtx,osrt", "--capture-range", "cudaProfilerApi",
               "--capture-range-end", "stop", "--force-overwrite", "true", "--output", rep]
    profile += _tools.case_command(a)
    stats = ["nsys", "stats", "--report", "cuda_gpu_kern_sum", "--report", "nvtx_sum", "--format", "csv",
             "--force-export", "true", "--output", rep, rep + ".nsys-rep"]
    return [profile, stats]


def main(argv=None) -> int:
    a = _tools.parse_args("python -m profiles.run_nsys", __doc__, argv, iters=5)
    return _tools.run("nsys", commands(a), a)


if __name__ == "__main__":
    sys.exit(main())

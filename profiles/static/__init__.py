"""Static roofline of the sm_90a builds at M1 shapes, on a CPU: ``python -m profiles.static``.

- ``aot``: compiles a Triton kernel ahead of time for sm_90a (shared with tests/triton_aot.py);
- ``read``: SASS (MMA kinds and shapes, TMA, cp.async), TTGIR dots and layouts, occupancy;
- ``cases``: every launch the package makes at M1's shapes, its loop trip counts and bytes model;
- ``cuda``: csrc/ through nvcc;
- ``yardstick``: the FlashAttention-2 forward loop the CUDA prefill's instructions per HMMA are
  measured against (yardstick.json, committed; tools/fa2_yardstick.sh reproduces it);
- ``report``: report.json and report.md (committed in this folder).
"""

// The only file that knows torch: registers the framework-free C API of csrc/<op>/ as
// torch.ops.mm1.* CUDA kernels. Fake (meta) implementations live on the Python side
// (mm1_kernels/lightning/cuda_ops.py), so the ops trace under torch.compile.
//
// TORCH_LIBRARY_FRAGMENT, not TORCH_LIBRARY: the Python package also defines ops in the `mm1`
// namespace (torch.library.custom_op("mm1::lightning_attention", ...)), and a second
// TORCH_LIBRARY(mm1, ...) block would fail with a duplicate-namespace error.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "lightning/lightning.h"

namespace {

mm1_dtype_t to_mm1_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MM1_DTYPE_FLOAT32;
    case at::kHalf: return MM1_DTYPE_FLOAT16;
    case at::kBFloat16: return MM1_DTYPE_BFLOAT16;
    default: TORCH_CHECK(false, "mm1 lightning: unsupported dtype ", t);
  }
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

void check_last_dim(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have unit stride in its last dimension");
}

// The ops are callable directly (torch.ops.mm1.*), bypassing api.py's validation: every pointer
// handed to the kernels must be on q's device, or the kernel dereferences a host/foreign pointer.
void check_device(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.device() == q.device(), name, " must be on ", q.device(), ", got ", t.device());
}

int index_bytes(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name, " must be int32 or int64");
  TORCH_CHECK(t.is_contiguous() && t.is_cuda(), name, " must be a contiguous CUDA tensor");
  return t.scalar_type() == at::kLong ? 8 : 4;
}

// (o, final_state): final_state is a [0]-sized fp32 tensor when not requested, which the Python
// op already treats as "no final state" (a Tensor? return does not box through every torch path).
std::tuple<at::Tensor, at::Tensor> lightning_prefill_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slopes,
    const std::optional<at::Tensor>& initial_state, const std::optional<at::Tensor>& cu_seqlens,
    bool output_final_state) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4, "q, k, v must be [B, T, H, D]");
  check_last_dim(q, "q");
  check_last_dim(k, "k");
  check_last_dim(v, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v must share a dtype");
  TORCH_CHECK(slopes.scalar_type() == at::kFloat && slopes.is_contiguous() && slopes.is_cuda(), "slopes must be contiguous fp32 CUDA");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), DV = v.size(3);
  // v is read with q's B/T/H extents; a smaller v would be read out of bounds.
  TORCH_CHECK(v.size(0) == B && v.size(1) == T && v.size(2) == H, "v must be [B, T, H, DV] with q's B, T, H");
  TORCH_CHECK(slopes.numel() == H, "slopes must have one entry per head");
  check_device(k, q, "k");
  check_device(v, q, "v");
  check_device(slopes, q, "slopes");
  const c10::cuda::CUDAGuard guard(q.device());
  int64_t N = B;
  const void* cu_ptr = nullptr;
  int cu_bytes = 4;
  if (cu_seqlens.has_value()) {
    cu_bytes = index_bytes(*cu_seqlens, "cu_seqlens");
    check_device(*cu_seqlens, q, "cu_seqlens");
    TORCH_CHECK(B == 1, "varlen input must be packed with B == 1");
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->numel() >= 1, "cu_seqlens must be [N + 1]");
    N = cu_seqlens->numel() - 1;
    cu_ptr = cu_seqlens->data_ptr();
  }
  const float* init_ptr = nullptr;
  if (initial_state.has_value()) {
    check_device(*initial_state, q, "initial_state");
    TORCH_CHECK(initial_state->scalar_type() == at::kFloat && initial_state->is_contiguous() &&
                    initial_state->sizes() == at::IntArrayRef({N, H, D, DV}),
                "initial_state must be contiguous fp32 [N, H, D, DV]");
    init_ptr = initial_state->data_ptr<float>();
  }
  at::Tensor o = at::empty({B, T, H, DV}, q.options());
  at::Tensor final_state = output_final_state ? at::empty({N, H, D, DV}, q.options().dtype(at::kFloat))
                                              : at::empty({0}, q.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_cuda(mm1_lightning_prefill(
                 to_mm1_dtype(q.scalar_type()), q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(),
                 slopes.data_ptr<float>(), init_ptr, output_final_state ? final_state.data_ptr<float>() : nullptr,
                 cu_ptr, cu_bytes, N, B, T, H, D, DV,
                 q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                 v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), stream),
             "mm1_lightning_prefill");
  return {o, final_state};
}

at::Tensor lightning_decode_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& slopes, at::Tensor& state_cache,
                                 const std::optional<at::Tensor>& slot_ids) {
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3, "q, k, v must be [B, H, D]");
  check_last_dim(q, "q");
  check_last_dim(k, "k");
  check_last_dim(v, "v");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v must share a dtype");
  TORCH_CHECK(slopes.scalar_type() == at::kFloat && slopes.is_contiguous() && slopes.is_cuda(), "slopes must be contiguous fp32 CUDA");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), DV = v.size(2);
  TORCH_CHECK(v.size(0) == B && v.size(1) == H, "v must be [B, H, DV] with q's B, H");
  TORCH_CHECK(slopes.numel() == H, "slopes must have one entry per head");
  check_device(k, q, "k");
  check_device(v, q, "v");
  check_device(slopes, q, "slopes");
  check_device(state_cache, q, "state_cache");
  TORCH_CHECK(state_cache.scalar_type() == at::kFloat && state_cache.is_contiguous() && state_cache.dim() == 4 &&
                  state_cache.size(1) == H && state_cache.size(2) == D && state_cache.size(3) == DV,
              "state_cache must be contiguous fp32 [S, H, D, DV]");
  const c10::cuda::CUDAGuard guard(q.device());
  const void* slot_ptr = nullptr;
  int slot_bytes = 4;
  if (slot_ids.has_value()) {
    slot_bytes = index_bytes(*slot_ids, "slot_ids");
    check_device(*slot_ids, q, "slot_ids");
    TORCH_CHECK(slot_ids->numel() == B, "slot_ids must have one entry per batch row");
    slot_ptr = slot_ids->data_ptr();
  }
  at::Tensor o = at::empty({B, H, DV}, q.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_cuda(mm1_lightning_decode(
                 to_mm1_dtype(q.scalar_type()), q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(),
                 slopes.data_ptr<float>(), state_cache.data_ptr<float>(), slot_ptr, slot_bytes,
                 B, H, D, DV, state_cache.size(0),
                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                 o.stride(0), o.stride(1), stream),
             "mm1_lightning_decode");
  return o;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mm1, m) {
  m.def("lightning_prefill_cuda(Tensor q, Tensor k, Tensor v, Tensor slopes, Tensor? initial_state, "
        "Tensor? cu_seqlens, bool output_final_state) -> (Tensor, Tensor)");
  m.def("lightning_decode_cuda(Tensor q, Tensor k, Tensor v, Tensor slopes, Tensor(a!) state_cache, "
        "Tensor? slot_ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(mm1, CUDA, m) {
  m.impl("lightning_prefill_cuda", &lightning_prefill_cuda);
  m.impl("lightning_decode_cuda", &lightning_decode_cuda);
}

// `import mm1_kernels._C` loads this library (running the registrations above); the module
// itself is empty. The C API symbols (mm1_lightning_*) are exported for ctypes callers.
PyMODINIT_FUNC PyInit__C(void) {  // PyMODINIT_FUNC carries extern "C"
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr,
                                      nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}

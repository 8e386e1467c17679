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
    bool output_final_state, int64_t segment_len, int64_t precision) {
  TORCH_CHECK(segment_len >= 0 && segment_len % 64 == 0, "segment_len must be 0 (no split) or a positive multiple of 64, got ",
              segment_len);
  TORCH_CHECK(precision == 0 || precision == 1, "precision must be 0 (\"default\") or 1 (\"high\"), got ", precision);
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
  // The split's workspace (segment states and table) from the caching allocator: no cudaMalloc per
  // call, and safe to reuse once this stream's kernels are done (the allocator's stream rule).
  const size_t ws_bytes = mm1_lightning_prefill_workspace_bytes(N, B, T, H, D, DV, segment_len);
  at::Tensor workspace = at::empty({static_cast<int64_t>(ws_bytes)}, q.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_cuda(mm1_lightning_prefill(
                 to_mm1_dtype(q.scalar_type()), q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(),
                 slopes.data_ptr<float>(), init_ptr, output_final_state ? final_state.data_ptr<float>() : nullptr,
                 cu_ptr, cu_bytes, N, B, T, H, D, DV,
                 q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                 v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), segment_len,
                 static_cast<int>(precision), ws_bytes ? workspace.data_ptr() : nullptr, ws_bytes, stream),
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
        "Tensor? cu_seqlens, bool output_final_state, int segment_len=0, int precision=0) -> (Tensor, Tensor)");
  m.def("lightning_decode_cuda(Tensor q, Tensor k, Tensor v, Tensor slopes, Tensor(a!) state_cache, "
        "Tensor? slot_ids) -> Tensor");
}

TORCH_LIBRARY_IMPL(mm1, CUDA, m) {
  m.impl("lightning_prefill_cuda", &lightning_prefill_cuda);
  m.impl("lightning_decode_cuda", &lightning_decode_cuda);
}

// ---- MoE (csrc/moe): torch.ops.mm1.moe_route_cuda / fused_moe_cuda; fakes and the Python glue
// in mm1_kernels/moe/cuda_ops.py. Own registration blocks (TORCH_LIBRARY_FRAGMENT / _IMPL may
// appear several times in a translation unit).
#include "moe/moe.h"

namespace mm1_moe_bindings {
namespace {

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

mm1_dtype_t moe_dtype(at::ScalarType t) {
  return t == at::kFloat ? MM1_DTYPE_FLOAT32 : t == at::kHalf ? MM1_DTYPE_FLOAT16 : MM1_DTYPE_BFLOAT16;
}

void moe_check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& logits, int64_t top_k, bool renormalize) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2, "router_logits must be a 2-D CUDA tensor");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                  logits.scalar_type() == at::kBFloat16,
              "router_logits must be fp32, fp16 or bf16");
  TORCH_CHECK(logits.size(1) <= 1 || logits.stride(1) == 1, "router_logits must have unit stride in its last dimension");
  const int64_t T = logits.size(0), E = logits.size(1);
  TORCH_CHECK(E >= 1 && E <= MM1_MOE_MAX_EXPERTS, "router_logits must have 1..", MM1_MOE_MAX_EXPERTS, " experts");
  TORCH_CHECK(top_k >= 1 && top_k <= E, "top_k must be in [1, E]");
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor w = at::empty({T, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({T, top_k}, logits.options().dtype(at::kInt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  moe_check(mm1_moe_route(moe_dtype(logits.scalar_type()), logits.data_ptr(), T, E,
                           T > 1 ? logits.stride(0) : E, static_cast<int>(top_k), renormalize ? 1 : 0,
                           w.data_ptr<float>(), ids.data_ptr<int32_t>(), stream),
             "mm1_moe_route");
  return {w, ids};
}

at::Tensor fused_moe_cuda(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                          const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                          const std::optional<at::Tensor>& w13_scale, const std::optional<at::Tensor>& w2_scale,
                          const std::optional<at::Tensor>& expert_map) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2, "x must be a 2-D CUDA tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "x must be bf16 or fp16");
  const bool q = w13.scalar_type() == at::kChar;
  TORCH_CHECK((q || w13.scalar_type() == x.scalar_type()) && w2.scalar_type() == w13.scalar_type(),
              "w13 and w2 must both have x's dtype, or both be int8");
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3, "w13 must be [E, 2I, hidden] and w2 [E, hidden, I]");
  const int64_t T = x.size(0), H = x.size(1), E = w13.size(0), I = w13.size(1) / 2;
  TORCH_CHECK(w13.size(1) == 2 * I && I > 0 && w13.size(2) == H, "w13 must be [E, 2I, hidden]");
  TORCH_CHECK(w2.size(0) == E && w2.size(1) == H && w2.size(2) == I, "w2 must be [E, hidden, I]");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == T && topk_ids.is_contiguous() &&
                  (topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong),
              "topk_ids must be contiguous int32/int64 [T, k]");
  const int64_t k = topk_ids.size(1);
  TORCH_CHECK(topk_weights.scalar_type() == at::kFloat && topk_weights.is_contiguous() &&
                  topk_weights.dim() == 2 && topk_weights.size(0) == T && topk_weights.size(1) == k,
              "topk_weights must be contiguous fp32 [T, k]");
  for (const at::Tensor* t : {&w13, &w2, &topk_weights, &topk_ids})
    TORCH_CHECK(t->device() == x.device(), "every tensor must be on ", x.device());
  TORCH_CHECK(x.stride(1) == 1 && w13.stride(2) == 1 && w2.stride(2) == 1,
              "x, w13 and w2 must have unit stride in their last dimension");
  // 16-byte vector copies (cp.async): aligned bases and rows.
  const int64_t wel = q ? 16 : 8;
  TORCH_CHECK(aligned16(x) && (x.size(0) <= 1 || x.stride(0) % 8 == 0),
              "x must be 16-byte aligned with rows a multiple of 8 elements apart");
  TORCH_CHECK(aligned16(w13) && w13.stride(0) % wel == 0 && w13.stride(1) % wel == 0,
              "w13 must be 16-byte aligned with expert and row strides multiples of 16 bytes");
  TORCH_CHECK(aligned16(w2) && w2.stride(0) % wel == 0 && w2.stride(1) % wel == 0,
              "w2 must be 16-byte aligned with expert and row strides multiples of 16 bytes");
  const float* s13 = nullptr;
  const float* s2 = nullptr;
  int64_t s13e = 0, s13n = 0, s2e = 0, s2n = 0;
  if (q) {
    TORCH_CHECK(w13_scale.has_value() && w2_scale.has_value(), "int8 weights need w13_scale and w2_scale");
    TORCH_CHECK(w13_scale->scalar_type() == at::kFloat && w13_scale->sizes() == at::IntArrayRef({E, 2 * I}) &&
                    w13_scale->device() == x.device(),
                "w13_scale must be fp32 [E, 2I] on x's device");
    TORCH_CHECK(w2_scale->scalar_type() == at::kFloat && w2_scale->sizes() == at::IntArrayRef({E, H}) &&
                    w2_scale->device() == x.device(),
                "w2_scale must be fp32 [E, hidden] on x's device");
    s13 = w13_scale->data_ptr<float>();
    s2 = w2_scale->data_ptr<float>();
    s13e = w13_scale->stride(0), s13n = w13_scale->stride(1), s2e = w2_scale->stride(0), s2n = w2_scale->stride(1);
  }
  const void* map_ptr = nullptr;
  int map_bytes = 4;
  int64_t map_len = 0;
  if (expert_map.has_value()) {
    TORCH_CHECK(expert_map->dim() == 1 && expert_map->numel() >= 1 && expert_map->is_contiguous() &&
                    (expert_map->scalar_type() == at::kInt || expert_map->scalar_type() == at::kLong) &&
                    expert_map->device() == x.device(),
                "expert_map must be a non-empty contiguous int32/int64 [G] tensor on x's device");
    map_ptr = expert_map->data_ptr();
    map_bytes = expert_map->scalar_type() == at::kLong ? 8 : 4;
    map_len = expert_map->numel();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({T, H}, x.options());
  if (T == 0) return out;
  const mm1_dtype_t dt = moe_dtype(x.scalar_type());
  const size_t ws_bytes = mm1_fused_moe_workspace_size(dt, T, k, E, H, I);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  moe_check(mm1_fused_moe(dt, q ? 1 : 0, x.data_ptr(), x.stride(0), w13.data_ptr(), w13.stride(0), w13.stride(1),
                           w2.data_ptr(), w2.stride(0), w2.stride(1), s13, s13e, s13n, s2, s2e, s2n,
                           topk_weights.data_ptr<float>(), topk_ids.data_ptr(),
                           topk_ids.scalar_type() == at::kLong ? 8 : 4, map_ptr, map_bytes, map_len,
                           out.data_ptr(), out.stride(0), T, k, E, H, I, ws.data_ptr(), ws_bytes, stream),
             "mm1_fused_moe");
  return out;
}

}  // namespace
}  // namespace mm1_moe_bindings

TORCH_LIBRARY_FRAGMENT(mm1, m) {
  m.def("moe_route_cuda(Tensor router_logits, int top_k, bool renormalize) -> (Tensor, Tensor)");
  m.def("fused_moe_cuda(Tensor x, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, "
        "Tensor? w13_scale, Tensor? w2_scale, Tensor? expert_map) -> Tensor");
}

TORCH_LIBRARY_IMPL(mm1, CUDA, m) {
  m.impl("moe_route_cuda", &mm1_moe_bindings::moe_route_cuda);
  m.impl("fused_moe_cuda", &mm1_moe_bindings::fused_moe_cuda);
}
// ---- end of the MoE block

// ---- FP32 head (csrc/head): torch.ops.mm1.head_forward_cuda / head_dlogits_cuda; fakes and the
// Python glue in mm1_kernels/head/cuda_ops.py. Own registration blocks.
#include "head/head.h"

namespace mm1_head_bindings {
namespace {

mm1_dtype_t head_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return MM1_DTYPE_FLOAT32;
    case at::kHalf: return MM1_DTYPE_FLOAT16;
    case at::kBFloat16: return MM1_DTYPE_BFLOAT16;
    default: TORCH_CHECK(false, "mm1 head: hidden must be fp32, fp16 or bf16, got ", t.scalar_type());
  }
}

void head_check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

// hidden [T, K] / weight [V, K]: same dtype and device, unit stride in K (row strides are free).
void check_operands(const at::Tensor& hidden, const at::Tensor& weight) {
  TORCH_CHECK(hidden.is_cuda() && hidden.dim() == 2, "hidden must be a 2-D CUDA tensor [T, K]");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == hidden.size(1), "weight must be [V, K] with hidden's K");
  TORCH_CHECK(weight.device() == hidden.device(), "weight must be on ", hidden.device(), ", got ", weight.device());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "hidden and weight must share a dtype");
  TORCH_CHECK(hidden.size(1) >= 1, "hidden must have K >= 1");
  TORCH_CHECK(hidden.stride(1) == 1 && weight.stride(1) == 1, "hidden and weight must have unit stride in K");
}

// A per-row tensor: contiguous [rows] of the given dtype(s) on hidden's device.
void check_rows(const at::Tensor& t, const at::Tensor& hidden, const char* name, bool index) {
  TORCH_CHECK(t.device() == hidden.device(), name, " must be on ", hidden.device(), ", got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == hidden.size(0) && t.is_contiguous(), name,
              " must be a contiguous [", hidden.size(0), "] tensor");
  if (index) {
    TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name, " must be int32 or int64");
  } else {
    TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be fp32");
  }
}

int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_forward_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets, double temperature,
    bool store_logits) {
  check_operands(hidden, weight);
  check_rows(targets, hidden, "targets", true);
  TORCH_CHECK(weight.size(0) >= 1, "weight must have at least one vocabulary row");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t T = hidden.size(0), V = weight.size(0), K = hidden.size(1);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor lp = at::empty({T}, f32), lse = at::empty({T}, f32), ent = at::empty({T}, f32);
  at::Tensor logits = store_logits ? at::empty({T, V}, f32) : at::empty({0}, f32);
  // 16 bytes per token per vocabulary split, from the caching allocator (no host sync).
  at::Tensor workspace = at::empty({static_cast<int64_t>(mm1_head_workspace_bytes(T, V) / sizeof(float))}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  head_check(mm1_head_forward(head_dtype(hidden), hidden.data_ptr(), weight.data_ptr(), targets.data_ptr(),
                              targets.scalar_type() == at::kLong ? 8 : 4, workspace.data_ptr<float>(),
                              lp.data_ptr<float>(), lse.data_ptr<float>(), ent.data_ptr<float>(),
                              store_logits ? logits.data_ptr<float>() : nullptr, T, V, K, row_stride(hidden),
                              row_stride(weight), V, temperature, stream),
             "mm1_head_forward");
  return {lp, lse, ent, logits};
}

at::Tensor head_dlogits_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                             const at::Tensor& g_lp, const at::Tensor& g_lse, const at::Tensor& g_ent,
                             const at::Tensor& lse, const at::Tensor& entropy, double temperature,
                             int64_t vocab_offset) {
  check_operands(hidden, weight);
  check_rows(targets, hidden, "targets", true);
  check_rows(g_lp, hidden, "g_lp", false);
  check_rows(g_lse, hidden, "g_lse", false);
  check_rows(g_ent, hidden, "g_ent", false);
  check_rows(lse, hidden, "lse", false);
  check_rows(entropy, hidden, "entropy", false);
  TORCH_CHECK(vocab_offset >= 0, "vocab_offset must be >= 0");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t R = hidden.size(0), C = weight.size(0), K = hidden.size(1);
  at::Tensor dz = at::empty({R, C}, hidden.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  head_check(mm1_head_dlogits(head_dtype(hidden), hidden.data_ptr(), weight.data_ptr(), targets.data_ptr(),
                              targets.scalar_type() == at::kLong ? 8 : 4, g_lp.data_ptr<float>(),
                              g_lse.data_ptr<float>(), g_ent.data_ptr<float>(), lse.data_ptr<float>(),
                              entropy.data_ptr<float>(), dz.data_ptr<float>(), R, C, vocab_offset, K,
                              row_stride(hidden), row_stride(weight), C, temperature, stream),
             "mm1_head_dlogits");
  return dz;
}

}  // namespace
}  // namespace mm1_head_bindings

TORCH_LIBRARY_FRAGMENT(mm1, m) {
  m.def("head_forward_cuda(Tensor hidden, Tensor weight, Tensor targets, float temperature, "
        "bool store_logits) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("head_dlogits_cuda(Tensor hidden, Tensor weight, Tensor targets, Tensor g_lp, Tensor g_lse, "
        "Tensor g_ent, Tensor lse, Tensor entropy, float temperature, int vocab_offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(mm1, CUDA, m) {
  m.impl("head_forward_cuda", &mm1_head_bindings::head_forward_cuda);
  m.impl("head_dlogits_cuda", &mm1_head_bindings::head_dlogits_cuda);
}
// ---- end of the head block

// `import mm1_kernels._C` loads this library (running the registrations above); the module
// itself is empty. The C API symbols (mm1_lightning_*) are exported for ctypes callers.
PyMODINIT_FUNC PyInit__C(void) {  // PyMODINIT_FUNC carries extern "C"
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr,
                                      nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}

// C entry point to the CUDA kernels without onnxruntime, for tests and benchmarks (ctypes on device
// pointers, e.g. from torch tensors). It takes the op's own AttnParams; K/V are the full [B, Hkv, Ktot, *]
// tensors (no past concat), or in the shared-buffer form the [B, Hkv, M, *] buffers with the new rows in place
// (toptheta_cuda_append_kv writes them as the op does). bench/toptheta_cuda.py mirrors AttnParams, KernelOptions and
// Plan field for field and checks its mirrors against toptheta_cuda_abi() before the first call.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdio>
#include <mutex>
#include <string>
#include <type_traits>

#include "kernels.h"

namespace {

using toptheta::AttnParams;
using toptheta::cuda::KernelOptions;
using toptheta::cuda::Plan;

static_assert(std::is_standard_layout_v<AttnParams> && std::is_trivially_copyable_v<AttnParams>,
              "AttnParams crosses the C entry point");
static_assert(sizeof(AttnParams) == 232, "AttnParams changed: update bench/toptheta_cuda.py (_AttnParams)");
static_assert(sizeof(KernelOptions) == 20, "KernelOptions changed: update bench/toptheta_cuda.py");
static_assert(sizeof(Plan) == 32, "Plan changed: update bench/toptheta_cuda.py");

// The fields of each struct in declaration order (what bench/toptheta_cuda.py's mirrors must list).
// clang-format off
#define TOPTHETA_ATTN_PARAMS_FIELDS(X)                                                          \
  X(B) X(Hq) X(Hkv) X(Sq) X(Ktot) X(D) X(Dv) X(R) X(scale) X(causal) X(comp_mode) X(dtype)    \
  X(q) X(k) X(v) X(theta) X(sdc) X(mask_kind) X(mask) X(mask_sb) X(mask_sh) X(mask_sq) X(out) \
  X(kept) X(past_lens) X(past_lens_sb) X(kv_capacity) X(Sk) X(shadow_k) X(shadow_range) X(packed) X(softcap)
// clang-format on
#define TOPTHETA_KERNEL_OPTIONS_FIELDS(X) \
  X(force_generic) X(decode_splits) X(prefill_variant) X(decode_kstages) X(no_shadow)
#define TOPTHETA_PLAN_FIELDS(X) X(path) X(splits) X(prefill_variant) X(decode_kstages) X(shadow) X(workspace)

// "Name size: field@offset ...; ..." of the three structs.
std::string Abi() {
  std::string s;
#define TOPTHETA_FIELD(f) s += " " #f "@" + std::to_string(offsetof(Struct, f));
  {
    using Struct = AttnParams;
    s += "AttnParams " + std::to_string(sizeof(Struct)) + ":";
    TOPTHETA_ATTN_PARAMS_FIELDS(TOPTHETA_FIELD)
  }
  {
    using Struct = KernelOptions;
    s += "; KernelOptions " + std::to_string(sizeof(Struct)) + ":";
    TOPTHETA_KERNEL_OPTIONS_FIELDS(TOPTHETA_FIELD)
  }
  {
    using Struct = Plan;
    s += "; Plan " + std::to_string(sizeof(Struct)) + ":";
    TOPTHETA_PLAN_FIELDS(TOPTHETA_FIELD)
  }
#undef TOPTHETA_FIELD
  return s;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) const char* toptheta_cuda_abi() {
  static const std::string abi = Abi();
  return abi.c_str();
}

// The TOPTHETA_* overrides of the environment as it is now (the onnxruntime op reads them once per kernel).
__attribute__((visibility("default"))) void toptheta_cuda_options_from_env(KernelOptions* options) {
  *options = toptheta::cuda::KernelOptionsFromEnv();
}

// Enqueues one call on `stream` (cudaStream_t; null = default stream) with the kernel choice MakePlan makes
// under `options` (null: none), and returns that choice in *plan_out (may be null). Returns 0, or -1 with a
// message in err. Scratch is a cached device buffer (grown with a stream sync; not for concurrent callers).
__attribute__((visibility("default"))) int toptheta_cuda_attention(const AttnParams* params,
                                                                   const KernelOptions* options, Plan* plan_out,
                                                                   void* stream, char* err, int err_len) {
  using namespace toptheta;
  static std::mutex mu;
  static void* buf = nullptr;
  static size_t cap = 0;
  std::lock_guard<std::mutex> lock(mu);

  auto fail = [&](const char* what, const char* why) {
    if (err && err_len > 0) std::snprintf(err, err_len, "%s: %s", what, why);
    return -1;
  };
  AttnParams p = *params;
  if (p.kv_capacity == 0) p.kv_capacity = p.Ktot;  // callers that leave the field out: the concat form
  const int dtype = static_cast<int>(p.dtype), mask_kind = static_cast<int>(p.mask_kind);
  if (dtype < 0 || dtype > 2 || mask_kind < 0 || mask_kind > 3 || p.Hkv <= 0 || p.Hq % p.Hkv != 0 || !(p.scale > 0.f)) {
    return fail("params", "dtype, mask_kind, Hq / Hkv or scale out of range");
  }
  if (p.kv_capacity != p.Ktot) return fail("params", "kv_capacity must equal Ktot (M in the shared form)");
  if (p.past_lens && (p.Sk < p.Sq || p.Sk > p.Ktot || (p.past_lens_sb != 0 && p.past_lens_sb != 1))) {
    return fail("params", "shared form: need Sq <= Sk <= Ktot = M and past_lens_sb 0 or 1");
  }

  int device = 0;
  cudaGetDevice(&device);
  const cuda::Plan plan = cuda::MakePlan(p, cuda::DevicePropsOf(device), options ? *options : KernelOptions{});
  if (plan_out) *plan_out = plan;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (plan.workspace > cap) {
    cudaError_t e = cudaStreamSynchronize(s);
    if (e == cudaSuccess && buf) e = cudaFree(buf);
    buf = nullptr;
    cap = 0;
    if (e == cudaSuccess) e = cudaMalloc(&buf, plan.workspace);
    if (e != cudaSuccess) return fail("workspace", cudaGetErrorString(e));
    cap = plan.workspace;
  }
  const cudaError_t e = cuda::Launch(p, plan, buf, s);
  if (e != cudaSuccess) return fail("launch", cudaGetErrorString(e));
  return 0;
}

// The shared-buffer form's append (what the op runs before the kernels): key / value [B, Hkv, Sk, *] into rows
// [P_b, P_b + Sk) of k_buf / v_buf, sizes, dtype and lengths from params (Ktot = kv_capacity = M). Returns 0, or -1
// with a message in err.
__attribute__((visibility("default"))) int toptheta_cuda_append_kv(const AttnParams* params, void* k_buf, void* v_buf,
                                                                   const void* key, const void* value, void* stream,
                                                                   char* err, int err_len) {
  const AttnParams& p = *params;
  auto fail = [&](const char* why) {
    if (err && err_len > 0) std::snprintf(err, err_len, "append: %s", why);
    return -1;
  };
  if (!p.past_lens || p.kv_capacity != p.Ktot || p.Sk > p.kv_capacity || p.Sk < 0 || static_cast<int>(p.dtype) < 0 ||
      static_cast<int>(p.dtype) > 2) {
    return fail("need past_lens, kv_capacity = Ktot = M >= Sk and a valid dtype");
  }
  const cudaError_t e = toptheta::cuda::LaunchAppendKV(p, k_buf, v_buf, key, value, static_cast<cudaStream_t>(stream));
  return e == cudaSuccess ? 0 : fail(cudaGetErrorString(e));
}

// The shared-buffer form's shadow-K maintenance (what the op runs after the append): quantises into codes / range the
// blocks of 64 keys that the call described by params (Sk new keys at P_b, k = the cache buffer after the append)
// completes (docs/op.md, "Shadow K"). Returns 0, or -1 with a message in err.
__attribute__((visibility("default"))) int toptheta_cuda_shadow_update(const AttnParams* params, void* codes,
                                                                       void* range, void* stream, char* err,
                                                                       int err_len) {
  const AttnParams& p = *params;
  auto fail = [&](const char* why) {
    if (err && err_len > 0) std::snprintf(err, err_len, "shadow update: %s", why);
    return -1;
  };
  if (!p.past_lens || !p.k || p.kv_capacity != p.Ktot || p.Sk > p.kv_capacity || p.Sk < 0 ||
      (p.dtype != toptheta::DType::kF16 && p.dtype != toptheta::DType::kBF16) || p.D % 32 != 0) {
    return fail("need past_lens, k, kv_capacity = Ktot = M >= Sk, fp16/bf16 and D % 32 == 0");
  }
  const cudaError_t e =
      toptheta::cuda::LaunchShadowUpdate(p, static_cast<uint8_t*>(codes), range, static_cast<cudaStream_t>(stream));
  return e == cudaSuccess ? 0 : fail(cudaGetErrorString(e));
}

}  // extern "C"

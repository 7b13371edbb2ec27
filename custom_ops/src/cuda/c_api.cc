// C entry point to the CUDA kernels without onnxruntime, for tests and benchmarks (ctypes on device
// pointers, e.g. from torch tensors). K/V are the full [B, Hkv, Ktot, *] tensors (no past concat).
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <mutex>

#include "kernels.h"

extern "C" {

struct TopThetaCudaArgs {
  int64_t B, Hq, Hkv, Sq, Ktot, D, Dv, R;
  float scale;  // > 0 (no default here)
  int32_t causal, comp_mode, dtype, mask_kind;
  const void* q;
  const void* k;
  const void* v;
  const float* theta;
  const float* sdc;
  const void* mask;
  int64_t mask_sb, mask_sh, mask_sq;
  void* out;
  int32_t* kept;
  int32_t path_out;    // set: 0 generic, 1 prefill, 2 decode
  int32_t splits_out;  // set: decode splits
  int32_t variant_out; // set: prefill kernel variant (0-2 mma.sync kernels, 3 Hopper wgmma kernel)
};

// Enqueues one call on `stream` (cudaStream_t; null = default stream). Returns 0, or -1 with a message
// in err. Scratch is a cached device buffer (grown with a stream sync; not for concurrent callers).
__attribute__((visibility("default"))) int toptheta_cuda_attention(TopThetaCudaArgs* a, void* stream, char* err,
                                                                  int err_len) {
  using namespace toptheta;
  static std::mutex mu;
  static void* buf = nullptr;
  static size_t cap = 0;
  std::lock_guard<std::mutex> lock(mu);

  AttnParams p;
  p.B = a->B;
  p.Hq = a->Hq;
  p.Hkv = a->Hkv;
  p.Sq = a->Sq;
  p.Ktot = a->Ktot;
  p.D = a->D;
  p.Dv = a->Dv;
  p.R = a->R;
  p.scale = a->scale;
  p.causal = a->causal != 0;
  p.comp_mode = a->comp_mode;
  p.dtype = static_cast<DType>(a->dtype);
  p.q = a->q;
  p.k = a->k;
  p.v = a->v;
  p.theta = a->theta;
  p.sdc = a->sdc;
  p.mask_kind = static_cast<MaskKind>(a->mask_kind);
  p.mask = a->mask;
  p.mask_sb = a->mask_sb;
  p.mask_sh = a->mask_sh;
  p.mask_sq = a->mask_sq;
  p.out = a->out;
  p.kept = a->kept;

  int device = 0;
  cudaGetDevice(&device);
  const cuda::Plan plan = cuda::MakePlan(p, device);
  a->path_out = static_cast<int32_t>(plan.path);
  a->splits_out = plan.splits;
  a->variant_out = plan.path == cuda::Path::kPrefill ? plan.prefill_variant : -1;
  auto fail = [&](const char* what, cudaError_t e) {
    if (err && err_len > 0) std::snprintf(err, err_len, "%s: %s", what, cudaGetErrorString(e));
    return -1;
  };
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (plan.workspace > cap) {
    cudaError_t e = cudaStreamSynchronize(s);
    if (e == cudaSuccess && buf) e = cudaFree(buf);
    buf = nullptr;
    cap = 0;
    if (e == cudaSuccess) e = cudaMalloc(&buf, plan.workspace);
    if (e != cudaSuccess) return fail("workspace", e);
    cap = plan.workspace;
  }
  const cudaError_t e = cuda::Launch(p, plan, buf, s);
  if (e != cudaSuccess) return fail("launch", e);
  return 0;
}

}  // extern "C"

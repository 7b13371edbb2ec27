// Shadow K maintenance of the shared-buffer cache (docs/op.md, "Shadow K"): after the append, quantises every block of
// 64 keys that this call completes from the K rows in the cache. The rule is op.md's in float32 with explicitly
// rounded operations (nvcc would otherwise contract a * b + c into an FMA), so the codes and ranges equal the CPU
// op's (../shadow.cc) and bench/toptheta_cuda.py's shadow_k bit for bit. P_b is read on the device (no host sync).
#include "../shadow.h"
#include "common.cuh"

namespace toptheta {
namespace cuda {
namespace {

constexpr int kThreadsQ = 128;

struct ShadowArgs {
  AttnParams p;  // B, Hkv, D, Sk, kv_capacity, past_lens, k (the cache after the append), dtype
  uint8_t* codes;
  void* range;
};

// grid (ceil(Sk / 64), Hkv, B): block x is the x-th block that may complete, floor(P_b / 64) + x; it returns unless
// all of its keys are in the cache now. Dynamic shared memory: lo and step of the D channels (float).
template <typename T>
__global__ void __launch_bounds__(kThreadsQ) ShadowUpdateKernel(const ShadowArgs a) {
  extern __shared__ float grid_f[];
  const int b = blockIdx.z, g = blockIdx.y;
  int64_t first, end;
  ShadowNewBlocks(a.p, b, &first, &end);
  const int64_t n = first + blockIdx.x;
  if (n >= end) return;
  const int D = static_cast<int>(a.p.D);
  const int64_t M = a.p.kv_capacity, nb = (M + kShadowBlock - 1) / kShadowBlock;
  const int64_t head = static_cast<int64_t>(b) * a.p.Hkv + g, row0 = head * M + n * kShadowBlock;
  const T* k = static_cast<const T*>(a.p.k) + row0 * D;
  T* rg = static_cast<T*>(a.range) + (head * nb + n) * 2 * D;
  const float rel = a.p.dtype == DType::kBF16 ? kShadowRelBF16 : kShadowRelF16;
  float* lo = grid_f;
  float* step = grid_f + D;

  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    float mn = Elem<T>::ToF(k[c]), mx = mn;
    bool nan = false;
    for (int j = 0; j < kShadowBlock; ++j) {
      const float v = Elem<T>::ToF(k[static_cast<int64_t>(j) * D + c]);
      nan = nan || isnan(v);
      mn = v < mn ? v : mn;
      mx = v > mx ? v : mx;
    }
    if (nan) mn = mx = __int_as_float(0x7fffffff);  // torch's amin / amax propagate NaN
    mn = __fadd_rn(mn, 0.f);  // -0 -> +0: which zero a min returns differs between implementations
    const float s = __fdiv_rn(__fsub_rn(mx, mn), static_cast<float>(kShadowLevels));
    const float tiny = s > 0.f ? kShadowTiny : 0.f;
    T st = Elem<T>::FromF(__fadd_rn(__fmul_rn(s, 1.f + rel), tiny));
    if (Elem<T>::ToF(st) < s) st = Elem<T>::FromF(__fadd_rn(__fmul_rn(Elem<T>::ToF(st), 1.f + 4.f * rel), tiny));
    rg[c] = Elem<T>::FromF(mn);  // exact: a value of K
    rg[D + c] = st;
    lo[c] = mn;
    step[c] = Elem<T>::ToF(st);
  }
  __syncthreads();

  auto code = [&](int j, int c) -> uint32_t {
    const float s = step[c];
    if (!(s > 0.f)) return 0u;
    const float q = rintf(__fdiv_rn(__fsub_rn(Elem<T>::ToF(k[static_cast<int64_t>(j) * D + c]), lo[c]), s));
    return q >= 0.f ? static_cast<uint32_t>(q <= kShadowLevels ? q : kShadowLevels) : 0u;  // NaN: 0
  };
  const int bytes = D / 2;
  uint8_t* out = a.codes + row0 * bytes;
  for (int u = threadIdx.x; u < kShadowBlock * bytes; u += blockDim.x) {
    const int j = u / bytes, q = u % bytes;
    out[u] = static_cast<uint8_t>(code(j, ShadowChannel(D, 2 * q)) | (code(j, ShadowChannel(D, 2 * q + 1)) << 4));
  }
}

}  // namespace

cudaError_t LaunchShadowUpdate(const AttnParams& p, uint8_t* codes, void* range, cudaStream_t stream) {
  if (p.past_lens == nullptr || codes == nullptr || range == nullptr || p.B == 0 || p.Hkv == 0 || p.Sk == 0) {
    return cudaSuccess;
  }
  if (p.dtype == DType::kF32 || p.D % 32 != 0) return cudaErrorInvalidValue;  // PrepareCall has refused these
  ShadowArgs a{p, codes, range};
  const int64_t per_row = (p.Sk + kShadowBlock - 1) / kShadowBlock;  // blocks a call of Sk keys can complete
  const dim3 grid(static_cast<unsigned>(per_row), static_cast<unsigned>(p.Hkv), static_cast<unsigned>(p.B));
  const size_t smem = 2 * static_cast<size_t>(p.D) * sizeof(float);
  if (p.dtype == DType::kBF16) {
    ShadowUpdateKernel<__nv_bfloat16><<<grid, kThreadsQ, smem, stream>>>(a);
  } else {
    ShadowUpdateKernel<__half><<<grid, kThreadsQ, smem, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace toptheta

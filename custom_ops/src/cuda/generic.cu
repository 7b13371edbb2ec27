// Generic TopThetaAttention kernel: any element type, head dims and mask; one block per query row.
// Two passes over the keys (counts and max, then weights and P·V over kept rows only), scalar fp32.
// Correct for every input the op accepts; the tensor-core kernels cover the fast cases.
#include <cfloat>

#include "common.cuh"

namespace toptheta {
namespace cuda {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ float WarpSum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

__device__ __forceinline__ float WarpMax(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
  return x;
}

// Block-wide sum / max of one value (all threads get the result). `red` holds 32 floats.
__device__ float BlockSum(float x, float* red) {
  x = WarpSum(x);
  const int w = threadIdx.x / 32, n = blockDim.x / 32;
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[w] = x;
  __syncthreads();
  float r = 0.f;
  for (int i = 0; i < n; ++i) r += red[i];
  return r;
}

__device__ float BlockMax(float x, float* red) {
  x = WarpMax(x);
  const int w = threadIdx.x / 32, n = blockDim.x / 32;
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[w] = x;
  __syncthreads();
  float r = -INFINITY;
  for (int i = 0; i < n; ++i) r = fmaxf(r, red[i]);
  return r;
}

template <typename T>
__device__ __forceinline__ float Score(const KernelArgs& a, const float* qs, const T* krow) {
  float acc = 0.f;
  for (int64_t d = 0; d < a.p.D; ++d) acc = fmaf(qs[d], Elem<T>::ToF(krow[d]), acc);
  return acc;
}

// The scaled score, capped when the op has a softcap (before the mask is added).
__device__ __forceinline__ float Scaled(const KernelArgs& a, float raw) {
  const float s = a.p.scale * raw;
  return a.p.softcap > 0.f ? a.p.softcap * tanhf(s / a.p.softcap) : s;
}

// Validity of key j for a row at position `pos` (causal, mask); sets the additive mask value.
__device__ __forceinline__ bool Valid(const KernelArgs& a, const char* mrow, int64_t pos, int64_t j, float* add) {
  *add = 0.f;
  if (a.p.causal && j > pos) return false;
  return mrow ? MaskAt(a, mrow, j, add) : true;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) GenericKernel(const KernelArgs a) {
  extern __shared__ float sm[];
  __shared__ float red[32];
  float* qs = sm;              // [D]
  float* acc = qs + a.p.D;     // [Dv]   sum of p * v
  float* vsum = acc + a.p.Dv;  // [Dv]   sum of valid v (V-mean compensation)
  float* pw = vsum + a.p.Dv;   // [kThreads] weights of one key chunk
  float* uw = pw + kThreads;   // [kThreads] validity of one key chunk

  const int64_t i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t g = h / a.G;
  const int64_t row = (b * a.p.Hq + h) * a.p.Sq + i;
  const T* q = static_cast<const T*>(a.p.q) + QueryOffset(a.p, b, h, i);
  const int64_t klen = KeyLen(a.p, b);  // keys of this batch row; the buffer has kv_capacity rows
  const T* K = static_cast<const T*>(a.p.k) + (b * a.p.Hkv + g) * a.p.kv_capacity * a.p.D;
  const T* V = static_cast<const T*>(a.p.v) + (b * a.p.Hkv + g) * a.p.kv_capacity * a.p.Dv;
  const RowConst rc = RowConstants(a, klen, h, i);
  const char* mrow = MaskRow(a, b, h, i);
  const bool vmc = a.p.comp_mode == 2 && a.p.sdc != nullptr;
  const int tid = threadIdx.x;

  for (int64_t d = tid; d < a.p.D; d += kThreads) qs[d] = Elem<T>::ToF(q[d]);
  for (int64_t d = tid; d < a.p.Dv; d += kThreads) acc[d] = vsum[d] = 0.f;
  __syncthreads();

  // Pass 1: counts and the largest kept score.
  float mx = -INFINITY, nk = 0.f, nv = 0.f;
  for (int64_t j = tid; j < klen; j += kThreads) {
    float add;
    if (!Valid(a, mrow, rc.pos, j, &add)) continue;
    nv += 1.f;
    const float s = Scaled(a, Score(a, qs, K + j * a.p.D)) + add;
    if (!(s < rc.theta)) {  // NaN is kept: it makes the row NaN (docs/op.md, "NaN")
      nk += 1.f;
      mx = fmaxf(mx, s);
    }
  }
  mx = BlockMax(mx, red);
  const int n_kept = static_cast<int>(BlockSum(nk, red));
  const int n_valid = static_cast<int>(BlockSum(nv, red));
  const float m = n_kept > 0 ? fmaxf(rc.theta, mx) : rc.theta;

  // Pass 2: weights of one chunk of keys, then acc += sum_c w_c * v_c over the kept rows.
  float dk = 0.f;
  for (int64_t j0 = 0; j0 < klen; j0 += kThreads) {
    const int64_t j = j0 + tid;
    float w = 0.f, u = 0.f, add;
    if (j < klen && Valid(a, mrow, rc.pos, j, &add)) {
      u = 1.f;
      const float s = Scaled(a, Score(a, qs, K + j * a.p.D)) + add;
      if (!(s < rc.theta)) w = expf(s - m);
    }
    dk += w;
    __syncthreads();
    pw[tid] = w;
    uw[tid] = u;
    __syncthreads();
    const int n = klen - j0 < kThreads ? static_cast<int>(klen - j0) : kThreads;
    for (int64_t d = tid; d < a.p.Dv; d += kThreads) {
      float s = acc[d], t = vsum[d];
      for (int c = 0; c < n; ++c) {
        if (pw[c] != 0.f) s = fmaf(pw[c], Elem<T>::ToF(V[(j0 + c) * a.p.Dv + d]), s);
        if (vmc && uw[c] != 0.f) t += Elem<T>::ToF(V[(j0 + c) * a.p.Dv + d]);
      }
      acc[d] = s;
      vsum[d] = t;
    }
  }
  dk = BlockSum(dk, red);

  const RowFinal f = FinishRow(a, dk, m, rc.theta, rc.rho, n_kept, n_valid);
  const float vscale = n_valid > 0 ? f.dp_inv / static_cast<float>(n_valid) : 0.f;
  T* out = static_cast<T*>(a.p.out) + OutputOffset(a.p, b, h, i);
  for (int64_t d = tid; d < a.p.Dv; d += kThreads) {
    out[d] = Elem<T>::FromF(acc[d] * f.inv + vscale * vsum[d]);
  }
  if (a.p.kept && tid == 0) a.p.kept[row] = n_kept;
}

template <typename T>
cudaError_t Run(const KernelArgs& a, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(a.p.D + 2 * a.p.Dv + 2 * kThreads) * sizeof(float);
  if (smem > 48 * 1024) {  // very large head dims only
    cudaError_t e =
        cudaFuncSetAttribute(GenericKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  dim3 grid(static_cast<unsigned>(a.p.Sq), static_cast<unsigned>(a.p.Hq), static_cast<unsigned>(a.p.B));
  GenericKernel<T><<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchGeneric(const KernelArgs& a, cudaStream_t stream) {
  switch (a.p.dtype) {
    case DType::kF16: return Run<__half>(a, stream);
    case DType::kBF16: return Run<__nv_bfloat16>(a, stream);
    default: return Run<float>(a, stream);
  }
}

}  // namespace cuda
}  // namespace toptheta

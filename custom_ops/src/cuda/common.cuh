// Device helpers shared by the TopThetaAttention CUDA kernels: element types, tensor-core MMA
// (m16n8k16, fp32 accumulate), ldmatrix, cp.async, masks and per-row constants. Semantics: docs/op.md.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "kernels.h"

namespace toptheta {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFull = 0xffffffffu;

// ---- element types ------------------------------------------------------------------------

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static __device__ __forceinline__ float ToF(float x) { return x; }
  static __device__ __forceinline__ float FromF(float x) { return x; }
};

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float ToF(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half FromF(float x) { return __float2half_rn(x); }
  // Two floats packed into one 32-bit register (low half = a).
  static __device__ __forceinline__ uint32_t Pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float ToF(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 FromF(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint32_t Pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// ---- tensor cores -------------------------------------------------------------------------

// D = A(16x16, row) * B(16x8, col) + D, fp32 accumulate.
template <typename T>
__device__ __forceinline__ void Mma16816(float* d, const uint32_t* a, const uint32_t* b);

template <>
__device__ __forceinline__ void Mma16816<__half>(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void Mma16816<__nv_bfloat16>(float* d, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lane l gives the row address of matrix l/8, row l%8.
__device__ __forceinline__ void LdMatrixX4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void LdMatrixX4Trans(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte global -> shared copy; when `full` is false nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool full) {
  const int n = full ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// max(a, b), but NaN when either is NaN (fmaxf drops a NaN): a row's NaN score then still marks its tile as
// live, so that the NaN reaches the softmax (docs/op.md, "NaN"). Same cost as fmaxf (sm_80+).
__device__ __forceinline__ float MaxNan(float a, float b) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Byte offset of the 16-byte chunk `chunk` of row `row` in a tile of rows of CHUNKS chunks,
// XOR-swizzled so that ldmatrix over 8 consecutive rows hits 8 different bank groups.
template <int CHUNKS>
__device__ __forceinline__ uint32_t Swz(int row, int chunk) {
  return static_cast<uint32_t>((row * CHUNKS + (chunk ^ (row & 7))) * 16);
}

// Scores in raw units (q·k, before the scale) capped as the op defines it for softcap = c > 0 (docs/op.md): the
// scaled score becomes c · tanh(scale · s / c), returned in raw units again so that the kernels' threshold test and
// softmax stay as they are. tanhf, not tanh.approx: the keep decision compares the capped score with θ.
__device__ __forceinline__ float SoftcapRaw(float s, float scale, float c) { return c * tanhf(s * scale / c) / scale; }

// Raises a kernel's dynamic shared-memory limit once per device (not a stream operation, so it is also
// safe while a CUDA graph is being captured after the first call).
template <auto kKernel>
inline cudaError_t AllowSmem(int bytes) {
  static unsigned long long done = 0;  // bit per device; racing first calls only repeat the calls
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  const unsigned long long bit = 1ull << (dev & 63);
  if (__atomic_load_n(&done, __ATOMIC_ACQUIRE) & bit) return cudaSuccess;
  if (bytes > 48 * 1024) e = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  // Ask for the largest shared-memory carveout so that several blocks fit on one SM.
  if (e == cudaSuccess) {
    e = cudaFuncSetAttribute(kKernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  }
  if (e == cudaSuccess) __atomic_fetch_or(&done, bit, __ATOMIC_ACQ_REL);
  return e;
}

// Resident blocks per SM of a kernel (after AllowSmem), 1 when the query fails.
template <auto kKernel>
inline int BlocksPerSm(int threads, int smem) {
  if (AllowSmem<kKernel>(smem) != cudaSuccess) return 1;
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, threads, smem) != cudaSuccess || n < 1) {
    cudaGetLastError();
    return 1;
  }
  return n;
}

// ---- programmatic dependent launch (sm_90; no-ops on older targets) -------------------------

// In a kernel launched with cudaLaunchAttributeProgrammaticStreamSerialization: waits until the
// preceding kernel of the stream has completed and its memory writes are visible.
__device__ __forceinline__ void GridDependencyWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the programmatic dependent of this kernel be scheduled before this grid finishes.
__device__ __forceinline__ void TriggerDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Whether the current device supports programmatic dependent launch (compute capability >= 9.0).
inline bool HasProgrammaticLaunch() {
  static int cached[64] = {};  // 0 unknown, 1 no, 2 yes
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  int& c = cached[dev & 63];
  if (c == 0) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
      cudaGetLastError();
      major = 0;
    }
    c = major >= 9 ? 2 : 1;
  }
  return c == 2;
}

// ---- masks and per-row constants ----------------------------------------------------------

// Reads one mask element; returns whether the key may be attended and sets the additive value.
__device__ __forceinline__ bool MaskAt(const KernelArgs& a, const char* row, int64_t j, float* add) {
  switch (a.p.mask_kind) {
    case MaskKind::kBool: *add = 0.f; return reinterpret_cast<const uint8_t*>(row)[j] != 0;
    case MaskKind::kAdditive:
      if (a.p.dtype == DType::kF16) {
        *add = __half2float(reinterpret_cast<const __half*>(row)[j]);
        return *add > -65504.f;
      }
      if (a.p.dtype == DType::kBF16) {
        *add = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(row)[j]);
        return *add > -1e30f;
      }
      *add = reinterpret_cast<const float*>(row)[j];
      return *add > -1e30f;
    case MaskKind::kAdditiveF32: *add = reinterpret_cast<const float*>(row)[j]; return *add > -1e30f;
    default: *add = 0.f; return true;
  }
}

// Start of the mask row of (b, h, i) (element size folded in), or null without a mask.
__device__ __forceinline__ const char* MaskRow(const KernelArgs& a, int64_t b, int64_t h, int64_t i) {
  if (a.p.mask_kind == MaskKind::kNone) return nullptr;
  const int64_t esz = a.p.mask_kind == MaskKind::kBool                                     ? 1
                      : (a.p.mask_kind == MaskKind::kAdditive && a.p.dtype != DType::kF32) ? 2
                                                                                           : 4;
  return static_cast<const char*>(a.p.mask) + (b * a.p.mask_sb + h * a.p.mask_sh + i * a.p.mask_sq) * esz;
}

// Key-padding masks ([B, Ktot] bool; [B, M] in the shared form) are the same for every row: the kernels then treat
// a tile whose keys are all allowed like an unmasked one. Returns that batch's mask row, or null for other masks.
__device__ __forceinline__ const uint8_t* KeyPaddingRow(const KernelArgs& a, int64_t b) {
  if (a.p.mask_kind != MaskKind::kBool || a.p.mask_sh != 0 || a.p.mask_sq != 0) return nullptr;
  return static_cast<const uint8_t*>(a.p.mask) + b * a.p.mask_sb;
}

// True (in every lane) when keys [k0, k0 + n) are all < ktot (the batch row's keys) and allowed by the key-padding
// row kp (each lane reads n / 32 bytes).
__device__ __forceinline__ bool KeysAllAllowed(const uint8_t* kp, int64_t k0, int n, int64_t ktot, int lane) {
  bool ok = true;
  for (int c = lane; c < n; c += 32) ok = ok && k0 + c < ktot && kp[k0 + c] != 0;
  return __all_sync(kFull, ok);
}

// True (in every thread of the block) when the key-padding row kp allows every key of [lo, hi). The threads read
// the range in 16-byte words (bytes outside the aligned words one at a time), so a few loads per thread cover
// the thousands of keys of a decode block; call it from every thread of the block.
__device__ __forceinline__ bool BlockKeysAllowed(const uint8_t* kp, int lo, int hi) {
  const auto lo_a = static_cast<int>((16 - reinterpret_cast<uintptr_t>(kp + lo) % 16) % 16) + lo;
  const int words = hi > lo_a ? (hi - lo_a) / 16 : 0;
  const int hi_a = min(lo_a, hi) + words * 16;  // bytes [lo, min(lo_a, hi)) and [hi_a, hi) go one by one
  bool ok = true;
  for (int j = lo + static_cast<int>(threadIdx.x); j < min(lo_a, hi); j += blockDim.x) ok = ok && kp[j] != 0;
  for (int j = hi_a + static_cast<int>(threadIdx.x); j < hi; j += blockDim.x) ok = ok && kp[j] != 0;
  const uint4* w = reinterpret_cast<const uint4*>(kp + lo_a);
#pragma unroll 4
  for (int i = static_cast<int>(threadIdx.x); i < words; i += blockDim.x) {
    const uint4 x = __ldg(w + i);
    // A zero byte in a word: (x - 0x01..) & ~x & 0x80.. is nonzero.
    const uint32_t z = ((x.x - 0x01010101u) & ~x.x) | ((x.y - 0x01010101u) & ~x.y) | ((x.z - 0x01010101u) & ~x.z) |
                       ((x.w - 0x01010101u) & ~x.w);
    ok = ok && (z & 0x80808080u) == 0;
  }
  return __syncthreads_and(ok) != 0;
}

// The (batch, query head, first row) of a prefill block; 1-D grid of B * Hq * ceil(Sq / bm) blocks: query
// heads fastest (consecutive blocks share the K/V of a KV head in L2), then row blocks longest first (causal
// load balance), then batch. (Issuing the blocks KV head by KV head measured no faster on an H100.)
struct PrefillBlock {
  int64_t b, h;
  int i0;
};

__device__ __forceinline__ PrefillBlock PrefillBlockOf(const KernelArgs& a, int bm) {
  const int64_t ntq = (a.p.Sq + bm - 1) / bm;
  const int64_t id = blockIdx.x;
  PrefillBlock p;
  p.h = id % a.p.Hq;
  const int64_t rb = (id / a.p.Hq) % ntq;
  p.b = id / a.p.Hq / ntq;
  p.i0 = static_cast<int>((ntq - 1 - rb) * bm);
  return p;
}

struct RowConst {
  int64_t pos;  // row position r
  float theta;
  float rho;
};

// Row i of query head h in a batch row of klen = KeyLen(a.p, b) keys.
__device__ __forceinline__ RowConst RowConstants(const KernelArgs& a, int64_t klen, int64_t h, int64_t i) {
  RowConst c;
  c.pos = klen - a.p.Sq + i;
  int64_t rr = c.pos < a.p.R - 1 ? c.pos : a.p.R - 1;
  rr = rr < 0 ? 0 : rr;
  c.theta = a.p.theta[h * a.p.R + rr];
  c.rho = a.p.sdc ? a.p.sdc[h * a.p.R + rr] : 0.f;
  return c;
}

// Final value of one row (docs/op.md): the compensation Dp from the counts, then
// (N + Dp * vbar) / (Dk + Dp). `num` is N[d] and `vbar` the V mean (comp_mode 2) or null.
struct RowFinal {
  float inv;     // 1 / (Dk + Dp), 0 when the denominator is 0, NaN when it is NaN
  float dp_inv;  // Dp / (Dk + Dp) when V-mean compensation applies, else 0
};

__device__ __forceinline__ RowFinal FinishRow(const KernelArgs& a, float dk, float m, float theta, float rho,
                                              int n_kept, int n_valid) {
  const int n_pruned = n_valid - n_kept;
  float dp = 0.f;
  if (a.p.comp_mode >= 1 && a.p.sdc != nullptr && n_pruned > 0) {
    dp = static_cast<float>(n_pruned) * rho * (n_kept > 0 ? expf(theta - m) : 1.f);
  }
  const float den = dk + dp;
  RowFinal f;
  // A NaN denominator (a NaN score was kept) keeps the row NaN. Clamped to FLT_MIN: 1 / den overflows for a row that
  // keeps nothing (Dk = 0, so N = 0) whose Dp is denormal (a tiny calibrated ρ), and 0 * inf would make it NaN.
  f.inv = !(den <= 0.f) ? 1.f / (den < FLT_MIN ? FLT_MIN : den) : 0.f;
  f.dp_inv = (a.p.comp_mode == 2 && dp > 0.f) ? dp / den : 0.f;
  return f;
}

}  // namespace cuda
}  // namespace toptheta

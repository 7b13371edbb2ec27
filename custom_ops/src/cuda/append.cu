// Shared-buffer KV cache (docs/op.md): writes the Sk new K and V rows of every (batch, kv head), given heads first
// or packed, to rows [P_b, P_b + Sk) of the [B, Hkv, M, *] cache buffers. P_b is read here, on the device (KeyLen
// clamps it to [0, M - Sk]), so that the op needs no host synchronisation and CUDA graphs replay it with the lengths
// current at replay time.
#include "common.cuh"

namespace toptheta {
namespace cuda {
namespace {

struct AppendArgs {
  AttnParams p;  // B, Hkv, Sk, kv_capacity, past_lens
  void* dst[2];
  const void* src[2];
  int64_t row_units[2];  // units of U per K / V row
};

// blockIdx.y: 0 key, 1 value. Threads stride over every unit of every new row.
template <typename U>
__global__ void __launch_bounds__(256) AppendKernel(const AppendArgs a) {
  const int t = blockIdx.y;
  const int64_t per_row = a.row_units[t];
  const int64_t total = a.p.B * a.p.Hkv * a.p.Sk * per_row;
  U* dst = static_cast<U*>(a.dst[t]);
  const U* src = static_cast<const U*>(a.src[t]);
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < total;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = u / per_row, off = u % per_row;  // row = (b * Hkv + g) * Sk + s
    const int64_t s = row % a.p.Sk, bg = row / a.p.Sk;
    const int64_t b = bg / a.p.Hkv, g = bg % a.p.Hkv;
    const int64_t P = KeyLen(a.p, b) - a.p.Sk;
    const int64_t from = a.p.packed ? (b * a.p.Sk + s) * a.p.Hkv + g : row;  // packed new rows: [B, Sk, Hkv, *]
    dst[(bg * a.p.kv_capacity + P + s) * per_row + off] = src[from * per_row + off];
  }
}

template <typename U>
cudaError_t Run(AppendArgs& a, int64_t row_bytes[2], cudaStream_t stream) {
  int64_t most = 0;
  for (int t = 0; t < 2; ++t) {
    a.row_units[t] = row_bytes[t] / static_cast<int64_t>(sizeof(U));
    most = a.row_units[t] > most ? a.row_units[t] : most;
  }
  const int64_t units = a.p.B * a.p.Hkv * a.p.Sk * most;
  const int64_t blocks = (units + 255) / 256;
  const dim3 grid(static_cast<unsigned>(blocks < 1024 ? blocks : 1024), 2);
  AppendKernel<U><<<grid, 256, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchAppendKV(const AttnParams& p, void* k_buf, void* v_buf, const void* key, const void* value,
                           cudaStream_t stream) {
  if (p.past_lens == nullptr || p.B == 0 || p.Hkv == 0 || p.Sk == 0) return cudaSuccess;
  AppendArgs a{p, {k_buf, v_buf}, {key, value}, {0, 0}};
  const int64_t esz = p.dtype == DType::kF32 ? 4 : 2;
  int64_t row_bytes[2] = {p.D * esz, p.Dv * esz};
  // The widest unit that divides both row sizes and all four addresses.
  uint64_t align = static_cast<uint64_t>(row_bytes[0] | row_bytes[1]);
  for (const void* ptr : {static_cast<const void*>(k_buf), static_cast<const void*>(v_buf), key, value}) {
    align |= reinterpret_cast<uintptr_t>(ptr);
  }
  if (align % 16 == 0) return Run<uint4>(a, row_bytes, stream);
  if (align % 8 == 0) return Run<uint2>(a, row_bytes, stream);
  if (align % 4 == 0) return Run<uint32_t>(a, row_bytes, stream);
  return Run<uint16_t>(a, row_bytes, stream);
}

}  // namespace cuda
}  // namespace toptheta

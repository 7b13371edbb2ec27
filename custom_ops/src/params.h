// The one description of a TopThetaAttention call: filled by the op layer (op_common.cc PrepareCall, for
// the CPU and the CUDA op) and read as is by the CPU kernel, the CUDA kernels (inside cuda::KernelArgs) and
// the CUDA C entry point (cuda/c_api.cc; bench/toptheta_cuda.py mirrors it field for field, checked at load).
// Semantics: docs/op.md.
#pragma once

#include <cstdint>

// Helpers below are called from CUDA kernels too (params.h is included by the .cu files).
#if defined(__CUDACC__)
#define TOPTHETA_HD __host__ __device__
#else
#define TOPTHETA_HD
#endif

namespace toptheta {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

enum class MaskKind : int {
  kNone = 0,
  kBool = 1,        // bool, true = may attend
  kAdditive = 2,    // additive float mask of the same type as Q (T)
  kAdditiveF32 = 3  // additive float32 mask when T is not float32
};

struct AttnParams {
  // Sizes. K/V pointers below hold [B, Hkv, kv_capacity, D] tensors: in the concat form the full
  // [past ; new] keys (kv_capacity = Ktot), in the shared-buffer form the cache buffer (kv_capacity =
  // Ktot = M) whose rows [0, KeyLen(p, b)) are valid for batch row b.
  int64_t B = 0, Hq = 0, Hkv = 0, Sq = 0, Ktot = 0, D = 0, Dv = 0, R = 0;
  float scale = 0.f;
  bool causal = false;
  int comp_mode = 0;  // 0 none, 1 SDC, 2 SDC + VMC
  DType dtype = DType::kF32;

  const void* q = nullptr;       // [B, Hq, Sq, D]
  const void* k = nullptr;       // [B, Hkv, Ktot, D]
  const void* v = nullptr;       // [B, Hkv, Ktot, Dv]
  const float* theta = nullptr;  // [Hq, R]
  const float* sdc = nullptr;    // [Hq, R] or null

  // Mask element (b, h, i, j) lives at mask + b*mask_sb + h*mask_sh + i*mask_sq + j
  // (strides in elements; 0 for broadcast dimensions). A [B, Ktot] key-padding mask has
  // mask_sh = mask_sq = 0 (shared form: [B, M]).
  MaskKind mask_kind = MaskKind::kNone;
  const void* mask = nullptr;
  int64_t mask_sb = 0, mask_sh = 0, mask_sq = 0;

  void* out = nullptr;      // [B, Hq, Sq, Dv]
  int32_t* kept = nullptr;  // [B, Hq, Sq] or null

  // Shared-buffer KV cache (docs/op.md): P_b = past_lens[b * past_lens_sb] valid rows before the Sk new
  // ones (already written at [P_b, P_b + Sk) of k/v). Null: the classic concat form. The lengths live in
  // the memory of the kernel (device memory on CUDA).
  const int32_t* past_lens = nullptr;
  int64_t past_lens_sb = 0;  // 1 for a [B] tensor, 0 for [1] (broadcast)
  int64_t kv_capacity = 0;   // rows per (b, kv head) in k/v: M (shared form), Ktot (concat form)
  int64_t Sk = 0;            // new keys of this call

  // Shadow K (docs/op.md, "Shadow K"; CUDA decode only): kShadowBits-bit codes of every key, [B, Hkv, kv_capacity,
  // D / 2] bytes in the lane order of docs/cuda-notes.md, and per block of kShadowBlock keys and channel the
  // grid's (min, step) in the type of K, [B, Hkv, ceil(kv_capacity / kShadowBlock), 2, D]. Key j's code c gives
  // min + c * step, within step / 2 of K. Only blocks whose kShadowBlock keys are all in the cache are read. Null:
  // no shadow.
  const uint8_t* shadow_k = nullptr;
  const void* shadow_range = nullptr;

  // Layout of query, output and the new key/value (docs/op.md, "Layouts"). false: heads first, [B, H, S, *];
  // true: packed, [B, S, H·*] (onnxruntime GroupQueryAttention's), which the graph produces without a Transpose.
  // The cache the kernels read (k, v above) is [B, Hkv, kv_capacity, *] in both: the op copies or appends the
  // new rows into it (a packed call always goes through a buffer).
  bool packed = false;

  // > 0: every score is capped to softcap * tanh(score / softcap) before the mask is added (Gemma 2; docs/op.md).
  float softcap = 0.f;
};

constexpr int kShadowBlock = 64;
constexpr int kShadowBits = 4;

// Keys of batch row b, Ktot_b = P_b + Sk (Ktot in the concat form). P_b is clamped to [0, M - Sk]: the CPU op
// has rejected other values, the CUDA op cannot (no host read of device memory), so its kernels stay in bounds.
TOPTHETA_HD inline int64_t KeyLen(const AttnParams& p, int64_t b) {
  if (p.past_lens == nullptr) return p.Ktot;
  const int64_t hi = p.kv_capacity - p.Sk;
  int64_t P = p.past_lens[b * p.past_lens_sb];
  P = P < 0 ? 0 : (P > hi ? hi : P);
  return P + p.Sk;
}

// Row position of query index i of a batch row with klen = KeyLen(p, b) keys (bottom-right aligned), and
// its threshold row.
TOPTHETA_HD inline int64_t RowPosition(const AttnParams& p, int64_t klen, int64_t i) { return klen - p.Sq + i; }
TOPTHETA_HD inline int64_t ThresholdRow(const AttnParams& p, int64_t klen, int64_t i) {
  int64_t r = RowPosition(p, klen, i);
  return r < p.R - 1 ? r : p.R - 1;
}

// Element offset of query row (b, h, i), and the stride in elements from row i to row i + 1 of one head.
TOPTHETA_HD inline int64_t QueryOffset(const AttnParams& p, int64_t b, int64_t h, int64_t i) {
  return (p.packed ? (b * p.Sq + i) * p.Hq + h : (b * p.Hq + h) * p.Sq + i) * p.D;
}
TOPTHETA_HD inline int64_t QueryRowStride(const AttnParams& p) { return p.packed ? p.Hq * p.D : p.D; }
// The same for the output (Dv elements per row).
TOPTHETA_HD inline int64_t OutputOffset(const AttnParams& p, int64_t b, int64_t h, int64_t i) {
  return (p.packed ? (b * p.Sq + i) * p.Hq + h : (b * p.Hq + h) * p.Sq + i) * p.Dv;
}
TOPTHETA_HD inline int64_t OutputRowStride(const AttnParams& p) { return p.packed ? p.Hq * p.Dv : p.Dv; }

// Additive mask values at or below these exclude a key (see docs/op.md).
constexpr float kMaskedF32 = -1e30f;
constexpr float kMaskedF16 = -65504.f;

}  // namespace toptheta

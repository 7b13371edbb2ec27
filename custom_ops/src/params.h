// The one description of a TopThetaAttention call: filled by the op layer (op_common.cc PrepareCall, for
// the CPU and the CUDA op) and read as is by the CPU kernel, the CUDA kernels (inside cuda::KernelArgs) and
// the CUDA C entry point (cuda/c_api.cc; bench/toptheta_cuda.py mirrors it field for field, checked at load).
// Semantics: docs/op.md.
#pragma once

#include <cstdint>

namespace toptheta {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

enum class MaskKind : int {
  kNone = 0,
  kBool = 1,        // bool, true = may attend
  kAdditive = 2,    // additive float mask of the same type as Q (T)
  kAdditiveF32 = 3  // additive float32 mask when T is not float32
};

struct AttnParams {
  // Sizes. K/V pointers below always hold the full, contiguous [B, Hkv, Ktot, D] tensors
  // (past already concatenated by the op layer).
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
  // mask_sh = mask_sq = 0.
  MaskKind mask_kind = MaskKind::kNone;
  const void* mask = nullptr;
  int64_t mask_sb = 0, mask_sh = 0, mask_sq = 0;

  void* out = nullptr;      // [B, Hq, Sq, Dv]
  int32_t* kept = nullptr;  // [B, Hq, Sq] or null
};

// Row position of query index i (bottom-right aligned) and its threshold row.
inline int64_t RowPosition(const AttnParams& p, int64_t i) { return p.Ktot - p.Sq + i; }
inline int64_t ThresholdRow(const AttnParams& p, int64_t i) {
  int64_t r = RowPosition(p, i);
  return r < p.R - 1 ? r : p.R - 1;
}

// Additive mask values at or below these exclude a key (see docs/op.md).
constexpr float kMaskedF32 = -1e30f;
constexpr float kMaskedF16 = -65504.f;

}  // namespace toptheta

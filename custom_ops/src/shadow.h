// The shadow K of the shared-buffer cache (docs/op.md, "Shadow K"): which blocks a call completes, the lane order
// of the codes, and the host quantiser (the CUDA one is cuda/shadow.cu; both follow the rule of op.md, which is
// bench/toptheta_cuda.py's shadow_k, operation for operation in float32).
#pragma once

#include <cstdint>

#include "params.h"

namespace toptheta {

constexpr int kShadowLevels = (1 << kShadowBits) - 1;  // codes 0..15
// Relative increase of a step before it is rounded to T: at least one ulp of T (fp16 2^-10, bf16 2^-7 relative at
// most), so that the rounded step stays >= (max - min) / 15; 4x that for the rare second try.
constexpr float kShadowRelF16 = 0x1p-9f;
constexpr float kShadowRelBF16 = 0x1p-7f;
constexpr float kShadowTiny = 0x1p-24f;  // the fp16 subnormal spacing, added to a positive step

// Channel held by nibble slot s (0 <= s < D) of a key's D/2 code bytes (byte s / 2, low nibble for even s): lane t
// of a quad owns 32-bit words [t·D/32, (t+1)·D/32), and nibble n = 4·odd + 2·kp + half of its word i is channel
// 16·(2i + kp) + 2t + 8·half + odd (docs/cuda-notes.md, "Shadow K").
TOPTHETA_HD inline int ShadowChannel(int D, int s) {
  const int words = D / 32, t = s / (8 * words), i = (s / 8) % words, n = s % 8;
  const int odd = n >> 2, kp = (n >> 1) & 1, half = n & 1;
  return 16 * (2 * i + kp) + 2 * t + 8 * half + odd;
}

// The shadow blocks of batch row b that this call completes: [*first, *end), those whose kShadowBlock keys are all
// in the cache after the call (klen = P_b + Sk keys) and were not before (P_b keys).
TOPTHETA_HD inline void ShadowNewBlocks(const AttnParams& p, int64_t b, int64_t* first, int64_t* end) {
  const int64_t klen = KeyLen(p, b);
  *first = (klen - p.Sk) / kShadowBlock;
  *end = klen / kShadowBlock;
}

// Host (CPU op): quantises every block the call completes from the cache rows p.k (after the append) into codes
// [B, Hkv, M, D/2] and range [B, Hkv, ceil(M/64), 2, D] (p.dtype: fp16 or bf16). Other blocks are left as they are.
void UpdateShadowOnHost(const AttnParams& p, uint8_t* codes, void* range);

}  // namespace toptheta

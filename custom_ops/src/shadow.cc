// Host quantiser of the shadow K (docs/op.md, "Shadow K"). Built with -ffp-contract=off (CMakeLists.txt): the rule
// is separate float32 operations, and a fused multiply-add would round differently from the reference and the GPU.
#include "shadow.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "half.h"

namespace toptheta {
namespace {

float Bf16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t FloatToBf16(float f) {  // round to nearest even, as torch and __float2bfloat16_rn
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

}  // namespace

void UpdateShadowOnHost(const AttnParams& p, uint8_t* codes, void* range) {
  const bool bf16 = p.dtype == DType::kBF16;
  auto to_f = [bf16](uint16_t h) { return bf16 ? Bf16ToFloat(h) : HalfToFloat(h); };
  auto to_t = [bf16](float f) { return bf16 ? FloatToBf16(f) : FloatToHalf(f); };
  const float rel = bf16 ? kShadowRelBF16 : kShadowRelF16;
  const int D = static_cast<int>(p.D);
  const int64_t M = p.kv_capacity, nb = (M + kShadowBlock - 1) / kShadowBlock;
  const uint16_t* k = static_cast<const uint16_t*>(p.k);
  uint16_t* rng = static_cast<uint16_t*>(range);
  std::vector<float> x(static_cast<size_t>(kShadowBlock) * D), lo(D), step(D);
  std::vector<uint8_t> c(static_cast<size_t>(kShadowBlock) * D);
  for (int64_t b = 0; b < p.B; ++b) {
    int64_t first, end;
    ShadowNewBlocks(p, b, &first, &end);
    for (int64_t g = 0; g < p.Hkv; ++g) {
      const int64_t head = b * p.Hkv + g;
      for (int64_t n = first; n < end; ++n) {
        const int64_t row0 = head * M + n * kShadowBlock;
        for (size_t i = 0; i < x.size(); ++i) x[i] = to_f(k[row0 * D + static_cast<int64_t>(i)]);
        uint16_t* r = rng + (head * nb + n) * 2 * D;
        for (int ch = 0; ch < D; ++ch) {
          float mn = x[ch], mx = x[ch];
          bool nan = false;
          for (int j = 0; j < kShadowBlock; ++j) {
            const float v = x[static_cast<size_t>(j) * D + ch];
            nan = nan || std::isnan(v);
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
          }
          if (nan) mn = mx = NAN;  // torch's amin / amax propagate NaN
          mn = mn + 0.f;           // -0 -> +0: which zero a min returns differs between implementations
          const float s = (mx - mn) / static_cast<float>(kShadowLevels);
          const float tiny = s > 0.f ? kShadowTiny : 0.f;
          uint16_t st = to_t(s * (1.f + rel) + tiny);
          if (to_f(st) < s) st = to_t(to_f(st) * (1.f + 4.f * rel) + tiny);
          r[ch] = to_t(mn);  // exact: a value of K
          r[D + ch] = st;
          lo[ch] = mn;
          step[ch] = to_f(st);
        }
        for (int j = 0; j < kShadowBlock; ++j) {
          for (int ch = 0; ch < D; ++ch) {
            const float s = step[ch];
            const float q = s > 0.f ? std::nearbyint((x[static_cast<size_t>(j) * D + ch] - lo[ch]) / s) : 0.f;
            c[static_cast<size_t>(j) * D + ch] =
                static_cast<uint8_t>(q >= 0.f ? (q <= kShadowLevels ? q : kShadowLevels) : 0.f);  // NaN: 0
          }
        }
        uint8_t* out = codes + row0 * (D / 2);
        for (int j = 0; j < kShadowBlock; ++j) {
          const uint8_t* cj = &c[static_cast<size_t>(j) * D];
          for (int q = 0; q < D / 2; ++q) {
            out[j * (D / 2) + q] =
                static_cast<uint8_t>(cj[ShadowChannel(D, 2 * q)] | (cj[ShadowChannel(D, 2 * q + 1)] << 4));
          }
        }
      }
    }
  }
}

}  // namespace toptheta

// Row conversion float16 -> float: F16C when the CPU has it (chosen at run time), portable otherwise.
#include "half.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TOPTHETA_X86_F16C 1
#endif

namespace toptheta {
namespace {

void RowPortable(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = HalfToFloat(src[i]);
}

#ifdef TOPTHETA_X86_F16C
__attribute__((target("avx,f16c"))) void RowF16C(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = HalfToFloat(src[i]);
}

bool HasF16C() {
  static const bool ok = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif

}  // namespace

void HalfToFloatRow(const uint16_t* src, float* dst, int64_t n) {
#ifdef TOPTHETA_X86_F16C
  if (HasF16C()) return RowF16C(src, dst, n);
#endif
  RowPortable(src, dst, n);
}

}  // namespace toptheta

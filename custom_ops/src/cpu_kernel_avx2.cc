// The AVX2 + FMA instruction-set policy of cpu_kernel_body.h (D and Dv multiples of 8). Compiled with
// -mavx2 -mfma (CMakeLists.txt) and only called when the CPU has both (cpu_kernel.cc, UseAvx2).
#include <immintrin.h>

#include "cpu_kernel_body.h"

namespace toptheta {
namespace cpu {
namespace {

inline float HorizontalSum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

inline float HorizontalMax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

// [sum(a0), ..., sum(a7)]: the 8 dot products of one query row with 8 keys.
inline __m256 Reduce8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  const __m256 t0 = _mm256_hadd_ps(a0, a1), t1 = _mm256_hadd_ps(a2, a3);
  const __m256 t2 = _mm256_hadd_ps(a4, a5), t3 = _mm256_hadd_ps(a6, a7);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// exp(x), about 1 ulp on [-87, 88]; 0 below -87 (far below the row max's exp(0) = 1 it is added to); NaN stays NaN.
inline __m256 Exp(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.f);
  __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.f), _mm256_max_ps(lo, x));  // NaN passes (second operand)
  const __m256 n =
      _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.f / 5040.f);  // Taylor to degree 7 on |r| <= ln2 / 2: error < 1e-8 relative
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 720.f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 120.f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 24.f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f / 6.f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  y = _mm256_and_ps(y, _mm256_cmp_ps(x, lo, _CMP_NLT_UQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// Compaction table: for each 8-bit keep mask, the positions of its set bits, one nibble each, lowest first.
struct CompactTable {
  uint32_t idx[256];
  CompactTable() {
    for (int m = 0; m < 256; ++m) {
      uint32_t v = 0;
      int k = 0;
      for (int b = 0; b < 8; ++b) {
        if (m & (1 << b)) v |= static_cast<uint32_t>(b) << (4 * k++);
      }
      idx[m] = v;
    }
  }
};
const CompactTable kCompact;

template <int R>
inline void AccumulateChunk(float* acc, const float* w, const int32_t* idx, int64_t k, const float* V, int64_t Dv) {
  __m256 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm256_loadu_ps(acc + 8 * r);
  for (int64_t t = 0; t < k; ++t) {
    const __m256 wv = _mm256_broadcast_ss(w + t);
    const float* v = V + static_cast<int64_t>(idx[t]) * Dv;
    for (int r = 0; r < R; ++r) a[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + 8 * r), a[r]);
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc + 8 * r, a[r]);
}

struct Avx2Isa {
  static void Dots(const float* q, const float* K, int64_t n, int64_t D, float* dots) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const float* k = K + j * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + d), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + D + d), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * D + d), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * D + d), a3);
        a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 4 * D + d), a4);
        a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 5 * D + d), a5);
        a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 6 * D + d), a6);
        a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 7 * D + d), a7);
      }
      _mm256_storeu_ps(dots + j, Reduce8(a0, a1, a2, a3, a4, a5, a6, a7));
    }
    for (; j < n; ++j) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(K + j * D + d), a);
      dots[j] = HorizontalSum(a);
    }
  }

  static void Norms(const float* K, int64_t n, int64_t D, float* kn) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const float* k = K + j * D;
      __m256 a[8];
      for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        for (int u = 0; u < 8; ++u) {
          const __m256 kv = _mm256_loadu_ps(k + u * D + d);
          a[u] = _mm256_fmadd_ps(kv, kv, a[u]);
        }
      }
      _mm256_storeu_ps(kn + j, _mm256_sqrt_ps(Reduce8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7])));
    }
    for (; j < n; ++j) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 kv = _mm256_loadu_ps(K + j * D + d);
        a = _mm256_fmadd_ps(kv, kv, a);
      }
      kn[j] = __builtin_sqrtf(HorizontalSum(a));
    }
  }

  static void Filter(const float* dots, int64_t n, float scale, const float* add, float theta, float cq,
                     const float* kn, float* s, uint64_t* keep, uint64_t* near) {
    const __m256 sv = _mm256_set1_ps(scale), tv = _mm256_set1_ps(theta), cqv = _mm256_set1_ps(cq);
    const __m256 absc = _mm256_set1_ps(kAbsCoef), sign = _mm256_set1_ps(-0.f);
    uint64_t kb = 0, nb = 0;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      __m256 v = _mm256_mul_ps(sv, _mm256_loadu_ps(dots + j));
      if (add) v = _mm256_add_ps(v, _mm256_loadu_ps(add + j));
      _mm256_storeu_ps(s + j, v);
      const __m256 diff = _mm256_andnot_ps(sign, _mm256_sub_ps(v, tv));
      const __m256 bound =
          _mm256_fmadd_ps(cqv, _mm256_loadu_ps(kn + j), _mm256_mul_ps(absc, _mm256_andnot_ps(sign, v)));
      kb |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, tv, _CMP_NLT_UQ))) << j;
      nb |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(diff, bound, _CMP_NGT_UQ))) << j;
    }
    for (; j < n; ++j) {
      float v = scale * dots[j];
      if (add) v += add[j];
      s[j] = v;
      const uint64_t bit = uint64_t{1} << j;
      if (!(v < theta)) kb |= bit;
      if (!(__builtin_fabsf(v - theta) > cq * kn[j] + kAbsCoef * __builtin_fabsf(v))) nb |= bit;
    }
    *keep = kb;
    *near = nb;
  }

  // Kept scores and their key offsets, packed; padded with -inf to a multiple of 8.
  static int64_t Compact(const float* s, uint64_t keep, float* cs, int32_t* cidx) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), nibble = _mm256_set1_epi32(7);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int64_t k = 0;
    for (int c = 0; c < 64 && (keep >> c); c += 8) {
      const uint32_t m8 = static_cast<uint32_t>(keep >> c) & 0xffu;
      if (!m8) continue;
      const __m256i perm =
          _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(kCompact.idx[m8])), shifts), nibble);
      _mm256_storeu_ps(cs + k, _mm256_permutevar8x32_ps(_mm256_loadu_ps(s + c), perm));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(cidx + k),
                          _mm256_permutevar8x32_epi32(_mm256_add_epi32(_mm256_set1_epi32(c), iota), perm));
      k += __builtin_popcount(m8);
    }
    for (int64_t t = k; t < ((k + 7) & ~int64_t{7}); ++t) cs[t] = -__builtin_inff();
    return k;
  }

  static float MaxKept(const float* cs, int64_t k) {
    __m256 m = _mm256_set1_ps(-__builtin_inff());
    for (int64_t t = 0; t < k; t += 8) m = _mm256_max_ps(_mm256_loadu_ps(cs + t), m);  // NaN score: keeps m
    return HorizontalMax(m);
  }

  static float ExpSub(const float* cs, int64_t k, float m, float* w) {
    if (m == -__builtin_inff()) m = 0.f;  // only -inf / NaN scores so far (see FinishRow)
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t t = 0; t < k; t += 8) {  // the -inf padding gives 0
      const __m256 e = Exp(_mm256_sub_ps(_mm256_loadu_ps(cs + t), mv));
      _mm256_storeu_ps(w + t, e);
      sum = _mm256_add_ps(sum, e);
    }
    return HorizontalSum(sum);
  }

  static void Accumulate(float* acc, const float* w, const int32_t* idx, int64_t k, const float* V, int64_t Dv) {
    for (int64_t c = 0; c < Dv; c += 64) {  // 8 registers of the row at a time
      switch ((Dv - c) >= 64 ? 8 : (Dv - c) / 8) {
        case 8: AccumulateChunk<8>(acc + c, w, idx, k, V + c, Dv); break;
        case 7: AccumulateChunk<7>(acc + c, w, idx, k, V + c, Dv); break;
        case 6: AccumulateChunk<6>(acc + c, w, idx, k, V + c, Dv); break;
        case 5: AccumulateChunk<5>(acc + c, w, idx, k, V + c, Dv); break;
        case 4: AccumulateChunk<4>(acc + c, w, idx, k, V + c, Dv); break;
        case 3: AccumulateChunk<3>(acc + c, w, idx, k, V + c, Dv); break;
        case 2: AccumulateChunk<2>(acc + c, w, idx, k, V + c, Dv); break;
        default: AccumulateChunk<1>(acc + c, w, idx, k, V + c, Dv); break;
      }
    }
  }

  static void ScaleRow(float* acc, float f, int64_t Dv) {
    const __m256 fv = _mm256_set1_ps(f);
    for (int64_t d = 0; d < Dv; d += 8) _mm256_storeu_ps(acc + d, _mm256_mul_ps(fv, _mm256_loadu_ps(acc + d)));
  }
};

}  // namespace

void RunTaskAvx2(const TaskPlan& plan, size_t task, unsigned char* scratch) { RunTask<Avx2Isa>(plan, task, scratch); }

}  // namespace cpu
}  // namespace toptheta

// The CPU kernel's task body, written once over an instruction-set policy `Isa` and compiled in each ISA unit
// (cpu_kernel.cc: portable; cpu_kernel_avx2.cc: AVX2 + FMA). Everything here has internal linkage and uses
// builtins rather than <cmath>/<algorithm>: see cpu_plan.h for why.
//
// Per task (batch b, kv head g, a block of query rows of every head of the group, one key split), key tiles of
// plan.tile_keys keys are visited once and shared by all rows of the task (GQA heads read the same K/V tile):
//   1. fp32 scores of the tile for one row (Isa::Dots), scaled and mask-added (Isa::Filter), which also tests
//      the threshold and flags scores within the fp32 rounding bound of theta;
//   2. those flagged scores only are recomputed in double and decided in double (decisions equal the float64
//      reference's: docs/op.md "Numerics");
//   3. kept scores are compacted, the running max / denominator / numerator updated (online softmax), and
//      only the kept V rows are read (Isa::Accumulate). A tile with nothing kept costs only its scores.
#pragma once

#include "cpu_plan.h"

namespace toptheta {
namespace cpu {
namespace {

constexpr int64_t kPad = 8;       // compacted arrays are padded to a multiple of 8
constexpr int64_t kRowChunk = 8;  // rows whose kept lists are built before their V rows are read

inline int64_t MinI(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t MaxI(int64_t a, int64_t b) { return a > b ? a : b; }
inline size_t Align64(size_t n) { return (n + 63) & ~size_t{63}; }

// Byte offsets of the task's scratch regions.
struct ScratchLayout {
  size_t qf, acc, cq, th, mrun, dk, nv, nk, dots, s, cs, w, add, kn, cidx, ckept, ktile, vtile, total;
  ScratchLayout(const AttnParams& p, int64_t rows) {
    size_t at = 0;
    auto take = [&at](size_t bytes) {
      const size_t here = at;
      at += Align64(bytes);
      return here;
    };
    const size_t f = sizeof(float), n = kTileKeys + kPad;
    qf = take(rows * p.D * f);
    acc = take(rows * p.Dv * f);
    cq = take(rows * f);
    th = take(rows * f);
    mrun = take(rows * f);
    dk = take(rows * f);
    nv = take(rows * sizeof(int64_t));
    nk = take(rows * sizeof(int64_t));
    dots = take(n * f);
    s = take(n * f);
    cs = take(kRowChunk * n * f);
    w = take(n * f);
    add = take(n * f);
    kn = take(n * f);
    cidx = take(kRowChunk * n * sizeof(int32_t));
    ckept = take(kRowChunk * sizeof(int64_t));
    ktile = take(p.dtype == DType::kF16 ? kTileKeys * p.D * f : 0);
    vtile = take(p.dtype == DType::kF16 ? kTileKeys * p.Dv * f : 0);
    total = at;
  }
};

// <q, k> in double: the exact-decision path (scores within the rounding bound of theta).
inline double DotDouble(const float* q, const float* k, int64_t n) {
  double acc[4] = {0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 4 <= n; d += 4) {
    for (int u = 0; u < 4; ++u) acc[u] += static_cast<double>(q[d + u]) * k[d + u];
  }
  double s = (acc[0] + acc[2]) + (acc[1] + acc[3]);
  for (; d < n; ++d) s += static_cast<double>(q[d]) * k[d];
  return s;
}

// Rounding bound of the fp32 score s = fl(fl(scale * fl(<q,k>)) + a):
//   |s - s_exact| <= |scale| |q| |k| gamma_{D+1} + u |s| / (1 - u),  u = 2^-24, gamma_n = n u / (1 - n u),
// (gamma_D for the dot product in any summation order, one more u for the scale product, u for the mask add).
// Both terms are taken twice: that covers the rounding of the fp32 norms and of the bound's own arithmetic.
// Filter flags a score when !(|s - theta| > row_coef * |k| + kAbsCoef * |s|).
constexpr float kAbsCoef = 2.0f * 5.9604645e-08f * 1.0001f;
// Softcapped scores s = c tanh(scale <q,k> / c) + a (Gemma 2). |d/dx c tanh(x / c)| <= 1, so the bound of the
// scaled dot product carries over; the division, tanh and the product by c add a few ulp of |s| + c.
constexpr float kSoftcapAbsCoef = 4.0f * kAbsCoef;
inline void SoftcapFilter(const float* dots, int64_t n, float scale, float cap, const float* add, float theta, float cq,
                          const float* kn, float* s, uint64_t* keep, uint64_t* near) {
  uint64_t kb = 0, nb = 0;
  for (int64_t j = 0; j < n; ++j) {
    float v = cap * __builtin_tanhf(scale * dots[j] / cap);
    if (add) v += add[j];
    s[j] = v;
    const uint64_t bit = uint64_t{1} << j;
    if (!(v < theta)) kb |= bit;
    if (!(__builtin_fabsf(v - theta) > cq * kn[j] + kSoftcapAbsCoef * (__builtin_fabsf(v) + cap))) nb |= bit;
  }
  *keep = kb;
  *near = nb;
}

inline float RowCoef(double scale, double qnorm, int64_t D) {
  const double u = 5.9604644775390625e-08, n = static_cast<double>(D + 1);
  const double gamma = n * u / (1.0 - n * u);
  return static_cast<float>(2.0 * (scale < 0 ? -scale : scale) * qnorm * gamma * 1.0001);
}

template <class Isa>
void RunTask(const TaskPlan& plan, size_t task, unsigned char* scratch) {
  const AttnParams& p = *plan.p;
  const int64_t N = plan.tile_keys, G = plan.group, D = p.D, Dv = p.Dv;
  int64_t t = static_cast<int64_t>(task);
  const int64_t split = t % plan.splits;
  t /= plan.splits;
  const int64_t block = t % plan.row_blocks;
  t /= plan.row_blocks;
  const int64_t g = t % p.Hkv, b = t / p.Hkv;
  const int64_t i0 = block * plan.rows_per_block, i1 = MinI(p.Sq, i0 + plan.rows_per_block);
  const int64_t rb = i1 - i0, rows = G * rb;  // row x = hl * rb + (i - i0), head h = g * G + hl
  const int64_t Kb = plan.key_len[b];         // keys of this batch row (rows of K/V: p.kv_capacity)
  const bool f16 = p.dtype == DType::kF16;
  const float softcap = plan.softcap;

  const ScratchLayout L(p, rows);
  float* qf = reinterpret_cast<float*>(scratch + L.qf);
  float* acc = reinterpret_cast<float*>(scratch + L.acc);
  float* cq = reinterpret_cast<float*>(scratch + L.cq);
  float* th = reinterpret_cast<float*>(scratch + L.th);
  float* mrun = reinterpret_cast<float*>(scratch + L.mrun);
  float* dk = reinterpret_cast<float*>(scratch + L.dk);
  int64_t* nv = reinterpret_cast<int64_t*>(scratch + L.nv);
  int64_t* nk = reinterpret_cast<int64_t*>(scratch + L.nk);
  float* dots = reinterpret_cast<float*>(scratch + L.dots);
  float* s = reinterpret_cast<float*>(scratch + L.s);
  float* chunk_s = reinterpret_cast<float*>(scratch + L.cs);
  float* w = reinterpret_cast<float*>(scratch + L.w);
  float* add = reinterpret_cast<float*>(scratch + L.add);
  float* kn = reinterpret_cast<float*>(scratch + L.kn);
  int32_t* chunk_idx = reinterpret_cast<int32_t*>(scratch + L.cidx);
  int64_t* chunk_kept = reinterpret_cast<int64_t*>(scratch + L.ckept);
  float* ktile = reinterpret_cast<float*>(scratch + L.ktile);
  float* vtile = reinterpret_cast<float*>(scratch + L.vtile);

  for (int64_t hl = 0; hl < G; ++hl) {
    const int64_t h = g * G + hl;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t x = hl * rb + (i - i0);
      float* q = qf + x * D;
      const int64_t off = QueryOffset(p, b, h, i);
      if (f16) {
        HalfRowToFloat(static_cast<const uint16_t*>(p.q) + off, q, D);
      } else {
        __builtin_memcpy(q, static_cast<const float*>(p.q) + off, D * sizeof(float));
      }
      double qq = 0;
      for (int64_t d = 0; d < D; ++d) qq += static_cast<double>(q[d]) * q[d];
      cq[x] = RowCoef(p.scale, __builtin_sqrt(qq), D);
      const int64_t r = Kb - p.Sq + i;
      const int64_t rr = MaxI(0, MinI(r, p.R - 1));
      th[x] = p.theta[h * p.R + rr];
      mrun[x] = th[x];  // kept scores are >= theta, so the final max is max(theta, max kept) (docs/op.md)
      dk[x] = 0.f;
      nv[x] = nk[x] = 0;
      for (int64_t d = 0; d < Dv; ++d) acc[x * Dv + d] = 0.f;
    }
  }

  // theta = -inf keeps every valid key whatever its rounding: no bound to test, no key norms to compute.
  bool any_finite_theta = false;
  for (int64_t x = 0; x < rows; ++x) any_finite_theta |= th[x] != -__builtin_inff();

  // Keys of this task: its split, and (causal) those the last row of the block can see.
  // A split may lie wholly past Kb (shared form): then it has no keys and leaves the empty state.
  int64_t k0 = split * plan.split_keys, k1 = plan.splits > 1 ? MinI(Kb, k0 + plan.split_keys) : Kb;
  if (p.causal) k1 = MinI(k1, Kb - p.Sq + i1);
  const size_t esz = f16 ? 2 : 4;
  const int64_t cap = p.kv_capacity;
  const unsigned char* Kbase = static_cast<const unsigned char*>(p.k) + (b * p.Hkv + g) * cap * D * esz;
  const unsigned char* Vbase = static_cast<const unsigned char*>(p.v) + (b * p.Hkv + g) * cap * Dv * esz;
  const bool has_mask = p.mask_kind != MaskKind::kNone;
  // Decode (one row per head): the kept V rows are scattered over the cache and come from memory.
  const bool prefetch_v = rb == 1;
  const int64_t v_row_bytes = Dv * static_cast<int64_t>(esz);

  for (int64_t j0 = k0; j0 < k1; j0 += N) {
    const int64_t n = MinI(N, k1 - j0);
    const float* K;
    if (f16) {
      for (int64_t j = 0; j < n; ++j) {
        HalfRowToFloat(reinterpret_cast<const uint16_t*>(Kbase) + (j0 + j) * D, ktile + j * D, D);
      }
      K = ktile;
    } else {
      K = reinterpret_cast<const float*>(Kbase) + j0 * D;
    }
    const float* V = f16 ? vtile : reinterpret_cast<const float*>(Vbase) + j0 * Dv;
    bool v_converted = false;
    if (any_finite_theta) Isa::Norms(K, n, D, kn);
    const void* mask_row_cached = nullptr;
    uint64_t mask_bits = ~uint64_t{0};
    bool has_add = false;

    // Rows in chunks of kRowChunk: first every row's scores and kept list (with the kept V rows prefetched in
    // decode, where they come from memory), then every row's softmax update and V accumulation.
    for (int64_t xa = 0; xa < rows; xa += kRowChunk) {
      const int64_t xb = MinI(rows, xa + kRowChunk);
      for (int64_t x = xa; x < xb; ++x) {
        int64_t& kept = chunk_kept[x - xa];
        kept = 0;
        const int64_t h = g * G + x / rb, i = i0 + x % rb;
        const int64_t r = Kb - p.Sq + i;
        const int64_t nvis = p.causal ? MinI(n, r + 1 - j0) : n;
        if (nvis <= 0) continue;
        uint64_t valid = nvis == 64 ? ~uint64_t{0} : (uint64_t{1} << nvis) - 1;
        if (has_mask) {
          const void* mrow = MaskRowAddress(p, b, h, i);
          if (mrow != mask_row_cached) {  // a [B, Ktot] mask is the same for every row: computed once per tile
            mask_bits = MaskTile(p, mrow, j0, n, add, &has_add);
            mask_row_cached = mrow;
          }
          valid &= mask_bits;
          if (!valid) continue;
        }
        nv[x] += __builtin_popcountll(valid);
        const float* q = qf + x * D;
        const float theta = th[x];
        Isa::Dots(q, K, nvis, D, dots);
        uint64_t keep = 0, near = 0;
        if (softcap != 0.f) {
          SoftcapFilter(dots, nvis, p.scale, softcap, has_add ? add : nullptr, theta, cq[x], kn, s, &keep, &near);
        } else {
          Isa::Filter(dots, nvis, p.scale, has_add ? add : nullptr, theta, cq[x], kn, s, &keep, &near);
        }
        near = theta == -__builtin_inff() ? 0 : near & valid;
        while (near) {  // rare: decide in double
          const int64_t j = __builtin_ctzll(near);
          near &= near - 1;
          double sd = static_cast<double>(p.scale) * DotDouble(q, K + j * D, D);
          if (softcap != 0.f) sd = softcap * __builtin_tanh(sd / softcap);
          sd += has_add ? add[j] : 0.f;
          s[j] = static_cast<float>(sd);
          const uint64_t bit = uint64_t{1} << j;
          keep = !(sd < static_cast<double>(theta)) ? (keep | bit) : (keep & ~bit);
        }
        keep &= valid;
        if (!keep) continue;  // the whole tile is pruned for this row: no V row read
        float* cs = chunk_s + (x - xa) * (kTileKeys + kPad);
        int32_t* cidx = chunk_idx + (x - xa) * (kTileKeys + kPad);
        kept = Isa::Compact(s, keep, cs, cidx);
        nk[x] += kept;
        if (prefetch_v) {
          for (int64_t t = 0; t < kept; ++t) {
            const unsigned char* row = Vbase + (j0 + cidx[t]) * v_row_bytes;
            for (int64_t o = 0; o < v_row_bytes; o += 64) __builtin_prefetch(row + o);
          }
        }
      }
      for (int64_t x = xa; x < xb; ++x) {
        const int64_t kept = chunk_kept[x - xa];
        if (!kept) continue;
        const float* cs = chunk_s + (x - xa) * (kTileKeys + kPad);
        const int32_t* cidx = chunk_idx + (x - xa) * (kTileKeys + kPad);
        const float tile_max = Isa::MaxKept(cs, kept);
        if (tile_max > mrun[x]) {
          const float f = __builtin_expf(mrun[x] - tile_max);
          dk[x] *= f;
          Isa::ScaleRow(acc + x * Dv, f, Dv);
          mrun[x] = tile_max;
        }
        dk[x] += Isa::ExpSub(cs, kept, mrun[x], w);
        if (f16 && !v_converted) {
          for (int64_t j = 0; j < n; ++j) {
            HalfRowToFloat(reinterpret_cast<const uint16_t*>(Vbase) + (j0 + j) * Dv, vtile + j * Dv, Dv);
          }
          v_converted = true;
        }
        Isa::Accumulate(acc + x * Dv, w, cidx, kept, V, Dv);
      }
    }
  }

  for (int64_t hl = 0; hl < G; ++hl) {
    const int64_t h = g * G + hl;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t x = hl * rb + (i - i0);
      if (plan.splits == 1) {
        FinishRow(p, b, h, i, RowState{mrun[x], dk[x], nv[x], nk[x], acc + x * Dv});
        continue;
      }
      float* out = plan.partial + (((b * p.Hq + h) * p.Sq + i) * plan.splits + split) * (kPartialHead + Dv);
      out[0] = mrun[x];
      out[1] = dk[x];
      out[2] = static_cast<float>(nv[x]);
      out[3] = static_cast<float>(nk[x]);
      __builtin_memcpy(out + kPartialHead, acc + x * Dv, Dv * sizeof(float));
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace toptheta

// CPU kernel of TopThetaAttention. One task = (batch, query head, block of query rows). Per row:
// score the valid keys, keep those with s >= theta, and read V rows of kept keys only (plus all
// valid V rows for the V-mean of comp_mode 2, when there is pruned mass to compensate).
#include "cpu_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "half.h"

namespace toptheta {
namespace {

constexpr int64_t kRowsPerTask = 16;

inline void Store(float* p, int64_t i, float v) { p[i] = v; }
inline void Store(uint16_t* p, int64_t i, float v) { p[i] = FloatToHalf(v); }

// A row of T as floats: float rows are used in place, float16 rows are converted into buf.
inline const float* AsFloat(const float* row, int64_t, float*) { return row; }
inline const float* AsFloat(const uint16_t* row, int64_t n, float* buf) {
  HalfToFloatRow(row, buf, n);
  return buf;
}

// <q, k>; 8 independent partial sums so the compiler can vectorize.
inline float Dot(const float* q, const float* k, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int u = 0; u < 8; ++u) acc[u] += q[d + u] * k[d + u];
  }
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; d < n; ++d) s += q[d] * k[d];
  return s;
}

// acc += w * v
inline void Axpy(float* acc, float w, const float* v, int64_t n) {
  for (int64_t d = 0; d < n; ++d) acc[d] += w * v[d];
}

// Additive-mask value of key j, or -inf when the mask excludes it; 0 without mask.
struct MaskRow {
  MaskKind kind = MaskKind::kNone;
  const void* row = nullptr;
  bool f16 = false;  // kAdditive with T = float16

  inline bool Excluded(int64_t j, float* add) const {
    switch (kind) {
      case MaskKind::kNone: *add = 0.f; return false;
      case MaskKind::kBool: *add = 0.f; return !static_cast<const bool*>(row)[j];
      case MaskKind::kAdditive:
        if (f16) {
          *add = HalfToFloat(static_cast<const uint16_t*>(row)[j]);
          return !(*add > kMaskedF16);
        }
        *add = static_cast<const float*>(row)[j];
        return !(*add > kMaskedF32);
      case MaskKind::kAdditiveF32: *add = static_cast<const float*>(row)[j]; return !(*add > kMaskedF32);
    }
    return false;
  }
};

struct Scratch {
  std::vector<float> q, acc, vbar, score, row;  // row: one K or V row converted to float
  std::vector<int32_t> idx;
  void Fit(const AttnParams& p) {
    if (static_cast<int64_t>(q.size()) < p.D) q.resize(p.D);
    if (static_cast<int64_t>(row.size()) < std::max(p.D, p.Dv)) row.resize(std::max(p.D, p.Dv));
    if (static_cast<int64_t>(acc.size()) < p.Dv) acc.resize(p.Dv), vbar.resize(p.Dv);
    if (static_cast<int64_t>(score.size()) < p.Ktot) score.resize(p.Ktot), idx.resize(p.Ktot);
  }
};

Scratch& ThreadScratch() {
  thread_local Scratch s;
  return s;
}

template <typename T>
void ComputeRow(const AttnParams& p, int64_t b, int64_t h, int64_t i, Scratch& s) {
  const int64_t g = h / (p.Hq / p.Hkv);
  const T* q = static_cast<const T*>(p.q) + ((b * p.Hq + h) * p.Sq + i) * p.D;
  const T* K = static_cast<const T*>(p.k) + (b * p.Hkv + g) * p.Ktot * p.D;
  const T* V = static_cast<const T*>(p.v) + (b * p.Hkv + g) * p.Ktot * p.Dv;
  T* out = static_cast<T*>(p.out) + ((b * p.Hq + h) * p.Sq + i) * p.Dv;

  const int64_t r = RowPosition(p, i);
  const int64_t rr = std::max<int64_t>(0, ThresholdRow(p, i));
  const float theta = p.theta[h * p.R + rr];
  const float rho = p.sdc ? p.sdc[h * p.R + rr] : 0.f;
  const int64_t jend = p.causal ? std::min(r + 1, p.Ktot) : p.Ktot;

  MaskRow mask;
  if (p.mask_kind != MaskKind::kNone) {
    const size_t esz = p.mask_kind == MaskKind::kBool ? 1 : (p.mask_kind == MaskKind::kAdditive && p.dtype != DType::kF32) ? 2 : 4;
    const int64_t off = b * p.mask_sb + h * p.mask_sh + i * p.mask_sq;
    mask.kind = p.mask_kind;
    mask.row = static_cast<const char*>(p.mask) + off * static_cast<int64_t>(esz);
    mask.f16 = p.mask_kind == MaskKind::kAdditive && p.dtype == DType::kF16;
  }

  const float* qf = AsFloat(q, p.D, s.q.data());
  float* row = s.row.data();

  // Pass 1: scores of valid keys; remember the kept ones.
  int64_t n_valid = 0, n_kept = 0;
  float smax = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < jend; ++j) {
    float add;
    if (mask.Excluded(j, &add)) continue;
    ++n_valid;
    const float sc = p.scale * Dot(qf, AsFloat(K + j * p.D, p.D, row), p.D) + add;
    if (sc >= theta) {
      s.idx[n_kept] = static_cast<int32_t>(j);
      s.score[n_kept] = sc;
      ++n_kept;
      smax = std::max(smax, sc);
    }
  }

  // Pass 2: softmax numerator / denominator over kept keys only (V rows of pruned keys are not read).
  const float m = n_kept > 0 ? std::max(theta, smax) : theta;
  float* acc = s.acc.data();
  std::fill(acc, acc + p.Dv, 0.f);
  float dk = 0.f;
  for (int64_t t = 0; t < n_kept; ++t) {
    const float w = std::exp(s.score[t] - m);
    dk += w;
    Axpy(acc, w, AsFloat(V + static_cast<int64_t>(s.idx[t]) * p.Dv, p.Dv, row), p.Dv);
  }

  // Compensation for the pruned mass.
  const int64_t n_pruned = n_valid - n_kept;
  float dp = 0.f;
  if (p.comp_mode >= 1 && p.sdc && n_pruned > 0) {
    dp = static_cast<float>(n_pruned) * rho * (n_kept > 0 ? std::exp(theta - m) : 1.f);
  }
  if (p.comp_mode == 2 && dp > 0.f) {
    float* vbar = s.vbar.data();
    std::fill(vbar, vbar + p.Dv, 0.f);
    for (int64_t j = 0; j < jend; ++j) {
      float add;
      if (!mask.Excluded(j, &add)) Axpy(vbar, 1.f, AsFloat(V + j * p.Dv, p.Dv, row), p.Dv);
    }
    const float w = dp / static_cast<float>(n_valid);
    for (int64_t d = 0; d < p.Dv; ++d) acc[d] += w * vbar[d];
  }

  const float denom = dk + dp;
  const float inv = denom > 0.f ? 1.f / denom : 0.f;
  for (int64_t d = 0; d < p.Dv; ++d) Store(out, d, denom > 0.f ? acc[d] * inv : 0.f);
  if (p.kept) p.kept[(b * p.Hq + h) * p.Sq + i] = static_cast<int32_t>(n_kept);
}

template <typename T>
void RunTask(void* data, size_t task) {
  const AttnParams& p = *static_cast<const AttnParams*>(data);
  const int64_t blocks = (p.Sq + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t bh = static_cast<int64_t>(task) / blocks;
  const int64_t i0 = (static_cast<int64_t>(task) % blocks) * kRowsPerTask;
  const int64_t b = bh / p.Hq, h = bh % p.Hq;
  Scratch& s = ThreadScratch();
  s.Fit(p);
  const int64_t i1 = std::min(p.Sq, i0 + kRowsPerTask);
  for (int64_t i = i0; i < i1; ++i) ComputeRow<T>(p, b, h, i, s);
}

}  // namespace

void TopThetaCpu(const AttnParams& p, ParallelForFn parallel_for, void* runner) {
  if (p.B == 0 || p.Hq == 0 || p.Sq == 0) return;
  const int64_t blocks = (p.Sq + kRowsPerTask - 1) / kRowsPerTask;
  const size_t total = static_cast<size_t>(p.B * p.Hq * blocks);
  void (*fn)(void*, size_t) = p.dtype == DType::kF16 ? &RunTask<uint16_t> : &RunTask<float>;
  void* data = const_cast<AttnParams*>(&p);
  if (parallel_for && total > 1) {
    parallel_for(runner, fn, total, data);
  } else {
    for (size_t t = 0; t < total; ++t) fn(data, t);
  }
}

}  // namespace toptheta

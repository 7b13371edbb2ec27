// CPU kernel of TopThetaAttention. One task = (batch, query head, block of query rows). Per row:
// score the valid keys, keep those with s >= theta (and NaN scores), and read V rows of kept keys only
// (plus all valid V rows for the V-mean of comp_mode 2, when there is pruned mass to compensate).
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

// <q, k> accumulated in double; 8 independent partial sums so the compiler can vectorize.
// Scores are compared with θ in double so that the keep decision equals the float64 reference's
// (topthetaexport.reference) except for exact ties: see docs/op.md, "Numerics".
inline double Dot(const float* q, const float* k, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int u = 0; u < 8; ++u) acc[u] += static_cast<double>(q[d + u]) * k[d + u];
  }
  double s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; d < n; ++d) s += static_cast<double>(q[d]) * k[d];
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

// 4 query rows (contiguous, stride d) against one key row: out[r] = <q_r, k>.
inline void Dot4(const float* q, const float* k, int64_t n, double* out) {
  double acc[4][8] = {};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    for (int r = 0; r < 4; ++r) {
      for (int u = 0; u < 8; ++u) acc[r][u] += static_cast<double>(q[r * n + d + u]) * k[d + u];
    }
  }
  for (int r = 0; r < 4; ++r) {
    const double* a = acc[r];
    double s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    for (int64_t e = d; e < n; ++e) s += static_cast<double>(q[r * n + e]) * k[e];
    out[r] = s;
  }
}

struct Scratch {
  std::vector<float> q;                      // [kRowsPerTask, D] query rows as float
  std::vector<double> dots;                  // [kRowsPerTask, Ktot] <q_i, k_j>
  std::vector<float> acc, vbar, score, row;  // row: one K or V row converted to float
  std::vector<int32_t> idx;
  void Fit(const AttnParams& p) {
    auto fit = [](auto& v, int64_t n) {
      if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    };
    fit(q, kRowsPerTask * p.D);
    fit(dots, kRowsPerTask * p.Ktot);
    fit(row, std::max(p.D, p.Dv));
    fit(acc, p.Dv);
    fit(vbar, p.Dv);
    fit(score, p.Ktot);
    fit(idx, p.Ktot);
  }
};

Scratch& ThreadScratch() {
  thread_local Scratch s;
  return s;
}

// s.dots[r * Ktot + j] = <q_{i0+r}, k_j> for r < nrows, j < jmax: each K row is read (and converted)
// once for the whole block of query rows.
template <typename T>
void BlockDots(const AttnParams& p, const T* Q, const T* K, int64_t nrows, int64_t jmax, Scratch& s) {
  for (int64_t r = 0; r < nrows; ++r) {
    const float* qf = AsFloat(Q + r * p.D, p.D, s.q.data() + r * p.D);
    if (qf != s.q.data() + r * p.D) std::memcpy(s.q.data() + r * p.D, qf, sizeof(float) * p.D);
  }
  const float* qf = s.q.data();
  double four[4];
  for (int64_t j = 0; j < jmax; ++j) {
    const float* k = AsFloat(K + j * p.D, p.D, s.row.data());
    int64_t r = 0;
    for (; r + 4 <= nrows; r += 4) {
      Dot4(qf + r * p.D, k, p.D, four);
      for (int u = 0; u < 4; ++u) s.dots[(r + u) * p.Ktot + j] = four[u];
    }
    for (; r < nrows; ++r) s.dots[r * p.Ktot + j] = Dot(qf + r * p.D, k, p.D);
  }
}

// One query row i of (b, h); dots = <q_i, k_j> for the row's keys.
template <typename T>
void ComputeRow(const AttnParams& p, int64_t b, int64_t h, int64_t i, const double* dots, Scratch& s) {
  const int64_t g = h / (p.Hq / p.Hkv);
  const T* V = static_cast<const T*>(p.v) + (b * p.Hkv + g) * p.Ktot * p.Dv;
  T* out = static_cast<T*>(p.out) + ((b * p.Hq + h) * p.Sq + i) * p.Dv;

  const int64_t r = RowPosition(p, i);
  const int64_t rr = std::max<int64_t>(0, ThresholdRow(p, i));
  const float theta = p.theta[h * p.R + rr];
  const float rho = p.sdc ? p.sdc[h * p.R + rr] : 0.f;
  const int64_t jend = p.causal ? std::min(r + 1, p.Ktot) : p.Ktot;

  MaskRow mask;
  if (p.mask_kind != MaskKind::kNone) {
    const bool half_mask = p.mask_kind == MaskKind::kAdditive && p.dtype != DType::kF32;
    const int64_t esz = p.mask_kind == MaskKind::kBool ? 1 : half_mask ? 2 : 4;
    const int64_t off = b * p.mask_sb + h * p.mask_sh + i * p.mask_sq;
    mask.kind = p.mask_kind;
    mask.row = static_cast<const char*>(p.mask) + off * esz;
    mask.f16 = half_mask;
  }
  float* row = s.row.data();

  // Pass 1: scores of valid keys; remember the kept ones.
  int64_t n_valid = 0, n_kept = 0;
  float smax = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < jend; ++j) {
    float add;
    if (mask.Excluded(j, &add)) continue;
    ++n_valid;
    const double sc = static_cast<double>(p.scale) * dots[j] + add;
    // `!(s < θ)`: a NaN score counts as kept and makes the row NaN below, as in dense attention.
    if (!(sc < static_cast<double>(theta))) {
      s.idx[n_kept] = static_cast<int32_t>(j);
      s.score[n_kept] = static_cast<float>(sc);
      ++n_kept;
      if (!std::isnan(sc)) smax = std::max(smax, static_cast<float>(sc));
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
  if (p.comp_mode == 2 && dp > 0.f) {  // VMC: mean of the row's valid V rows
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
  const float inv = !(denom <= 0.f) ? 1.f / denom : 0.f;  // 0 -> zeros; NaN stays NaN
  for (int64_t d = 0; d < p.Dv; ++d) Store(out, d, acc[d] * inv);
  if (p.kept) p.kept[(b * p.Hq + h) * p.Sq + i] = static_cast<int32_t>(n_kept);
}

template <typename T>
void RunTask(void* data, size_t task) {
  const AttnParams& p = *static_cast<const AttnParams*>(data);
  const int64_t blocks = (p.Sq + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t bh = static_cast<int64_t>(task) / blocks;
  const int64_t i0 = (static_cast<int64_t>(task) % blocks) * kRowsPerTask;
  const int64_t i1 = std::min(p.Sq, i0 + kRowsPerTask);
  const int64_t b = bh / p.Hq, h = bh % p.Hq, g = h / (p.Hq / p.Hkv);
  Scratch& s = ThreadScratch();
  s.Fit(p);
  const T* Q = static_cast<const T*>(p.q) + ((b * p.Hq + h) * p.Sq + i0) * p.D;
  const T* K = static_cast<const T*>(p.k) + (b * p.Hkv + g) * p.Ktot * p.D;
  // Keys any row of the block can see (causal: up to the last row's position).
  const int64_t jmax = p.causal ? std::min(p.Ktot, RowPosition(p, i1 - 1) + 1) : p.Ktot;
  BlockDots(p, Q, K, i1 - i0, jmax, s);
  for (int64_t i = i0; i < i1; ++i) ComputeRow<T>(p, b, h, i, s.dots.data() + (i - i0) * p.Ktot, s);
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

// CPU kernel of TopThetaAttention: the plan (tasks over batch x kv head x row block [x key split]), ISA
// dispatch, the portable body, the split merge and the per-row finish (compensation, normalization, store).
// The task body itself is cpu_kernel_body.h (design notes there).
#include "cpu_kernel.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "cpu_kernel_body.h"
#include "cpu_plan.h"
#include "half.h"

namespace toptheta {
namespace cpu {
namespace {

inline void Store(float* p, int64_t i, float v) { p[i] = v; }
inline void Store(uint16_t* p, int64_t i, float v) { p[i] = FloatToHalf(v); }

// Additive-mask value of key j, or "excluded"; 0 without mask.
struct MaskRow {
  MaskKind kind = MaskKind::kNone;
  const void* row = nullptr;
  bool f16 = false;  // kAdditive with T = float16

  bool Excluded(int64_t j, float* add) const {
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

bool HalfMask(const AttnParams& p) { return p.mask_kind == MaskKind::kAdditive && p.dtype != DType::kF32; }

MaskRow MaskOf(const AttnParams& p, const void* row) {
  MaskRow m;
  m.kind = p.mask_kind;
  m.row = row;
  m.f16 = HalfMask(p);
  return m;
}

// The portable instruction-set policy of cpu_kernel_body.h (any D, Dv).
struct ScalarIsa {
  static void Dots(const float* q, const float* K, int64_t n, int64_t D, float* dots) {
    for (int64_t j = 0; j < n; ++j) {
      const float* k = K + j * D;
      float a[4] = {0, 0, 0, 0};
      int64_t d = 0;
      for (; d + 4 <= D; d += 4) {
        for (int u = 0; u < 4; ++u) a[u] += q[d + u] * k[d + u];
      }
      for (; d < D; ++d) a[0] += q[d] * k[d];
      dots[j] = (a[0] + a[2]) + (a[1] + a[3]);
    }
  }
  static void Norms(const float* K, int64_t n, int64_t D, float* kn) {
    for (int64_t j = 0; j < n; ++j) {
      float a = 0;
      for (int64_t d = 0; d < D; ++d) a += K[j * D + d] * K[j * D + d];
      kn[j] = std::sqrt(a);
    }
  }
  static void Filter(const float* dots, int64_t n, float scale, const float* add, float theta, float cq,
                     const float* kn, float* s, uint64_t* keep, uint64_t* near) {
    uint64_t kb = 0, nb = 0;
    for (int64_t j = 0; j < n; ++j) {
      float v = scale * dots[j];
      if (add) v += add[j];
      s[j] = v;
      const uint64_t bit = uint64_t{1} << j;
      if (!(v < theta)) kb |= bit;
      if (!(std::fabs(v - theta) > cq * kn[j] + kAbsCoef * std::fabs(v))) nb |= bit;
    }
    *keep = kb;
    *near = nb;
  }
  static int64_t Compact(const float* s, uint64_t keep, float* cs, int32_t* cidx) {
    int64_t k = 0;
    for (; keep; keep &= keep - 1, ++k) {
      const int j = __builtin_ctzll(keep);
      cs[k] = s[j];
      cidx[k] = j;
    }
    return k;
  }
  static float MaxKept(const float* cs, int64_t k) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < k; ++t) {
      if (cs[t] > m) m = cs[t];  // NaN is not > m: NaN scores do not set the max (docs/op.md)
    }
    return m;
  }
  static float ExpSub(const float* cs, int64_t k, float m, float* w) {
    if (m == -std::numeric_limits<float>::infinity()) m = 0.f;  // only -inf / NaN scores so far (see FinishRow)
    float sum = 0;
    for (int64_t t = 0; t < k; ++t) sum += (w[t] = std::exp(cs[t] - m));
    return sum;
  }
  static void Accumulate(float* acc, const float* w, const int32_t* idx, int64_t k, const float* V, int64_t Dv) {
    for (int64_t t = 0; t < k; ++t) {
      const float* v = V + static_cast<int64_t>(idx[t]) * Dv;
      for (int64_t d = 0; d < Dv; ++d) acc[d] += w[t] * v[d];
    }
  }
  static void ScaleRow(float* acc, float f, int64_t Dv) {
    for (int64_t d = 0; d < Dv; ++d) acc[d] *= f;
  }
};

template <typename T>
void FinishRowT(const AttnParams& p, int64_t b, int64_t h, int64_t i, const RowState& st) {
  const int64_t g = h / (p.Hq / p.Hkv);
  const T* V = static_cast<const T*>(p.v) + (b * p.Hkv + g) * p.kv_capacity * p.Dv;
  T* out = static_cast<T*>(p.out) + OutputOffset(p, b, h, i);
  const int64_t klen = KeyLen(p, b);
  const int64_t r = RowPosition(p, klen, i);
  const int64_t rr = std::max<int64_t>(0, ThresholdRow(p, klen, i));
  const float theta = p.theta[h * p.R + rr];
  const float rho = p.sdc ? p.sdc[h * p.R + rr] : 0.f;
  const float m = st.m;
  const int64_t n_pruned = st.n_valid - st.n_kept;

  float dp = 0.f;
  if (p.comp_mode >= 1 && p.sdc && n_pruned > 0) {
    dp = static_cast<float>(n_pruned) * rho * (st.n_kept > 0 ? std::exp(theta - m) : 1.f);
  }
  std::vector<float> vbar;
  if (p.comp_mode == 2 && dp > 0.f) {  // VMC: mean of the row's valid V rows
    vbar.assign(p.Dv, 0.f);
    std::vector<float> row(p.Dv);
    const MaskRow mask = MaskOf(p, MaskRowAddress(p, b, h, i));
    const int64_t jend = p.causal ? std::min(r + 1, klen) : klen;
    for (int64_t j = 0; j < jend; ++j) {
      float add;
      if (mask.Excluded(j, &add)) continue;
      const float* v;
      if constexpr (sizeof(T) == 2) {
        HalfToFloatRow(reinterpret_cast<const uint16_t*>(V) + j * p.Dv, row.data(), p.Dv);
        v = row.data();
      } else {
        v = reinterpret_cast<const float*>(V) + j * p.Dv;
      }
      for (int64_t d = 0; d < p.Dv; ++d) vbar[d] += v[d];
    }
  }
  const float denom = st.dk + dp;
  // 0 -> zeros; NaN stays NaN. Clamped to FLT_MIN: 1 / denom overflows for a row that keeps nothing (Dk = 0, so N = 0)
  // whose Dp is denormal (a tiny calibrated ρ), and 0 * inf would make the row NaN.
  const float inv = !(denom <= 0.f) ? 1.f / (denom < FLT_MIN ? FLT_MIN : denom) : 0.f;
  const float w = vbar.empty() ? 0.f : (dp / denom) / static_cast<float>(st.n_valid);  // VMC: Dp / (Dk + Dp) / n
  for (int64_t d = 0; d < p.Dv; ++d) {
    Store(out, d, st.acc[d] * inv + (vbar.empty() ? 0.f : w * vbar[d]));
  }
  if (p.kept) p.kept[(b * p.Hq + h) * p.Sq + i] = static_cast<int32_t>(st.n_kept);
}

// Merges the key splits of every row (online-softmax states with their own maxima) and finishes the rows.
void MergeSplits(const TaskPlan& plan) {
  const AttnParams& p = *plan.p;
  const int64_t stride = kPartialHead + p.Dv;
  std::vector<float> acc(p.Dv);
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t h = 0; h < p.Hq; ++h) {
      for (int64_t i = 0; i < p.Sq; ++i) {
        const float* part = plan.partial + ((b * p.Hq + h) * p.Sq + i) * plan.splits * stride;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < plan.splits; ++s) m = std::max(m, part[s * stride]);  // each >= theta
        RowState st{m, 0.f, 0, 0, acc.data()};
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t s = 0; s < plan.splits; ++s) {
          const float* ps = part + s * stride;
          st.n_valid += static_cast<int64_t>(ps[2]);
          const int64_t kept = static_cast<int64_t>(ps[3]);
          if (kept == 0) continue;
          st.n_kept += kept;
          const float f = ps[0] == m ? 1.f : std::exp(ps[0] - m);
          st.dk += f * ps[1];
          for (int64_t d = 0; d < p.Dv; ++d) acc[d] += f * ps[kPartialHead + d];
        }
        FinishRow(p, b, h, i, st);
      }
    }
  }
}

#ifdef TOPTHETA_CPU_AVX2
bool UseAvx2(const AttnParams& p) {
  static const bool cpu_has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* force = std::getenv("TOPTHETA_CPU_ISA");  // "scalar": the portable body (tests run both)
  if (force && std::strcmp(force, "scalar") == 0) return false;
  return cpu_has && p.D % 8 == 0 && p.Dv % 8 == 0;
}
#endif

struct Job {
  TaskPlan plan;
  void (*run)(const TaskPlan&, size_t, unsigned char*);
};

unsigned char* ThreadScratch(size_t bytes) {
  thread_local std::vector<unsigned char> buf;
  if (buf.size() < bytes + 64) buf.resize(bytes + 64);
  const uintptr_t at = reinterpret_cast<uintptr_t>(buf.data());
  return buf.data() + ((64 - at % 64) % 64);
}

void RunJobTask(void* data, size_t task) {
  const Job& job = *static_cast<const Job*>(data);
  job.run(job.plan, task, ThreadScratch(job.plan.scratch_bytes));
}

}  // namespace

void FinishRow(const AttnParams& p, int64_t b, int64_t h, int64_t i, const RowState& st) {
  if (p.dtype == DType::kF16) {
    FinishRowT<uint16_t>(p, b, h, i, st);
  } else {
    FinishRowT<float>(p, b, h, i, st);
  }
}

const void* MaskRowAddress(const AttnParams& p, int64_t b, int64_t h, int64_t i) {
  if (p.mask_kind == MaskKind::kNone) return nullptr;
  const int64_t esz = p.mask_kind == MaskKind::kBool ? 1 : HalfMask(p) ? 2 : 4;
  const int64_t off = b * p.mask_sb + h * p.mask_sh + i * p.mask_sq;
  return static_cast<const char*>(p.mask) + off * esz;
}

uint64_t MaskTile(const AttnParams& p, const void* mask_row, int64_t j0, int64_t n, float* add, bool* has_add) {
  const MaskRow mask = MaskOf(p, mask_row);
  uint64_t bits = 0;
  bool any = false;
  for (int64_t j = 0; j < n; ++j) {
    float a;
    if (mask.Excluded(j0 + j, &a)) {
      add[j] = 0.f;
    } else {
      add[j] = a;
      any |= a != 0.f;
      bits |= uint64_t{1} << j;
    }
  }
  *has_add = any;
  return bits;
}

void HalfRowToFloat(const uint16_t* src, float* dst, int64_t n) { HalfToFloatRow(src, dst, n); }

void RunTaskScalar(const TaskPlan& plan, size_t task, unsigned char* scratch) {
  RunTask<ScalarIsa>(plan, task, scratch);
}

size_t ScratchBytes(const AttnParams& p, int64_t rows) { return ScratchLayout(p, rows).total; }

}  // namespace cpu

void TopThetaCpu(const AttnParams& p, ParallelForFn parallel_for, void* runner) {
  using namespace cpu;
  if (p.B == 0 || p.Hq == 0 || p.Sq == 0) return;
  TaskPlan plan;
  plan.p = &p;
  plan.softcap = p.softcap;
  plan.group = p.Hq / p.Hkv;
  // 32 rows per head and block: enough rows to reuse each K/V tile from L1, enough blocks to balance causal work.
  plan.rows_per_block = std::min<int64_t>(p.Sq, 32);
  // The K and V tiles stay in L1 (<= 16 KB together) while every row of the task reads them.
  plan.tile_keys = std::clamp<int64_t>(4096 / (p.D + p.Dv) / 8 * 8, 8, kTileKeys);
  plan.row_blocks = (p.Sq + plan.rows_per_block - 1) / plan.rows_per_block;
  // Too few tasks for the threads (decode: B * Hkv of them): split the keys too, >= 512 keys a split.
  static const int64_t threads = std::max(1u, std::thread::hardware_concurrency());  // reads /sys: once
  // Keys per batch row (all Ktot in the concat form); the splits are cut over the longest row.
  std::vector<int64_t> key_len(static_cast<size_t>(p.B));
  int64_t kmax = 0;
  for (int64_t b = 0; b < p.B; ++b) kmax = std::max(kmax, key_len[b] = KeyLen(p, b));
  plan.key_len = key_len.data();
  const int64_t base = p.B * p.Hkv * plan.row_blocks;
  plan.split_keys = kmax;
  if (base < 4 * threads && kmax >= 1024) {
    const int64_t want = std::min((8 * threads + base - 1) / base, kmax / 512);
    plan.split_keys = (kmax + want - 1) / want;
    plan.split_keys = (plan.split_keys + plan.tile_keys - 1) / plan.tile_keys * plan.tile_keys;
    plan.splits = (kmax + plan.split_keys - 1) / plan.split_keys;
  }
  plan.scratch_bytes = ScratchBytes(p, plan.group * plan.rows_per_block);
  std::vector<float> partial;
  if (plan.splits > 1) {
    partial.resize(static_cast<size_t>(p.B * p.Hq * p.Sq * plan.splits * (kPartialHead + p.Dv)));
    plan.partial = partial.data();
  }
  Job job{plan, &RunTaskScalar};
#ifdef TOPTHETA_CPU_AVX2
  if (UseAvx2(p)) job.run = &RunTaskAvx2;
#endif
  const size_t total = static_cast<size_t>(base * plan.splits);
  if (parallel_for && total > 1) {
    parallel_for(runner, &RunJobTask, total, &job);
  } else {
    for (size_t t = 0; t < total; ++t) RunJobTask(&job, t);
  }
  if (plan.splits > 1) MergeSplits(plan);
}

}  // namespace toptheta

// Decode kernels of TopThetaAttention: few query rows (the Hq/Hkv heads of one kv head times Sq <= 16
// rows in all) against a long K/V cache. Split-K: a block owns one (batch, kv head, key range) and its
// 4 warps take 16-key steps of that range in turn, each warp on its own (no block barriers):
//   K step t (cp.async, 3 or 4 stages) -> S = Q K^T on tensor cores -> threshold, online softmax ->
//   gather the V rows of step t that some row kept (cp.async; pruned rows are never read, their
//   shared-memory rows are zero-filled) -> P·V of step t-2 (two steps behind, to hide the gather).
// The block merges its warps' (m, l, n_kept, n_valid, O) in shared memory and writes one partial per
// row; CombineKernel merges the partials of a row into the output (and the V mean of comp_mode 2,
// mean_pass = 1: all valid V rows, P = 1).
// With a shadow K (plan.shadow; docs/cuda-notes.md, "Shadow K"), ShadowScanKernel first streams the 4-bit codes and
// lists the keys whose score bound reaches θ; DecodeKernel<LIST> then takes its 16-key steps from those lists, so
// it reads the K rows of candidates only. Scores, and so the kept keys, are those of the plain kernel.
#include <algorithm>

#include "common.cuh"

namespace toptheta {
namespace cuda {
namespace {

constexpr int kWarps = kDecodeWarps;
constexpr int kThreads = kWarps * 32;
constexpr int kSub = kDecodeSubKeys;
constexpr int kVStages = 3;  // V of step t is gathered in step t and multiplied in step t + 2

__device__ __forceinline__ float Rescale(float from, float to) {
  return isfinite(to) ? Exp2((from - to) * kLog2e) : 1.f;
}

// A value the compiler must keep in a register: it cannot recompute it from the thread index in the loop (which
// it otherwise does, at several instructions per use, to save registers the kernel has to spare).
__device__ __forceinline__ uint32_t Pinned(uint32_t x) {
  uint32_t y;
  asm volatile("mov.b32 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// Per-lane shared-memory offsets of a warp's 16-row tile, computed once per kernel: the swizzle of the rows a
// lane copies and of the ldmatrix reads of Q·Kᵀ (K rows) and P·V (V rows, transposed). Keeping them in registers
// takes the index arithmetic out of the key loop, which otherwise re-derives them every step. Head dim 256 keeps
// one base offset of each kind and derives the others with one XOR: its full tables would take 48 registers,
// which its accumulators need (a row is 512 bytes, so offset(row, chunk 2 s + x) = offset(row, x) ^ (s << 5)).
template <int D>
struct TileOffsets {
  static constexpr int CH = D / 8;             // 16-byte chunks per row
  static constexpr int RSTEP = 32 / CH;        // rows one warp-wide copy pass covers
  static constexpr int PASSES = kSub / RSTEP;  // copy passes per 16-row tile
  static constexpr bool kTables = D <= 128;
  uint32_t copy_[kTables ? PASSES : 1];  // chunk (lane % CH) of row lane / CH + i * RSTEP
  uint32_t k_ld_[kTables ? D / 16 : 1];  // Q·Kᵀ B fragments, per 16 of D
  uint32_t v_ld_[kTables ? D / 16 : 1];  // P·V B fragments (transposed), per 16 of Dv
  __device__ __forceinline__ explicit TileOffsets(int lane) {
#pragma unroll
    for (int i = 0; i < (kTables ? PASSES : 1); ++i) copy_[i] = Pinned(Swz<CH>(lane / CH + i * RSTEP, lane % CH));
#pragma unroll
    for (int ks = 0; ks < (kTables ? D / 16 : 1); ++ks) {
      k_ld_[ks] = Pinned(Swz<CH>((lane >> 4) * 8 + (lane & 7), ks * 2 + ((lane >> 3) & 1)));
      v_ld_[ks] = Pinned(Swz<CH>(((lane >> 3) & 1) * 8 + (lane & 7), ks * 2 + (lane >> 4)));
    }
  }
  // D = 256: one row per pass (row i, chunk lane), swizzled by i & 7.
  __device__ __forceinline__ uint32_t copy(int i) const {
    if constexpr (kTables) return copy_[i];
    return (copy_[0] ^ static_cast<uint32_t>((i & 7) << 4)) + static_cast<uint32_t>(i * RSTEP * CH * 16);
  }
  __device__ __forceinline__ uint32_t k_ld(int ks) const {
    if constexpr (kTables) return k_ld_[ks];
    return k_ld_[0] ^ static_cast<uint32_t>(ks << 5);
  }
  __device__ __forceinline__ uint32_t v_ld(int ks) const {
    if constexpr (kTables) return v_ld_[ks];
    return v_ld_[0] ^ static_cast<uint32_t>(ks << 5);
  }
};

// Warp-level copy of 16 K or V rows (keys k0..k0+15) into a swizzled tile; rows whose bit in `rows`
// is clear (or past the batch row's klen keys) are zero-filled without reading memory. `dm`: the rows' head dim in
// memory, D but for the padded head dims (TileHeadDim), whose chunks past dm / 8 are zero-filled the same way.
template <typename T, int D>
__device__ __forceinline__ void LoadRows(const T* base, int k0, int klen, uint32_t dst, uint32_t rows,
                                         const TileOffsets<D>& off, int lane, int dm = D) {
  using O = TileOffsets<D>;
  const int r0 = lane / O::CH, ch = lane % O::CH;
  const bool chunk_ok = dm == D || ch * 8 < dm;
  const T* src = base + static_cast<int64_t>(k0 + r0) * dm + (chunk_ok ? ch * 8 : 0);
  if (k0 + kSub <= klen) {  // every row exists: no bounds test, no pointer select
#pragma unroll
    for (int i = 0; i < O::PASSES; ++i) {
      CpAsync16(dst + off.copy(i), src + i * O::RSTEP * dm, chunk_ok && ((rows >> (r0 + i * O::RSTEP)) & 1u));
    }
  } else {
#pragma unroll
    for (int i = 0; i < O::PASSES; ++i) {
      const int r = r0 + i * O::RSTEP;
      const bool ok = chunk_ok && ((rows >> r) & 1u) && k0 + r < klen;
      CpAsync16(dst + off.copy(i), ok ? src + i * O::RSTEP * dm : base, ok);
    }
  }
}

// LIST: the warp-level copy of 16 rows whose keys come from a candidate list: lane c (mod 16) holds the key of row c
// in `jlane` (-1: no row; zero-filled like a row whose bit in `rows` is clear). Never with padded head dims.
template <typename T, int D>
__device__ __forceinline__ void LoadListedRows(const T* base, int jlane, uint32_t dst, uint32_t rows,
                                               const TileOffsets<D>& off, int lane) {
  using O = TileOffsets<D>;
  const int r0 = lane / O::CH;
#pragma unroll
  for (int i = 0; i < O::PASSES; ++i) {
    const int r = r0 + i * O::RSTEP;
    const int j = __shfl_sync(kFull, jlane, r);
    const bool ok = ((rows >> r) & 1u) && j >= 0;
    CpAsync16(dst + off.copy(i), ok ? base + static_cast<int64_t>(j) * D + (lane % O::CH) * 8 : base, ok);
  }
}

// KST K stages: K of step t + KST - 1 is issued in step t. Its cp.async group follows V(t - 2)'s, so waiting for
// V(t - 2) waits for K up to t + 1 at most: more than 3 steps ahead (KST > 4) would not be in flight longer.
// COUNT: keep the kept / valid counts (the `kept` output or the compensation needs them).
// Key indices are 32-bit (the op checks M < 2^31); pointers are 64-bit.
// LIST: keys from the shadow scan's candidate lists (plan.shadow; never with the mean pass or the valid counts of
// the compensation, see ShadowCovers).
// CAP: softcap > 0 (Gemma 2), scores capped right after Q·Kᵀ (its own instantiations: 3 K stages, counts, no list).
// PAD: the rows in memory have a.p.D < D channels (80 or 96 in tiles of 128, TileHeadDim): Q, K and V are
// zero-padded to D in registers and shared memory, and only a.p.D channels are written.
template <typename T, int D, bool MASK, bool COUNT, int KST, bool LIST, bool CAP = false, bool PAD = false>
__global__ void __launch_bounds__(kThreads, D == 64 ? 4 : (D == 128 ? 2 : 1)) DecodeKernel(const KernelArgs a) {
  static_assert(KST == 3 || KST == 4, "K stages");
  static_assert(!PAD || (D == 128 && !LIST), "padded head dims: tiles of 128, no candidate lists");
  constexpr int kKStages = KST, kAhead = KST - 1;
  constexpr int KS = D / 16, NO = D / 8;
  constexpr uint32_t kTileBytes = kSub * D * 2;
  // Head dim 256: the 16 Q rows sit in shared memory (read with ldmatrix at each step, the warps share them), so
  // that the O accumulators (128 registers) fit beside the rest.
  constexpr bool kQShared = D > 128;
  extern __shared__ __align__(128) unsigned char smem[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const bool mean = a.mean_pass != 0;
  const int nrows = static_cast<int>(a.G * a.p.Sq);
  const int klen = static_cast<int>(KeyLen(a.p, b));  // keys of this batch row; the buffer has kv_capacity rows
  const int64_t head = static_cast<int64_t>(b) * a.p.Hkv + kvh;
  const int dm = PAD ? static_cast<int>(a.p.D) : D;  // channels of a row in memory
  const T* Kg = static_cast<const T*>(a.p.k) + head * a.p.kv_capacity * dm;
  const T* Vg = static_cast<const T*>(a.p.v) + head * a.p.kv_capacity * dm;
  const uint32_t wbase = SmemAddr(smem) + warp * (kKStages + kVStages) * kTileBytes;
  const uint32_t vbase = wbase + kKStages * kTileBytes;
  const TileOffsets<D> off(lane);

  // This warp's key steps: block range [s_begin, s_end) of 16-key steps, warp w takes s_begin + w + 4i. The
  // splits divide this batch row's keys (the grid is sized for Ktot = M): a split may be empty, its partial
  // then holds no keys.
  // LIST: the split's four lists (one per scan warp), read as one in order; "keys" below are list positions.
  const int32_t* lists = nullptr;
  int lp1 = 0, lp2 = 0, lp3 = 0, nlist = 0;
  if (LIST) {
    const int64_t li = (head * a.plan.splits + split) * kWarps;
    lists = a.cand + li * a.cand_cap;
    lp1 = a.cand_n[li];
    lp2 = lp1 + a.cand_n[li + 1];
    lp3 = lp2 + a.cand_n[li + 2];
    nlist = lp3 + a.cand_n[li + 3];
  }
  const int nsub = LIST ? (nlist + kSub - 1) / kSub : (klen + kSub - 1) / kSub;
  const int per = LIST ? nsub : (nsub + a.plan.splits - 1) / a.plan.splits;
  const int s_begin = LIST ? 0 : split * per, s_end = min(nsub, s_begin + per);
  const int first = s_begin + warp;
  const int steps = first < s_end ? (s_end - first + kWarps - 1) / kWarps : 0;
  const int min_pos = klen - static_cast<int>(a.p.Sq);  // smallest row position of the block
  const float scale = a.p.scale;
  const uint32_t key_bit =
      Pinned(1u << (2 * t));  // bit of key c = n * 8 + 2t + (e & 1) is key_bit << (n * 8 + (e & 1))

  auto key0 = [&](int step) { return (first + step * kWarps) * kSub; };
  // LIST: the key of list position key0(step) + lane % 16 (-1 past the lists), in a ring jr[i] = step + i that is
  // read one step before the K copy of its step is issued.
  auto listed = [&](int step) -> int {
    const int p = key0(step) + (lane & 15);
    if (!LIST || p >= nlist) return -1;
    const int u = (p >= lp1) + (p >= lp2) + (p >= lp3);
    const int from = u == 0 ? 0 : (u == 1 ? lp1 : (u == 2 ? lp2 : lp3));
    return __ldg(lists + u * a.cand_cap + (p - from));
  };
  int jr[kAhead + 1];
#pragma unroll
  for (int i = 0; i <= kAhead; ++i) jr[i] = LIST ? listed(i) : 0;
  // Prologue, before the Q rows and row constants are read (it needs the key range only, and at B = 1 a block has
  // just a few steps, so the latency of those reads would add to the K copies'): groups in the order the loop
  // expects, (V of step i - kAhead, K of step i) for i < kAhead; the V ones empty. The loop commits
  // (V(t), K(t + kAhead)) in step t.
#pragma unroll
  for (int i = 0; i < kAhead; ++i) {
    CpAsyncCommit();
    if (steps > i && !mean) {
      if (LIST) {
        LoadListedRows<T, D>(Kg, jr[i], wbase + i * kTileBytes, 0xffffu, off, lane);
      } else {
        LoadRows<T, D>(Kg, key0(i), klen, wbase + i * kTileBytes, 0xffffu, off, lane, dm);
      }
    }
    CpAsyncCommit();
  }
  // Rows of this thread: local rows g and g + 8 (local row = head-in-group * Sq + query index).
  int pos[2];
  int64_t hq[2], qi[2];
  float theta[2], rho[2];
  bool row_ok[2];
  const char* mrow[2];
  const uint8_t* kpad = MASK ? KeyPaddingRow(a, b) : nullptr;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int rl = g + 8 * e;
    row_ok[e] = rl < nrows;
    hq[e] = kvh * a.G + (row_ok[e] ? rl / a.p.Sq : 0);
    qi[e] = row_ok[e] ? rl % a.p.Sq : 0;
    const RowConst rc = RowConstants(a, klen, hq[e], qi[e]);
    pos[e] = row_ok[e] ? static_cast<int>(rc.pos) : -1;
    theta[e] = !row_ok[e] ? INFINITY : (mean ? -INFINITY : rc.theta);
    rho[e] = rc.rho;
    mrow[e] = (MASK && row_ok[e]) ? MaskRow(a, b, hq[e], qi[e]) : nullptr;
  }

  uint32_t qf[kQShared ? 1 : KS][4];
  const uint32_t qbase = SmemAddr(smem) + kWarps * (kKStages + kVStages) * kTileBytes;  // kQShared: [16][D], swizzled
  uint32_t lane_q = 0;
  if constexpr (kQShared) {
    constexpr int CH = D / 8;
    for (int c = threadIdx.x; c < kSub * CH; c += kThreads) {
      const int rl = c / CH, ch = c % CH;
      uint4 x = make_uint4(0u, 0u, 0u, 0u);
      if (rl < nrows) {
        const int64_t hr = kvh * a.G + rl / a.p.Sq, qr = rl % a.p.Sq;
        x = *reinterpret_cast<const uint4*>(static_cast<const T*>(a.p.q) + QueryOffset(a.p, b, hr, qr) + ch * 8);
      }
      asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(qbase + Swz<CH>(rl, ch)), "r"(x.x), "r"(x.y),
                   "r"(x.z), "r"(x.w));
    }
    const int r7 = lane & 7;
    lane_q = Pinned(((((lane >> 3) & 1) * 8 + r7) * CH * 16) | ((((lane >> 4) ^ r7)) << 4));
    __syncthreads();
  } else {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const bool ok = row_ok[e] && (!PAD || ks * 16 < dm);  // dm is a multiple of 16
        const T* p = static_cast<const T*>(a.p.q) + QueryOffset(a.p, b, hq[e], qi[e]) + ks * 16 + 2 * t;
        qf[ks][e] = ok ? *reinterpret_cast<const uint32_t*>(p) : 0u;
        qf[ks][2 + e] = ok ? *reinterpret_cast<const uint32_t*>(p + 8) : 0u;
      }
    }
  }

  float o[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {mean ? 0.f : theta[0], mean ? 0.f : theta[1]};
  float mo[2] = {m[0], m[1]};  // reference max of o
  float l[2] = {0.f, 0.f};
  int nk[2] = {0, 0}, nv[2] = {0, 0};
  // P (A operand) of the two steps whose P·V is still pending: [0] = step t-2, [1] = step t-1.
  uint32_t pend[2][4] = {{0u, 0u, 0u, 0u}, {0u, 0u, 0u, 0u}};
  float mp[2][2] = {{m[0], m[1]}, {m[0], m[1]}};  // reference max of each pending P
  bool pending[2] = {false, false};

  auto pv = [&](int step, const uint32_t* pa, const float* mref) {
    if (!mean) {  // bring o to this step's reference max (skipped by the warp when no row's max moved)
      const float al0 = Rescale(mo[0], mref[0]), al1 = Rescale(mo[1], mref[1]);
      mo[0] = mref[0];
      mo[1] = mref[1];
      if (__any_sync(kFull, al0 != 1.f || al1 != 1.f)) {
#pragma unroll
        for (int n = 0; n < NO; ++n) {
          o[n][0] *= al0;
          o[n][1] *= al0;
          o[n][2] *= al1;
          o[n][3] *= al1;
        }
      }
    }
    const uint32_t vb = vbase + (step % kVStages) * kTileBytes;
#pragma unroll
    for (int np = 0; np < NO / 2; ++np) {
      uint32_t bf[4];
      LdMatrixX4Trans(bf, vb + off.v_ld(np));
      Mma16816<T>(o[2 * np], pa, bf);
      Mma16816<T>(o[2 * np + 1], pa, bf + 2);
    }
  };

  // CombineKernel (launched as a programmatic dependent) may start its blocks now: they only read
  // row constants before waiting for this whole grid.
  TriggerDependents();

  // A key-padding row that allows every key of the block's range (every block but the one that holds a batch
  // row's left padding) is checked once here; the key loop then reads no mask bytes and runs like an unmasked
  // one. The K copies of the prologue are already in flight while the block checks.
  bool pad_all = false;
  // Key-padding bytes of a step (lanes < kSub; 1 where nothing is masked), read one step ahead of their use:
  // the mask row is small and L2-resident, so one step hides the load.
  auto pad_of = [&](int step) -> int {
    if (!MASK || LIST || kpad == nullptr || pad_all || step >= steps || lane >= kSub) return 1;
    const int j = key0(step) + lane;
    return j < klen ? __ldg(kpad + j) : 0;
  };

  if (MASK && !LIST && kpad != nullptr) pad_all = BlockKeysAllowed(kpad, s_begin * kSub, min(s_end * kSub, klen));
  int pad_next = pad_of(0);

  for (int step = 0; step < steps; ++step) {
    const int k0 = key0(step);
    const int pad = pad_next;
    pad_next = pad_of(step + 1);
    // K of this step and V of step - 2: the groups after V(step - 2) (K(step + kAhead - 2), V(step - 1),
    // K(step + kAhead - 1)) may be in flight; with kAhead = 2 the first of them is K(step) itself, so one less.
    CpAsyncWait<kAhead == 2 ? 2 : 3>();
    __syncwarp();
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    if (!mean) {
      const uint32_t kb = wbase + (step % kKStages) * kTileBytes;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        uint32_t bf[4], qa[4];
        if constexpr (kQShared) {
          LdMatrixX4(qa, qbase + (lane_q ^ static_cast<uint32_t>(ks << 5)));
        } else {
#pragma unroll
          for (int x = 0; x < 4; ++x) qa[x] = qf[ks][x];
        }
        LdMatrixX4(bf, kb + off.k_ld(ks));
        Mma16816<T>(s[0], qa, bf);
        Mma16816<T>(s[1], qa, bf + 2);
      }
      if constexpr (CAP) {
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[n][e] = SoftcapRaw(s[n][e], scale, a.p.softcap);
        }
      }
    }

    // Threshold test; bit c of `keys` = some row keeps key k0 + c. A full step (all 16 keys exist, are
    // visible to every row and allowed by the mask: every step but the last few) tests the threshold only.
    const int jl = jr[0];  // LIST: key of list position k0 + lane % 16
    bool full;
    if (LIST) {  // a masked call tests every key (the list has no mask bytes read ahead)
      full = !MASK && __all_sync(kFull, jl >= 0 && (!a.p.causal || jl <= min_pos));
    } else {
      full = k0 + kSub <= klen && (!a.p.causal || k0 + kSub - 1 <= min_pos);
      if (MASK) full = full && kpad != nullptr && (pad_all || __all_sync(kFull, pad != 0));
    }
    uint32_t keys = 0;
    float tmax[2] = {-INFINITY, -INFINITY};
    if (full) {
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const float x = s[n][e] * scale;
          // One compare: theta is -inf in the mean pass and +inf for rows past nrows (their q is 0, so x is 0
          // unless K holds inf / NaN, which only adds a V row to the gather; such rows are never written).
          const bool kept = !(x < theta[r]);  // NaN is kept: the row becomes NaN
          if (COUNT) nk[r] += kept;
          s[n][e] = kept ? x : -INFINITY;
          tmax[r] = fmaxf(tmax[r], s[n][e]);
          if (kept) keys |= key_bit << (n * 8 + (e & 1));
        }
      }
      if (COUNT) {
        nv[0] += row_ok[0] ? 4 : 0;
        nv[1] += row_ok[1] ? 4 : 0;
      }
    } else {
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1, c = n * 8 + 2 * t + (e & 1);
          const int j = LIST ? __shfl_sync(kFull, jl, c) : k0 + c;
          float x = s[n][e] * scale, add = 0.f;
          bool valid = row_ok[r] && j >= 0 && j < klen && (!a.p.causal || j <= pos[r]);
          if (MASK && valid) valid = MaskAt(a, mrow[r], j, &add);
          x += add;
          const bool kept = valid && (mean || !(x < theta[r]));
          if (COUNT) {
            nv[r] += valid;
            nk[r] += kept;
          }
          s[n][e] = kept ? x : -INFINITY;
          tmax[r] = fmaxf(tmax[r], s[n][e]);
          keys |= static_cast<uint32_t>(kept) << c;
        }
      }
    }
    keys = __reduce_or_sync(kFull, keys);

    uint32_t pnew[4] = {0u, 0u, 0u, 0u};
    if (keys != 0) {
      float ml[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (!mean) {
          tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(kFull, tmax[r], 1));
          tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(kFull, tmax[r], 2));
          const float mn = fmaxf(m[r], tmax[r]);
          l[r] *= Rescale(m[r], mn);
          m[r] = mn;
        }
        ml[r] = isfinite(m[r]) ? m[r] * kLog2e : 0.f;
      }
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool kept = s[n][e] != -INFINITY;
          const float p = kept ? (mean ? 1.f : Exp2(fmaf(s[n][e], kLog2e, -ml[e >> 1]))) : 0.f;
          l[e >> 1] += p;
          s[n][e] = p;
        }
      }
      pnew[0] = Elem<T>::Pack(s[0][0], s[0][1]);
      pnew[1] = Elem<T>::Pack(s[0][2], s[0][3]);
      pnew[2] = Elem<T>::Pack(s[1][0], s[1][1]);
      pnew[3] = Elem<T>::Pack(s[1][2], s[1][3]);
    }

    __syncwarp();
    if (keys != 0) {
      if (LIST) {
        LoadListedRows<T, D>(Vg, jl, vbase + (step % kVStages) * kTileBytes, keys, off, lane);
      } else {
        LoadRows<T, D>(Vg, k0, klen, vbase + (step % kVStages) * kTileBytes, keys, off, lane, dm);
      }
    }
    CpAsyncCommit();
    if (step + kAhead < steps && !mean) {
      const uint32_t kdst = wbase + ((step + kAhead) % kKStages) * kTileBytes;
      if (LIST) {
        LoadListedRows<T, D>(Kg, jr[kAhead], kdst, 0xffffu, off, lane);
      } else {
        LoadRows<T, D>(Kg, key0(step + kAhead), klen, kdst, 0xffffu, off, lane, dm);
      }
    }
    CpAsyncCommit();
    if (LIST) {
#pragma unroll
      for (int i = 0; i < kAhead; ++i) jr[i] = jr[i + 1];
      jr[kAhead] = listed(step + kAhead + 1);
    }

    if (pending[0]) pv(step - 2, pend[0], mp[0]);
    pending[0] = pending[1];
    pending[1] = keys != 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      pend[0][i] = pend[1][i];
      pend[1][i] = pnew[i];
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mp[0][r] = mp[1][r];
      mp[1][r] = m[r];
    }
  }
  CpAsyncWait<0>();
  __syncwarp();
  if (pending[0]) pv(steps - 2, pend[0], mp[0]);
  if (pending[1]) pv(steps - 1, pend[1], mp[1]);

  // This warp's rows: o relative to m, sums over the quad; then the block merges its 4 warps in
  // shared memory (the staging tiles are free once every warp is here) and writes one partial per row.
  __syncthreads();
  float* so = reinterpret_cast<float*>(smem);                     // [warps][16][D]
  float4* sst = reinterpret_cast<float4*>(so + kWarps * 16 * D);  // [warps][16]
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float alpha = mean ? 1.f : Rescale(mo[r], m[r]);
    l[r] += __shfl_xor_sync(kFull, l[r], 1);
    l[r] += __shfl_xor_sync(kFull, l[r], 2);
    if (COUNT) {
      nk[r] += __shfl_xor_sync(kFull, nk[r], 1);
      nk[r] += __shfl_xor_sync(kFull, nk[r], 2);
      nv[r] += __shfl_xor_sync(kFull, nv[r], 1);
      nv[r] += __shfl_xor_sync(kFull, nv[r], 2);
    }
    const int rl = g + 8 * r;
    float* wo = so + (warp * 16 + rl) * D;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      *reinterpret_cast<float2*>(wo + n * 8 + 2 * t) = make_float2(o[n][2 * r] * alpha, o[n][2 * r + 1] * alpha);
    }
    if (t == 0) sst[warp * 16 + rl] = make_float4(m[r], l[r], __int_as_float(nk[r]), __int_as_float(nv[r]));
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < nrows * dm; idx += kThreads) {
    const int rl = idx / dm, d = idx % dm;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sst[w * 16 + rl].x);
    float acc = 0.f, lsum = 0.f;
    int ksum = 0, vsum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float4 st = sst[w * 16 + rl];
      const float wt = isfinite(M) ? Exp2((st.x - M) * kLog2e) : 1.f;
      acc = fmaf(wt, so[(w * 16 + rl) * D + d], acc);
      lsum = fmaf(wt, st.y, lsum);
      ksum += __float_as_int(st.z);
      vsum += __float_as_int(st.w);
    }
    const int64_t hqr = kvh * a.G + rl / a.p.Sq, qir = rl % a.p.Sq;
    const int64_t part = ((b * a.p.Hq + hqr) * a.p.Sq + qir) * a.plan.splits + split;
    a.part_o[part * dm + d] = acc;
    if (d == 0) a.part_stats[part] = make_float4(M, lsum, __int_as_float(ksum), __int_as_float(vsum));
  }
}

// ---- shadow K scan ----------------------------------------------------------------------------------------
// Layout (docs/cuda-notes.md, "Shadow K"): a key's D / 2 code bytes are D / 8 32-bit words; lane t of a quad reads
// words [t * D / 32, (t + 1) * D / 32), which hold exactly the channels of its mma B fragments: word i has, at
// nibble n = 4 * odd + 2 * kp + half, channel 16 * (2 i + kp) + 2 t + 8 * half + odd. So (word >> 4m) & 0x000F000F
// is the code pair of one B register (m = 2 kp + half).

// Two codes (bits 0-3 and 16-19 of x) as a pair of T, exactly: OR-ed into the mantissa of 1024 (fp16) or 128 (bf16),
// which is then subtracted.
template <typename T>
__device__ __forceinline__ uint32_t CodePair(uint32_t x);

template <>
__device__ __forceinline__ uint32_t CodePair<__half>(uint32_t x) {
  uint32_t h = (x & 0x000F000Fu) | 0x64006400u;
  const __half2 v = __hsub2(*reinterpret_cast<__half2*>(&h), __half2half2(__ushort_as_half(0x6400)));
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t CodePair<__nv_bfloat16>(uint32_t x) {
  uint32_t h = (x & 0x000F000Fu) | 0x43004300u;
  const __nv_bfloat162 v =
      __hsub2(*reinterpret_cast<__nv_bfloat162*>(&h), __bfloat162bfloat162(__ushort_as_bfloat16(0x4300)));
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ float2 PairToF(uint32_t x);

template <>
__device__ __forceinline__ float2 PairToF<__half>(uint32_t x) {
  return __half22float2(*reinterpret_cast<const __half2*>(&x));
}

template <>
__device__ __forceinline__ float2 PairToF<__nv_bfloat16>(uint32_t x) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x));
}

// The codes of shadow block blk (keys 64 blk + 16 s + 8 n + g), lane t's words; nothing when blk has no shadow yet
// (incomplete) or lies outside the warp's range.
template <int D>
__device__ __forceinline__ void LoadCodes(const uint8_t* codes, int blk, int b_end, int complete, int g, int t,
                                          uint32_t (&cw)[kShadowBlock / kSub][2][D / 32]) {
  constexpr int W = D / 32;
  if (blk >= b_end || blk >= complete) return;
#pragma unroll
  for (int s = 0; s < kShadowBlock / kSub; ++s) {
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      const int64_t key = static_cast<int64_t>(blk) * kShadowBlock + s * kSub + n * 8 + g;
      const uint32_t* src = reinterpret_cast<const uint32_t*>(codes + key * (D / 2)) + t * W;
      if constexpr (W == 4) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(src));
        cw[s][n][0] = v.x;
        cw[s][n][1] = v.y;
        cw[s][n][2] = v.z;
        cw[s][n][3] = v.w;
      } else {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(src));
        cw[s][n][0] = v.x;
        cw[s][n][1] = v.y;
      }
    }
  }
}

// Slack of the bound, times mag = sum_c |q_c| (|min_c| + 16 step_c) >= sum_c |q_c k_c|: it covers the rounding of
// w = q * step to T (2^-9 relative in bf16, times codes <= 15), the float32 sums here and the float32 score of the
// decode kernel (D * 2^-24 relative), with room to spare.
constexpr float kShadowSlack = 1.f / 128.f;

// One block per (split, kv head, batch), the decode kernel's grid: warp w takes shadow blocks w, w + 4, ... of the
// split's range. For a block (64 keys) it loads the codes of its 4 steps of 16 keys, the block's (min, step) of its
// channels, and forms, per row (query head), w = q * step (the A operand) and the constant
//   bias = sum_c q_c min_c + sum_c |q_c| step_c / 2 + slack * mag.
// Then bound(key) = scale * (w . code + bias) >= score(key) for every key of the block, and a key is a candidate of
// the group unless the bound of every row is below θ. Keys of the last, incomplete block are all candidates.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) ShadowScanKernel(const KernelArgs a) {
  constexpr int KS = D / 16, W = D / 32;
  constexpr int kBlk = kShadowBlock, kSteps = kBlk / kSub;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int nrows = static_cast<int>(a.G * a.p.Sq);
  const int klen = static_cast<int>(KeyLen(a.p, b));
  const int64_t head = static_cast<int64_t>(b) * a.p.Hkv + kvh;
  const int64_t range_blocks = (a.p.kv_capacity + kBlk - 1) / kBlk;
  const uint8_t* codes = a.p.shadow_k + head * a.p.kv_capacity * (D / 2);
  const T* range = static_cast<const T*>(a.p.shadow_range) + head * range_blocks * 2 * D;

  float theta[2];
  uint32_t qf[KS][4];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int rl = g + 8 * e;
    const bool ok = rl < nrows;
    const int64_t hq = kvh * a.G + (ok ? rl / a.p.Sq : 0), qi = ok ? rl % a.p.Sq : 0;
    theta[e] = ok ? RowConstants(a, klen, hq, qi).theta : INFINITY;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      const T* p = static_cast<const T*>(a.p.q) + QueryOffset(a.p, b, hq, qi) + ks * 16 + 2 * t;
      qf[ks][e] = ok ? *reinterpret_cast<const uint32_t*>(p) : 0u;
      qf[ks][2 + e] = ok ? *reinterpret_cast<const uint32_t*>(p + 8) : 0u;
    }
  }

  const int nblk = (klen + kBlk - 1) / kBlk, complete = klen / kBlk;
  const int per = (nblk + a.plan.splits - 1) / a.plan.splits;
  const int b_begin = split * per, b_end = min(nblk, b_begin + per);
  const int64_t li = (head * a.plan.splits + split) * kWarps + warp;
  int32_t* list = a.cand + li * a.cand_cap;
  const float scale = a.p.scale;
  int cnt = 0;

  // Codes are loaded one block ahead (a block's 4 KB per warp is not enough in flight to cover the memory latency).
  uint32_t next[kSteps][2][W];
  LoadCodes<D>(codes, b_begin + warp, b_end, complete, g, t, next);
  for (int blk = b_begin + warp; blk < b_end; blk += kWarps) {
    const int j0 = blk * kBlk;
    uint32_t cand[kSteps];
    if (blk >= complete) {
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        const int n = klen - (j0 + s * kSub);
        cand[s] = n >= kSub ? 0xffffu : (n <= 0 ? 0u : (1u << n) - 1u);
      }
    } else {
      uint32_t cw[kSteps][2][W];  // this block's codes; the next block's are in flight meanwhile
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int w = 0; w < W; ++w) cw[s][n][w] = next[s][n][w];
        }
      }
      LoadCodes<D>(codes, blk + kWarps, b_end, complete, g, t, next);
      const T* rg = range + static_cast<int64_t>(blk) * 2 * D;
      uint32_t wf[KS][4];
      float bias[2] = {0.f, 0.f}, mag[2] = {0.f, 0.f};
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int c = ks * 16 + 2 * t + 8 * hh;
          const float2 mn = PairToF<T>(__ldg(reinterpret_cast<const unsigned int*>(rg + c)));
          const float2 st = PairToF<T>(__ldg(reinterpret_cast<const unsigned int*>(rg + D + c)));
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float2 q = PairToF<T>(qf[ks][2 * hh + e]);
            bias[e] += q.x * mn.x + q.y * mn.y + 0.5f * (fabsf(q.x) * st.x + fabsf(q.y) * st.y);
            mag[e] += fabsf(q.x) * (fabsf(mn.x) + 16.f * st.x) + fabsf(q.y) * (fabsf(mn.y) + 16.f * st.y);
            wf[ks][2 * hh + e] = Elem<T>::Pack(q.x * st.x, q.y * st.y);
          }
        }
      }
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        bias[e] += __shfl_xor_sync(kFull, bias[e], 1);
        bias[e] += __shfl_xor_sync(kFull, bias[e], 2);
        mag[e] += __shfl_xor_sync(kFull, mag[e], 1);
        mag[e] += __shfl_xor_sync(kFull, mag[e], 2);
        bias[e] += kShadowSlack * mag[e];
      }
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
          const int sh = (ks & 1) * 8;
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            const uint32_t word = cw[s][n][ks / 2];
            const uint32_t bf[2] = {CodePair<T>(word >> sh), CodePair<T>(word >> (sh + 4))};
            Mma16816<T>(acc[n], wf[ks], bf);
          }
        }
        uint32_t bits = 0;
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            const float x = scale * (acc[n][e] + bias[r]);
            if (!(x < theta[r])) bits |= 1u << (n * 8 + 2 * t + (e & 1));  // NaN: a candidate
          }
        }
        cand[s] = __reduce_or_sync(kFull, bits);
      }
    }
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const uint32_t m = cand[s];
      if (lane < kSub && ((m >> lane) & 1u)) list[cnt + __popc(m & ((1u << lane) - 1u))] = j0 + s * kSub + lane;
      cnt += __popc(m);
    }
  }
  if (lane == 0) a.cand_n[li] = cnt;
}

// One block of Dv threads per output row: merges the row's partials (and applies the compensation).
// Launched as a programmatic dependent of DecodeKernel (sm_90): the row constants are read before
// griddepcontrol.wait, which returns once DecodeKernel has completed and its writes are visible.
// One block per (row, 32 channels of Dv), up to kCombineWarps warps: warp w merges partials w, w + W, ... and lane
// c holds channel c, so each thread has at most kCombineLoads partial-O loads in flight per round (one round for
// up to W * 32 partials). Every partial is weighed against the row's max over all partials (found first, while the
// loads are in flight); the warps' sums are then added in shared memory. At B = 1 a row has 64-128 partials, and
// one block of Dv threads per row had to take them 64 loads at a time.
constexpr int kCombineWarps = 8;
constexpr int kCombineLoads = 32;  // partials per lane and round (one per lane of a warp)

__global__ void __launch_bounds__(kCombineWarps * 32, 1) CombineKernel(const KernelArgs a) {
  const int64_t row = blockIdx.x;
  const int64_t D = a.p.Dv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  // Dv = 80: the last block's lanes past Dv load and write nothing, but take part in the reductions.
  const bool channel = blockIdx.y * 32 + lane < D;
  const int64_t d = channel ? blockIdx.y * 32 + lane : 0;
  const bool final_pass = !a.mean_pass;
  RowConst rc = {0, 0.f, 0.f};
  if (final_pass) rc = RowConstants(a, KeyLen(a.p, row / (a.p.Hq * a.p.Sq)), (row / a.p.Sq) % a.p.Hq, row % a.p.Sq);
  GridDependencyWait();

  const int parts = a.plan.splits;
  const int per_round = nwarps * kCombineLoads;
  const float4* st = a.part_stats + row * parts;
  const float* po = a.part_o + row * parts * D + d;
  // Round r: warp w, slot i holds partial w + nwarps * (r * kCombineLoads + i); lane i also holds its statistics.
  auto part_of = [&](int r, int i) { return warp + nwarps * (r * kCombineLoads + i); };
  float x[kCombineLoads];
  auto load_round = [&](int r) {
#pragma unroll
    for (int i = 0; i < kCombineLoads; ++i) {
      const int p = part_of(r, i);
      x[i] = p < parts ? po[static_cast<int64_t>(p) * D] : 0.f;
    }
  };
  const float4 none = make_float4(-INFINITY, 0.f, __int_as_float(0), __int_as_float(0));
  auto stats_of = [&](int r) { return part_of(r, lane) < parts ? st[part_of(r, lane)] : none; };
  load_round(0);
  float4 v = stats_of(0);

  __shared__ float red_m[kCombineWarps];
  __shared__ float4 red_s[kCombineWarps];  // (dk, -, n_kept, n_valid) per warp
  __shared__ float red_n[kCombineWarps][32];
  const int rounds = (parts + per_round - 1) / per_round;
  float M = v.x;
  for (int r = 1; r < rounds; ++r) M = fmaxf(M, stats_of(r).x);
  for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(kFull, M, o));
  if (lane == 0) red_m[warp] = M;
  __syncthreads();
  for (int w = 0; w < nwarps; ++w) M = fmaxf(M, red_m[w]);
  const bool fin = isfinite(M);

  float dk = 0.f, n = 0.f;
  int nk = 0, nv = 0;
  for (int r = 0;;) {
    const bool mine = part_of(r, lane) < parts;
    const float wt = mine ? (fin ? Exp2((v.x - M) * kLog2e) : 1.f) : 0.f;
    dk += wt * v.y;
    nk += __float_as_int(v.z);
    nv += __float_as_int(v.w);
#pragma unroll
    for (int i = 0; i < kCombineLoads; ++i) n = fmaf(__shfl_sync(kFull, wt, i), x[i], n);
    if (++r >= rounds) break;
    load_round(r);
    v = stats_of(r);
  }
  for (int o = 16; o > 0; o >>= 1) {
    dk += __shfl_xor_sync(kFull, dk, o);
    nk += __shfl_xor_sync(kFull, nk, o);
    nv += __shfl_xor_sync(kFull, nv, o);
  }
  red_n[warp][lane] = n;
  if (lane == 0) red_s[warp] = make_float4(dk, 0.f, __int_as_float(nk), __int_as_float(nv));
  __syncthreads();
  if (warp != 0) return;
  n = 0.f;
  dk = 0.f;
  nk = nv = 0;
  for (int w = 0; w < nwarps; ++w) {
    n += red_n[w][lane];
    dk += red_s[w].x;
    nk += __float_as_int(red_s[w].z);
    nv += __float_as_int(red_s[w].w);
  }
  if (!channel) return;
  if (!final_pass) {
    a.vbar[row * D + d] = dk > 0.f ? n / dk : 0.f;
    return;
  }
  const RowFinal f = FinishRow(a, dk, M, rc.theta, rc.rho, nk, nv);
  float out = n * f.inv;
  if (f.dp_inv != 0.f) out = fmaf(f.dp_inv, a.vbar[row * D + d], out);
  const int64_t o = OutputOffset(a.p, row / (a.p.Hq * a.p.Sq), (row / a.p.Sq) % a.p.Hq, row % a.p.Sq) + d;
  if (a.p.dtype == DType::kBF16) {
    static_cast<__nv_bfloat16*>(a.p.out)[o] = __float2bfloat16_rn(out);
  } else {
    static_cast<__half*>(a.p.out)[o] = __float2half_rn(out);
  }
  if (a.p.kept && d == 0) a.p.kept[row] = nk;
}

template <int D, int KST>
constexpr int DecodeSmem() {
  return kWarps * (KST + kVStages) * kSub * D * 2 + (D > 128 ? kSub * D * 2 : 0);
}

template <typename T, int D, bool MASK, bool COUNT, int KST, bool LIST, bool CAP = false, bool PAD = false>
cudaError_t Run(const KernelArgs& a, cudaStream_t stream) {
  constexpr int smem = DecodeSmem<D, KST>();
  cudaError_t e = AllowSmem<DecodeKernel<T, D, MASK, COUNT, KST, LIST, CAP, PAD>>(smem);
  if (e != cudaSuccess) return e;
  dim3 grid(static_cast<unsigned>(a.plan.splits), static_cast<unsigned>(a.p.Hkv), static_cast<unsigned>(a.p.B));
  DecodeKernel<T, D, MASK, COUNT, KST, LIST, CAP, PAD><<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

// The shadow path has the default K stages only; head dim 256 has 3 K stages and no shadow path (4 stages would not
// fit in shared memory; ShadowCovers); the padded head dims have the default K stages and no shadow path.
template <typename T, int D, bool MASK, bool COUNT, bool PAD = false>
cudaError_t RunK(const KernelArgs& a, cudaStream_t stream) {
  if constexpr (D == 256) {
    return Run<T, D, MASK, COUNT, 3, false>(a, stream);
  } else if constexpr (PAD) {
    return Run<T, D, MASK, COUNT, kDecodeKStagesDefault, false, false, true>(a, stream);
  } else {
    if (a.plan.shadow) return Run<T, D, MASK, COUNT, kDecodeKStagesDefault, true>(a, stream);
    return a.plan.decode_kstages == 3 ? Run<T, D, MASK, COUNT, 3, false>(a, stream)
                                      : Run<T, D, MASK, COUNT, 4, false>(a, stream);
  }
}

// Counts are needed for the `kept` output and the compensation (both read n_kept / n_valid), not otherwise.
template <typename T, int D, bool PAD = false>
cudaError_t RunD(const KernelArgs& a, cudaStream_t stream) {
  const bool mask = a.p.mask_kind != MaskKind::kNone;
  const bool count = a.p.kept != nullptr || (a.p.comp_mode >= 1 && a.p.sdc != nullptr);
  if (mask) return count ? RunK<T, D, true, true, PAD>(a, stream) : RunK<T, D, true, false, PAD>(a, stream);
  return count ? RunK<T, D, false, true, PAD>(a, stream) : RunK<T, D, false, false, PAD>(a, stream);
}

template <typename T, int D, bool PAD = false>
cudaError_t RunCapD(const KernelArgs& a, cudaStream_t stream) {
  const bool mask = a.p.mask_kind != MaskKind::kNone;
  return mask ? Run<T, D, true, true, 3, false, true, PAD>(a, stream)
              : Run<T, D, false, true, 3, false, true, PAD>(a, stream);
}

template <typename T>
cudaError_t RunT(const KernelArgs& a, cudaStream_t stream) {
  if (!DecodeHeadDim(a.p.D)) return cudaErrorInvalidValue;  // MakePlan sends these to the prefill kernel
  const bool pad = PaddedHeadDim(a.p.D);
  if (a.p.softcap > 0.f) {
    if (pad) return RunCapD<T, 128, true>(a, stream);
    return a.p.D == 64 ? RunCapD<T, 64>(a, stream)
                       : (a.p.D == 128 ? RunCapD<T, 128>(a, stream) : RunCapD<T, 256>(a, stream));
  }
  if (pad) return RunD<T, 128, true>(a, stream);
  if (a.p.D == 256) return RunD<T, 256>(a, stream);
  return a.p.D == 64 ? RunD<T, 64>(a, stream) : RunD<T, 128>(a, stream);
}

}  // namespace

int DecodeBlocksPerSm(int D, int kstages) {
  static int cached[3][2] = {{0, 0}, {0, 0}, {0, 0}};  // [D = 64, 128, 256][3, 4 K stages] (the largest variant)
  int& c = cached[D == 64 ? 0 : (D == 128 ? 1 : 2)][kstages == 3 ? 0 : 1];
  if (c <= 0) {
    if (D == 256) {  // 3 K stages only
      c = BlocksPerSm<DecodeKernel<__half, 256, true, true, 3, false>>(kThreads, DecodeSmem<256, 3>());
    } else if (kstages == 3) {
      c = D == 64 ? BlocksPerSm<DecodeKernel<__half, 64, true, true, 3, false>>(kThreads, DecodeSmem<64, 3>())
                  : BlocksPerSm<DecodeKernel<__half, 128, true, true, 3, false>>(kThreads, DecodeSmem<128, 3>());
    } else {
      c = D == 64 ? BlocksPerSm<DecodeKernel<__half, 64, true, true, 4, false>>(kThreads, DecodeSmem<64, 4>())
                  : BlocksPerSm<DecodeKernel<__half, 128, true, true, 4, false>>(kThreads, DecodeSmem<128, 4>());
    }
  }
  return c;
}

cudaError_t LaunchDecode(const KernelArgs& a, cudaStream_t stream) {
  return a.p.dtype == DType::kBF16 ? RunT<__nv_bfloat16>(a, stream) : RunT<__half>(a, stream);
}

template <typename T>
cudaError_t RunScan(const KernelArgs& a, cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>(a.plan.splits), static_cast<unsigned>(a.p.Hkv), static_cast<unsigned>(a.p.B));
  if (a.p.D == 64) {
    ShadowScanKernel<T, 64><<<grid, kThreads, 0, stream>>>(a);
  } else {
    ShadowScanKernel<T, 128><<<grid, kThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t LaunchShadowScan(const KernelArgs& a, cudaStream_t stream) {
  return a.p.dtype == DType::kBF16 ? RunScan<__nv_bfloat16>(a, stream) : RunScan<__half>(a, stream);
}

cudaError_t LaunchDecodeCombine(const KernelArgs& a, cudaStream_t stream) {
  const int64_t rows = a.p.B * a.p.Hq * a.p.Sq;
  cudaLaunchConfig_t cfg = {};
  // Warps per block: enough that a lane has at most 16 partials of a row (one round of loads), at most 8.
  const int warps = static_cast<int>(std::min<int64_t>(kCombineWarps, std::max<int64_t>(1, (a.plan.splits + 15) / 16)));
  cfg.gridDim = dim3(static_cast<unsigned>(rows), static_cast<unsigned>((a.p.Dv + 31) / 32));
  cfg.blockDim = dim3(static_cast<unsigned>(warps * 32));
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = HasProgrammaticLaunch() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, CombineKernel, a);
}

}  // namespace cuda
}  // namespace toptheta

// Prefill kernel of TopThetaAttention for Hopper (sm_90a): warpgroup MMA (wgmma) from shared memory.
//
// A block owns 128 query rows of one (batch, query head): two warpgroups of 64 rows each. K/V tiles of 128
// keys stream through a 3-stage shared-memory ring (cp.async by all threads, one tile ahead, completion and
// release tracked by per-stage mbarriers: no block-wide barrier in the loop), in the 128-byte swizzle layout
// that the wgmma descriptors describe. Per tile and warpgroup:
//   S = Q Kᵀ            (wgmma, Q and K from shared memory, fp32 accumulators in registers)
//   O += P(t-1) V(t-1)  (issued right after S, so the tensor cores run it during this tile's softmax)
//   threshold test s >= θ on the fp32 scores, online softmax over the kept scores (running max starts at θ),
//   P packed to fp16/bf16 registers (the A operand of the next P·V), and the 16-key chunks of P that are all
//   zero (every score pruned, or underflowed) are not multiplied: the warpgroup agrees on them through a
//   named barrier. The two warpgroups issue their MMAs by turns (ping-pong), so that one warpgroup's softmax
//   runs while the other's MMAs do. Tiles wholly above the causal diagonal are not visited.
// It covers the rewrite's default call (no mask or a [B, Ktot] bool key-padding mask, no `kept` output, comp_mode
// 0: COUNT = false of prefill.cu); every other call runs prefill.cu's kernel. ptxas must not serialise the wgmma
// pipeline (its notes C7514, C7515, C7520): branches around MMAs are on warp-uniform values, and no other
// instruction writes an accumulator while a group is in flight. Semantics: docs/op.md; design notes:
// docs/cuda-notes.md.
#include <type_traits>

#include "common.cuh"
#include "wgmma.cuh"

namespace toptheta {
namespace cuda {
namespace {

constexpr int kWG = 2;  // warpgroups (64 query rows each)
constexpr int kThreads = 128 * kWG;
constexpr int kBM = 64 * kWG;  // query rows per block
constexpr int kBN = 128;       // keys per tile
constexpr int kStages = 3;

template <int D>
constexpr int TileBytes() {
  return kBN * D * 2;
}

template <int D>
constexpr int SmemBytes() {
  return kBM * D * 2 + kStages * 2 * TileBytes<D>() + 1024 /* alignment */ + 64 /* chunk flags */ + 64 /* mbarriers */;
}

// Byte offset of 16-byte chunk `ch` of row `r` in a tile of ROWS rows: 64-column blocks one after the other,
// 128-byte rows, chunk swizzled by the row (the wgmma 128-byte swizzle; blocks are 1024-byte aligned).
template <int ROWS>
__device__ __forceinline__ uint32_t TileOff(int r, int ch) {
  return static_cast<uint32_t>((ch >> 3) * ROWS * 128 + r * 128 + (((ch & 7) ^ (r & 7)) << 4));
}

// Copies rows [r0, r0 + ROWS) of an [n, D] matrix (rows `stride` elements apart) into a swizzled tile (rows >= n are
// zero-filled). Thread tid copies chunk tid % CH of rows tid / CH + i * RPI: one shared and one global base address per
// thread, every copy at a constant offset from them (only the last tile of a matrix needs the bounds test).
template <int ROWS, int D>
__device__ __forceinline__ void LoadRows(uint32_t dst, const void* src, int r0, int n, int64_t stride = D) {
  constexpr int CH = D / 8;
  constexpr int RPI = kThreads / CH;  // rows per pass (16 or 32: the swizzle of a thread's rows is fixed)
  static_assert(ROWS % RPI == 0 && RPI % 8 == 0, "tile copy layout");
  const int r = threadIdx.x / CH, ch = threadIdx.x % CH;
  const uint32_t s0 = dst + TileOff<ROWS>(r, ch);
  const char* g0 = static_cast<const char*>(src) + (static_cast<int64_t>(r0 + r) * stride + ch * 8) * 2;
  if (r0 + ROWS <= n) {
#pragma unroll
    for (int i = 0; i < ROWS / RPI; ++i) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s0 + i * RPI * 128),
                   "l"(g0 + i * RPI * stride * 2));
    }
  } else {
#pragma unroll
    for (int i = 0; i < ROWS / RPI; ++i) {
      const bool ok = r0 + r + i * RPI < n;
      CpAsync16(s0 + i * RPI * 128, ok ? g0 + static_cast<int64_t>(i) * RPI * stride * 2 : src, ok);
    }
  }
}

#ifdef TOPTHETA_SM90A_DEVICE
__device__ __forceinline__ void MbarInit(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Arrives on `bar` when all earlier cp.async of this thread have completed (the count was set for it).
__device__ __forceinline__ void CpAsyncArrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Waits until the phase of `bar` with this parity has completed.
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// Ping-pong turns of the two warpgroups: named barrier 3 + w is warpgroup w's turn to issue MMAs; it waits there
// (its 128 threads) for the other warpgroup's 128 arrivals, and passes the turn by arriving at the other's.
__device__ __forceinline__ void TurnWait(int wg) {
  if (wg == 0) {
    asm volatile("bar.sync 3, 256;\n" ::: "memory");
  } else {
    asm volatile("bar.sync 4, 256;\n" ::: "memory");
  }
}
__device__ __forceinline__ void TurnPass(int wg) {
  if (wg == 0) {
    asm volatile("bar.arrive 4, 256;\n" ::: "memory");
  } else {
    asm volatile("bar.arrive 3, 256;\n" ::: "memory");
  }
}
#endif

template <typename T, int D, bool MASK>
__global__ void __launch_bounds__(kThreads, 1) PrefillSm90Kernel(const KernelArgs a) {
#ifdef TOPTHETA_SM90A_DEVICE
  constexpr bool BF16 = std::is_same<T, __nv_bfloat16>::value;
  constexpr int NS = kBN / 8;   // 8-key blocks of S per thread row
  constexpr int NO = D / 8;     // 8-column blocks of O
  constexpr int KS = D / 16;    // k-steps of Q Kᵀ
  constexpr int KV = kBN / 16;  // k-steps of P·V (16-key chunks)
  constexpr uint32_t kTile = TileBytes<D>();
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (SmemAddr(smem_raw) + 1023u) & ~1023u;
  const uint32_t qbase = base, kvbase = base + kBM * D * 2;
  uint32_t* flags =
      reinterpret_cast<uint32_t*>(smem_raw + (base - SmemAddr(smem_raw)) + kBM * D * 2 + kStages * 2 * kTile);
  // Per stage a "full" barrier (every thread's copies of the tile landed) and an "empty" one (every thread
  // is done with the tile: its S and P·V finished), so that the warpgroups never wait for each other at a
  // block barrier (measured 7 % faster at 16k than a __syncthreads per tile).
  const uint32_t full0 = SmemAddr(flags) + 64, empty0 = full0 + 8 * kStages;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int st = 0; st < kStages; ++st) {
      MbarInit(full0 + 8 * st, kThreads);
      MbarInit(empty0 + 8 * st, kThreads);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  // Warp and warpgroup indices broadcast from lane 0, so that ptxas knows every branch on them (and on
  // values derived from them) is warp-uniform; otherwise it serialises the wgmma pipeline.
  const int warp = __shfl_sync(kFull, static_cast<int>(threadIdx.x) / 32, 0);
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int wg = warp / 4, wq = warp % 4;
  const PrefillBlock blk = PrefillBlockOf(a, kBM);
  const int64_t h = blk.h, b = blk.b;
  const int i0 = blk.i0;
  const int64_t kvh = h / a.G;
  const float inv_scale = 1.f / a.p.scale;
  const float c2 = a.p.scale * kLog2e;
  const T* Qg = static_cast<const T*>(a.p.q) + QueryOffset(a.p, b, h, 0);
  const T* Kg = static_cast<const T*>(a.p.k) + (b * a.p.Hkv + kvh) * a.p.kv_capacity * D;
  const T* Vg = static_cast<const T*>(a.p.v) + (b * a.p.Hkv + kvh) * a.p.kv_capacity * D;
  // Ktot: this batch row's keys (KeyLen; the buffer has kv_capacity rows), read from memory in the shared form and
  // broadcast from lane 0 like the warp index, so that the branches on it stay warp-uniform for ptxas.
  const int Sq = static_cast<int>(a.p.Sq), Ktot = __shfl_sync(kFull, static_cast<int>(KeyLen(a.p, b)), 0);
  const int off = Ktot - Sq;
  // MASK: the [B, Ktot] bool key-padding row. Whether a tile's 128 keys are all allowed is read one tile
  // ahead (4 bytes per lane into registers), so its latency hides behind a tile of work.
  const uint8_t* kpad = MASK ? KeyPaddingRow(a, b) : nullptr;
  uint32_t kp_next = 0;  // bit c: key k0 + lane + 32 c of the next tile is allowed
  auto kp_load = [&](int k0n) {
    uint32_t bits = 0;
#pragma unroll
    for (int c = 0; c < kBN / 32; ++c) {
      const int j = k0n + lane + 32 * c;
      bits |= (j < Ktot && kpad[j] != 0 ? 1u : 0u) << c;
    }
    return bits;
  };
  if (MASK) kp_next = kp_load(0);

  const int g0 = i0 + wg * 64;  // first row of the warpgroup
  const int w0 = g0 + wq * 16;  // first row of the warp
  float th[2], m[2], l[2][2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int i = w0 + g + 8 * e;
    th[e] = i < Sq ? RowConstants(a, Ktot, h, i).theta * inv_scale : INFINITY;
    m[e] = th[e];
    l[e][0] = l[e][1] = 0.f;
  }

  // Key range of the block (causal: up to its last row); the warp's first row position.
  const int last_row = min(i0 + kBM, Sq) - 1;
  const int kend = a.p.causal ? min(Ktot, off + last_row + 1) : Ktot;
  const int ntiles = (kend + kBN - 1) / kBN;
  const int wfirst_pos = off + w0;

  float o[NO * 4];
#pragma unroll
  for (int x = 0; x < NO * 4; ++x) o[x] = 0.f;
  uint32_t pk[KV][4];    // P of the previous tile (A fragments of its P·V)
  uint32_t pv_mask = 0;  // its 16-key chunks to multiply (same in the whole warpgroup); 0 = none pending
  int pv_stage = 0;

  LoadRows<kBM, D>(qbase, Qg, i0, Sq, QueryRowStride(a.p));
  if (ntiles > 0) {
    LoadRows<kBN, D>(kvbase, Kg, 0, Ktot);
    LoadRows<kBN, D>(kvbase + kTile, Vg, 0, Ktot);
  }
  CpAsyncArrive(full0);
  // Ping-pong by turns: warpgroup w waits at barrier 3 + w before issuing its MMAs, then opens the other's; so
  // the tensor cores run S0, P·V0, S1, P·V1, ... and one warpgroup's softmax overlaps the other's MMAs.
  if (wg == 1 && ntiles > 0) TurnPass(wg);

  // Shared-memory descriptors of Q (this warpgroup's 64 rows), of K and V in stage 0; a stage or a k-step
  // adds its byte offset / 16 to the address field (addresses stay below 256 KB, so it never carries out).
  const uint64_t qdesc = SmemDesc(qbase + wg * 64 * 128, 16, 1024);
  const uint64_t kdesc = SmemDesc(kvbase, 16, 1024);
  const uint64_t vdesc = SmemDesc(kvbase + kTile, kBN * 128, 1024);
  // The pending P·V (pk over the V tile of pv_stage, only the chunks of pv_mask) as one wgmma group, which is
  // committed also when empty, so that the waits after it do not depend on a branch.
  auto IssuePV = [&]() {
    if (pv_mask != 0) {
      const uint64_t vd = vdesc + static_cast<uint64_t>(pv_stage * (2 * kTile >> 4));
#pragma unroll
      for (int x = 0; x < NO * 4; ++x) FenceReg(o[x]);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < KV; ++kk) {
        if (!((pv_mask >> kk) & 1u)) continue;
        const uint64_t db = vd + ((kk * 16 * 128) >> 4);
        if constexpr (D == 128) {
          WgmmaRS128T<BF16>(o, pk[kk], db, 1);
        } else {
          WgmmaRS64T<BF16>(o, pk[kk], db, 1);
        }
      }
    }
    WgmmaCommit();
  };
  for (int tile = 0; tile < ntiles; ++tile) {
    const int stage = tile % kStages;
    if (tile + 1 < ntiles) {  // the next tile, into the stage of tile - 2 once everyone is done with it
      const int u = tile + 1, su = u % kStages;
      if (u >= kStages) MbarWait(empty0 + 8 * su, (u / kStages - 1) & 1);
      const uint32_t nb = kvbase + su * 2 * kTile;
      LoadRows<kBN, D>(nb, Kg, u * kBN, Ktot);
      LoadRows<kBN, D>(nb + kTile, Vg, u * kBN, Ktot);
      CpAsyncArrive(full0 + 8 * su);
    }
    MbarWait(full0 + 8 * stage, (tile / kStages) & 1);
    FenceProxyAsync();  // the other threads' cp.async writes, now visible, to wgmma's async proxy

    const int k0 = tile * kBN;
    float s[NS * 4];
    // Two wgmma groups: S of this tile, then the previous tile's P·V (it overlaps this tile's softmax). S is
    // computed for every tile of the block, also where causality masks all of this warpgroup's scores (then
    // nothing is kept below): no branch on it keeps the wgmma pipeline whole.
    // This warpgroup's turn (ping-pong: +8 % at 16k on an H100).
    TurnWait(wg);
    {
      const uint64_t kd = kdesc + static_cast<uint64_t>(stage * (2 * kTile >> 4));
#pragma unroll
      for (int x = 0; x < NS * 4; ++x) FenceReg(s[x]);
      WgmmaFence();
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        const uint64_t da = qdesc + (((ks >> 2) * (kBM * 128) + (ks & 3) * 32) >> 4);
        const uint64_t db = kd + (((ks >> 2) * (kBN * 128) + (ks & 3) * 32) >> 4);
        WgmmaSS128<BF16>(s, da, db, ks > 0 ? 1 : 0);
      }
    }
    WgmmaCommit();
    IssuePV();
    TurnPass(wg);
    WgmmaWait<1>();  // S done
#pragma unroll
    for (int x = 0; x < NS * 4; ++x) FenceReg(s[x]);

    // Threshold test: kept raw scores stay, the rest become -inf. The test is !(s < θ) and the tile max keeps
    // NaN (MaxNan), so that a NaN score is kept, the tile is live and the row becomes NaN (docs/op.md, "NaN").
    bool full = k0 + kBN <= Ktot && (!a.p.causal || k0 + kBN - 1 <= wfirst_pos);
    if (MASK) {  // a tile with padded keys takes the per-element path
      full = full && __all_sync(kFull, kp_next == (1u << (kBN / 32)) - 1u);
      if (tile + 1 < ntiles) kp_next = kp_load(k0 + kBN);
    }
    // Kept scores and then P go to sp, not back into the accumulators s: ptxas serialises the wgmma pipeline
    // when non-wgmma instructions write accumulator registers while another wgmma group is in flight.
    float sp[NS * 4];
    float tmax[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}};
    if (full) {
#pragma unroll
      for (int n = 0; n < NS; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          // The max may take pruned scores too: they are below θ <= m, so they never raise the running max
          // (and the max does not wait for the select).
          sp[4 * n + e] = s[4 * n + e] < th[r] ? -INFINITY : s[4 * n + e];
          tmax[r][n & 1] = MaxNan(tmax[r][n & 1], s[4 * n + e]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {  // nothing kept in the row: as in the masked path, -inf
        const float t = MaxNan(tmax[r][0], tmax[r][1]);
        tmax[r][0] = t < th[r] ? -INFINITY : t;
        tmax[r][1] = -INFINITY;
      }
    } else {
#pragma unroll
      for (int n = 0; n < NS; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const int i = w0 + g + 8 * r;
          const int j = k0 + n * 8 + 2 * t + (e & 1);
          const bool valid = i < Sq && j < Ktot && (!a.p.causal || j <= off + i) && (!MASK || kpad[j] != 0);
          const float x = valid && !(s[4 * n + e] < th[r]) ? s[4 * n + e] : -INFINITY;
          sp[4 * n + e] = x;
          tmax[r][n & 1] = MaxNan(tmax[r][n & 1], x);
        }
      }
    }
    float alpha[2] = {1.f, 1.f};
    const bool live =
        tmax[0][0] != -INFINITY || tmax[0][1] != -INFINITY || tmax[1][0] != -INFINITY || tmax[1][1] != -INFINITY;
    const bool warp_live = __any_sync(kFull, live);
    if (warp_live) {
      float mc[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float tm = fmaxf(tmax[r][0], tmax[r][1]);
        tm = fmaxf(tm, __shfl_xor_sync(kFull, tm, 1));
        tm = fmaxf(tm, __shfl_xor_sync(kFull, tm, 2));
        const float mn = fmaxf(m[r], tm);
        alpha[r] = isfinite(mn) ? Exp2((m[r] - mn) * c2) : 1.f;
        m[r] = mn;
        mc[r] = isfinite(mn) ? mn * c2 : 0.f;
        l[r][0] *= alpha[r];
        l[r][1] *= alpha[r];
      }
#pragma unroll
      for (int n = 0; n < NS; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e >> 1;
          const float p = Exp2(fmaf(sp[4 * n + e], c2, -mc[r]));  // exp2(-inf) = 0 for pruned
          l[r][n & 1] += p;
          sp[4 * n + e] = p;
        }
      }
    }
    // The previous P·V has to finish before O is rescaled and its P registers are overwritten.
    WgmmaWait<0>();
#pragma unroll
    for (int x = 0; x < NO * 4; ++x) FenceReg(o[x]);
    if (tile > 0) MbarArrive(empty0 + 8 * ((tile - 1) % kStages));  // the previous tile's S and P·V are done
    uint32_t nz = 0;
    if (warp_live) {
      // O is rescaled only when some row of the warp has a new max (a warp vote: a per-thread branch around
      // accumulator writes would make ptxas serialise the MMAs).
      if (__any_sync(kFull, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
        for (int n = 0; n < NO; ++n) {
          o[4 * n + 0] *= alpha[0];
          o[4 * n + 1] *= alpha[0];
          o[4 * n + 2] *= alpha[1];
          o[4 * n + 3] *= alpha[1];
        }
      }
#pragma unroll
      for (int kk = 0; kk < KV; ++kk) {
        pk[kk][0] = Elem<T>::Pack(sp[8 * kk + 0], sp[8 * kk + 1]);
        pk[kk][1] = Elem<T>::Pack(sp[8 * kk + 2], sp[8 * kk + 3]);
        pk[kk][2] = Elem<T>::Pack(sp[8 * kk + 4], sp[8 * kk + 5]);
        pk[kk][3] = Elem<T>::Pack(sp[8 * kk + 6], sp[8 * kk + 7]);
        nz |= ((pk[kk][0] | pk[kk][1] | pk[kk][2] | pk[kk][3]) != 0u ? 1u : 0u) << kk;
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < KV; ++kk) pk[kk][0] = pk[kk][1] = pk[kk][2] = pk[kk][3] = 0u;
    }
    // The warpgroup multiplies a chunk when any of its warps has a nonzero P there.
    nz = __reduce_or_sync(kFull, nz);
    if (lane == 0) flags[wg * 4 + wq] = nz;
    asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");
    pv_mask = __shfl_sync(kFull, flags[wg * 4] | flags[wg * 4 + 1] | flags[wg * 4 + 2] | flags[wg * 4 + 3], 0);
    pv_stage = stage;
  }
  // The last tile's P·V (in turn, also by a warpgroup with nothing to multiply, so that the turns match; the
  // last turn is not passed on, which would leave an arrival pending at exit).
  if (ntiles > 0) TurnWait(wg);
  IssuePV();
  if (ntiles > 0 && wg == 0) TurnPass(wg);
  WgmmaWait<0>();
#pragma unroll
  for (int x = 0; x < NO * 4; ++x) FenceReg(o[x]);
  // Epilogue (COUNT = false: no kept counts; comp_mode 0).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float ls = l[r][0] + l[r][1];
    ls += __shfl_xor_sync(kFull, ls, 1);
    ls += __shfl_xor_sync(kFull, ls, 2);
    const int i = w0 + g + 8 * r;
    if (i >= Sq) continue;
    const RowConst rc = RowConstants(a, Ktot, h, i);
    const int n_valid = static_cast<int>(a.p.causal ? min(rc.pos + 1, int64_t{Ktot}) : Ktot);
    const RowFinal f = FinishRow(a, ls, m[r] * a.p.scale, rc.theta, rc.rho, 0, n_valid);
    T* out = static_cast<T*>(a.p.out) + OutputOffset(a.p, b, h, i);
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      *reinterpret_cast<uint32_t*>(out + n * 8 + 2 * t) =
          Elem<T>::Pack(o[4 * n + 2 * r] * f.inv, o[4 * n + 2 * r + 1] * f.inv);
    }
  }
#endif  // TOPTHETA_SM90A_DEVICE
}

template <typename T, int D, bool MASK>
cudaError_t RunM(const KernelArgs& a, cudaStream_t stream) {
  constexpr int smem = SmemBytes<D>();
  static_assert(smem <= 227 * 1024, "shared memory");
  cudaError_t e = AllowSmem<PrefillSm90Kernel<T, D, MASK>>(smem);
  if (e != cudaSuccess) return e;
  const int64_t ntq = (a.p.Sq + kBM - 1) / kBM;
  const dim3 grid(static_cast<unsigned>(a.p.B * a.p.Hq * ntq));
  PrefillSm90Kernel<T, D, MASK><<<grid, kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t Run(const KernelArgs& a, cudaStream_t stream) {
  return a.p.mask_kind != MaskKind::kNone ? RunM<T, D, true>(a, stream) : RunM<T, D, false>(a, stream);
}

}  // namespace

bool PrefillSm90Available(int device) {
#ifdef TOPTHETA_SM90A
  static int cached[64] = {};  // 0 unknown, 1 no, 2 yes
  int& c = cached[device & 63];
  if (c == 0) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
      cudaGetLastError();
      major = 0;
    }
    c = major == 9 && minor == 0 ? 2 : 1;
  }
  return c == 2;
#else
  (void)device;
  return false;
#endif
}

cudaError_t LaunchPrefillSm90(const KernelArgs& a, cudaStream_t stream) {
  if (a.p.dtype == DType::kBF16)
    return a.p.D == 64 ? Run<__nv_bfloat16, 64>(a, stream) : Run<__nv_bfloat16, 128>(a, stream);
  return a.p.D == 64 ? Run<__half, 64>(a, stream) : Run<__half, 128>(a, stream);
}

}  // namespace cuda
}  // namespace toptheta

// Prefill kernel of TopThetaAttention: flash-style tiles on tensor cores (mma.sync m16n8k16, fp32
// accumulate). A block owns BM = 16 * MT * WARPS query rows of one (batch, query head); each warp owns
// MT m-tiles of 16 rows (MT = 1: Q fragments in registers; MT = 2: Q in shared memory and every K/V
// fragment read from shared memory feeds two MMAs). K/V tiles of 64 keys stream through shared memory (cp.async,
// double buffered). Per tile and warp: S = Q K^T, the threshold test s >= theta on the fp32 scores,
// online softmax over the kept scores (running max starts at theta), kept/valid counts, and P·V only
// for the 16-row x 16-key chunks in which some score survived (a tile with nothing kept skips the
// softmax update too). Fully masked causal tiles are not visited. comp_mode 2 runs the kernel twice:
// mean_pass = 1 (P = validity, output = V-mean in fp32), then the real pass reads that mean.
#include "common.cuh"

namespace toptheta {
namespace cuda {
namespace {

constexpr int kBN = 64;  // keys per tile

// Block-wide copy of the K (when with_k) and V rows [k0, k0 + kBN) into swizzled tiles (rows >= klen, the
// batch row's keys, zero-filled without reading memory). Thread tid
// always copies chunk tid % CH of rows tid / CH + i * RPI; RPI is a multiple of 8, so the swizzle of
// its rows is one per-thread constant and every copy is a fixed offset from the first. `dm`: the rows' head dim in
// memory, D but for the padded head dims (TileHeadDim), whose chunks past dm / 8 are zero-filled the same way.
template <typename T, int D, int THREADS>
__device__ __forceinline__ void LoadTile(const T* Kg, const T* Vg, int k0, int klen, uint32_t ks, uint32_t vs,
                                         bool with_k, int dm = D) {
  constexpr int CH = D / 8;
  constexpr int RPI = THREADS / CH;  // rows per pass
  static_assert(RPI % 8 == 0 && kBN % RPI == 0, "tile copy layout");
  const int r0 = threadIdx.x / CH, ch = threadIdx.x % CH;
  const bool chunk_ok = dm == D || ch * 8 < dm;
  const uint32_t soff = Swz<CH>(r0, ch);
  const int64_t goff = static_cast<int64_t>(k0 + r0) * dm + ch * 8;
#pragma unroll
  for (int i = 0; i < kBN / RPI; ++i) {
    const bool ok = chunk_ok && k0 + r0 + i * RPI < klen;
    const int64_t g = ok ? goff + i * RPI * dm : 0;
    const uint32_t so = soff + i * RPI * CH * 16;
    if (with_k) CpAsync16(ks + so, Kg + g, ok);
    CpAsync16(vs + so, Vg + g, ok);
  }
}

template <int MT, int WARPS>
constexpr int RowsPerBlock() {
  return 16 * MT * WARPS;
}

// Q in shared memory: MT = 2, and head dim 256 (whose O accumulators leave no registers for Q fragments).
template <int D, int MT>
constexpr bool QInSmem() {
  return MT == 2 || D > 128;
}

template <int D, int MT, int WARPS>
constexpr int SmemBytes() {
  return (QInSmem<D, MT>() ? RowsPerBlock<MT, WARPS>() * D * 2 : 0) + 4 * kBN * D * 2;
}

// MT m-tiles of 16 rows per warp (D = 256: MT = 1 with Q in shared memory, WARPS = 8); thread rows r = 2 * mt + e are
// w0 + 16 * mt + g + 8 * e. Scores are kept in raw units (q.k, before the scale): theta and the running max m are
// divided by the (positive) scale once, so the threshold test is one compare and exp(s - m) one FFMA + EX2. COUNT =
// false (no `kept` output, comp_mode 0: the rewrite's default) drops the per-score kept bits and counts; the P·V chunks
// to skip are then found from the packed probabilities (a chunk whose P is all zero adds nothing, whether its scores
// were pruned or underflowed).
// CAP: softcap > 0 (Gemma 2): the raw scores are capped right after Q·Kᵀ (an instantiation of its own, so that the
// other kernels keep their registers).
// PAD: the rows in memory have a.p.D < D channels (80 or 96 in tiles of 128, 32 in tiles of 64: TileHeadDim): Q, K and
// V are zero-padded to D in registers and shared memory, and only a.p.D channels are written.
template <typename T, int D, bool MASK, int MT, int WARPS, bool COUNT, bool CAP = false, bool PAD = false>
__global__ void __launch_bounds__(WARPS * 32, 1) PrefillKernel(const KernelArgs a) {
  static_assert(!PAD || D == 128 || D == 64, "padded head dims: tiles of 128 or 64");
  constexpr int THREADS = WARPS * 32;
  constexpr int kBM = RowsPerBlock<MT, WARPS>();
  constexpr int CH = D / 8;            // 16-byte chunks per K/V row
  constexpr int KS = D / 16;           // k-steps of Q K^T
  constexpr int NS = kBN / 8;          // n-blocks of S (8 keys each)
  constexpr int NO = D / 8;            // n-blocks of O (8 columns each)
  constexpr int RT = 2 * MT;           // rows per thread
  constexpr int NA = MT == 1 ? 2 : 1;  // independent max / sum chains per row (MT = 2 has ILP already)
  constexpr uint32_t kRowBytes = CH * 16;
  constexpr uint32_t kTileBytes = kBN * kRowBytes;
  constexpr bool kQSmem = QInSmem<D, MT>();
  constexpr uint32_t kQBytes = kQSmem ? kBM * kRowBytes : 0;
  extern __shared__ __align__(128) unsigned char smem[];

  // Register pressure (variant 2, D = 128 sits at 255): the broadcasts from lane 0 below tell ptxas that a value is
  // warp-uniform, so that what derives from it may live in uniform registers. Applied where ptxas -v shows they
  // avoid spills (COUNT without a mask: none left), left out where it allocates worse with them.
  int warp_index = threadIdx.x / 32;
  if constexpr (COUNT && !MASK) warp_index = __shfl_sync(kFull, warp_index, 0);
  const int warp = warp_index, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  // Row and key indices fit in int (a head's K alone would otherwise exceed any GPU's memory).
  const PrefillBlock blk = PrefillBlockOf(a, kBM);
  const int64_t h = blk.h, b = blk.b;
  const int i0 = blk.i0;
  const int64_t kvh = h / a.G;
  const bool mean = a.mean_pass != 0;
  const float inv_scale = 1.f / a.p.scale;
  const float c2 = a.p.scale * kLog2e;  // raw score -> log2 units
  const T* Qg = static_cast<const T*>(a.p.q) + QueryOffset(a.p, b, h, 0);
  const int64_t qstride = QueryRowStride(a.p);       // D, or Hq·D when packed
  const int dm = PAD ? static_cast<int>(a.p.D) : D;  // channels of a row in memory
  const T* Kg = static_cast<const T*>(a.p.k) + (b * a.p.Hkv + kvh) * a.p.kv_capacity * dm;
  const T* Vg = static_cast<const T*>(a.p.v) + (b * a.p.Hkv + kvh) * a.p.kv_capacity * dm;
  const uint32_t qbase = SmemAddr(smem), sbase = qbase + kQBytes;

  // Per-lane ldmatrix offsets in a swizzled tile (Swz): physical chunk = chunk ^ (row & 7), and since a
  // row is a multiple of 128 bytes, offset(row, 2 * step + x) = lane_base ^ (step << 5).
  const int r7 = lane & 7;
  const uint32_t lane_k = (((lane >> 4) * 8 + r7) * kRowBytes) | (((((lane >> 3) & 1) ^ r7)) << 4);
  const uint32_t lane_v = ((((lane >> 3) & 1) * 8 + r7) * kRowBytes) | ((((lane >> 4) ^ r7)) << 4);
  const uint32_t lane_q = ((warp * 16 * MT + ((lane >> 3) & 1) * 8 + r7) * kRowBytes) | ((((lane >> 4) ^ r7)) << 4);

  // Ktot: this batch row's keys (KeyLen; the buffer has kv_capacity rows), from memory in the shared form.
  const int Sq = static_cast<int>(a.p.Sq);
  int key_len = static_cast<int>(KeyLen(a.p, b));
  if constexpr (!(MASK && COUNT)) key_len = __shfl_sync(kFull, key_len, 0);
  const int Ktot = key_len;
  const int w0 = i0 + warp * 16 * MT;  // first row of this warp
  const int off = Ktot - Sq;           // row position = off + row index
  auto row_of = [&](int r) { return w0 + 16 * (r >> 1) + g + 8 * (r & 1); };
  float th[RT];  // raw-unit thresholds (+inf for padding rows: never kept)
  const char* mrow[RT];
  const uint8_t* kpad = MASK ? KeyPaddingRow(a, b) : nullptr;
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int i = row_of(r);
    mrow[r] = nullptr;
    if (i < Sq) {
      th[r] = mean ? -INFINITY : RowConstants(a, Ktot, h, i).theta * inv_scale;
      if (MASK) mrow[r] = MaskRow(a, b, h, i);
    } else {
      th[r] = INFINITY;
    }
  }

  // Q: fragments in registers (MT = 1), or a swizzled shared-memory tile (kQSmem, loaded with tile 0).
  uint32_t qf[kQSmem ? 1 : KS][4];
  if constexpr (!kQSmem) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int i = w0 + g + 8 * e;
        const bool ok = i < Sq && (!PAD || ks * 16 < dm);  // dm is a multiple of 16
        const T* p = Qg + static_cast<int64_t>(i < Sq ? i : 0) * qstride + ks * 16 + 2 * t;
        qf[ks][e] = ok ? *reinterpret_cast<const uint32_t*>(p) : 0u;
        qf[ks][2 + e] = ok ? *reinterpret_cast<const uint32_t*>(p + 8) : 0u;
      }
    }
  } else if (!mean) {
    for (int c = threadIdx.x; c < kBM * CH; c += THREADS) {
      const int r = c / CH, ch = c % CH;
      const bool ok = i0 + r < Sq && (!PAD || ch * 8 < dm);
      CpAsync16(qbase + Swz<CH>(r, ch),
                Qg + static_cast<int64_t>(ok ? i0 + r : 0) * qstride + (PAD && !ok ? 0 : ch * 8), ok);
    }
  }

  // Key ranges: the block's (causal: up to its last row) and this warp's.
  const int last_row = min(i0 + kBM, Sq) - 1;
  const int kend = a.p.causal ? min(Ktot, off + last_row + 1) : Ktot;
  const int ntiles = (kend + kBN - 1) / kBN;
  const int wlast = min(w0 + 16 * MT - 1, Sq - 1);
  const int wkend = w0 >= Sq ? 0 : (a.p.causal ? min(Ktot, off + wlast + 1) : Ktot);
  const int wfirst_pos = off + w0;  // smallest row position of the warp

  float o[MT][NO][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int n = 0; n < NO; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
  }
  float m[RT], l[RT][NA];
  int nk[RT], nv[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    m[r] = mean ? 0.f : th[r];
#pragma unroll
    for (int x = 0; x < NA; ++x) l[r][x] = 0.f;
    nk[r] = nv[r] = 0;
  }

  if (ntiles > 0) LoadTile<T, D, THREADS>(Kg, Vg, 0, Ktot, sbase, sbase + 2 * kTileBytes, !mean, dm);
  CpAsyncCommit();
  for (int tile = 0; tile < ntiles; ++tile) {
    const int buf = tile & 1;
    if (tile + 1 < ntiles) {
      LoadTile<T, D, THREADS>(Kg, Vg, (tile + 1) * kBN, Ktot, sbase + (buf ^ 1) * kTileBytes,
                              sbase + (2 + (buf ^ 1)) * kTileBytes, !mean, dm);
    }
    CpAsyncCommit();
    CpAsyncWait<1>();
    __syncthreads();

    const int k0 = tile * kBN;
    if (k0 < wkend) {
      const uint32_t kb = sbase + buf * kTileBytes, vb = sbase + (2 + buf) * kTileBytes;
      float s[MT][NS][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < NS; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
      }
      if (!mean) {
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
          uint32_t qa[MT][4];
          if constexpr (!kQSmem) {
#pragma unroll
            for (int x = 0; x < 4; ++x) qa[0][x] = qf[ks][x];
          } else {
            const uint32_t qaddr = qbase + (lane_q ^ (ks << 5));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) LdMatrixX4(qa[mt], qaddr + mt * 16 * kRowBytes);
          }
          const uint32_t kaddr = kb + (lane_k ^ (ks << 5));
#pragma unroll
          for (int np = 0; np < NS / 2; ++np) {
            uint32_t bf[4];
            LdMatrixX4(bf, kaddr + np * 16 * kRowBytes);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              Mma16816<T>(s[mt][2 * np], qa[mt], bf);
              Mma16816<T>(s[mt][2 * np + 1], qa[mt], bf + 2);
            }
          }
        }
        if constexpr (CAP) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int n = 0; n < NS; ++n) {
#pragma unroll
              for (int e = 0; e < 4; ++e) s[mt][n][e] = SoftcapRaw(s[mt][n][e], a.p.scale, a.p.softcap);
            }
          }
        }
      }

      // Threshold test: s keeps kept raw scores and -inf elsewhere; bit 4n+e of km[mt] = kept. The test is
      // !(s < θ), so that a NaN score is kept and makes its row NaN (docs/op.md, "NaN").
      bool full = k0 + kBN <= Ktot && (!a.p.causal || k0 + kBN - 1 <= wfirst_pos);
      if (MASK) full = full && kpad != nullptr && KeysAllAllowed(kpad, k0, kBN, Ktot, lane);
      uint32_t km[MT] = {};
      float tmax[RT][NA];
#pragma unroll
      for (int r = 0; r < RT; ++r) {
#pragma unroll
        for (int x = 0; x < NA; ++x) tmax[r][x] = -INFINITY;
      }
      // One straight-line loop per case (a per-element branch would cost more than the test itself).
      auto mark = [&](int mt, int n, int e, bool kept) {
        const int r = 2 * mt + (e >> 1);
        const float x = kept ? s[mt][n][e] : -INFINITY;
        s[mt][n][e] = x;
        // COUNT = false finds live tiles from tmax: a kept NaN must make it NaN, not be dropped.
        tmax[r][n % NA] = COUNT ? fmaxf(tmax[r][n % NA], x) : MaxNan(tmax[r][n % NA], x);
        if (COUNT) km[mt] |= kept ? (1u << (4 * n + e)) : 0u;
      };
      if (full) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int n = 0; n < NS; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) mark(mt, n, e, !(s[mt][n][e] < th[2 * mt + (e >> 1)]));
          }
        }
        if (MASK) {
#pragma unroll
          for (int r = 0; r < RT; ++r) nv[r] += 2 * NS;
        }
      } else {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int n = 0; n < NS; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = 2 * mt + (e >> 1);
              const int j = k0 + n * 8 + 2 * t + (e & 1);
              const int i = row_of(r);
              float add = 0.f;
              bool valid = i < Sq && j < Ktot && (!a.p.causal || j <= off + i);
              if (MASK && valid) valid = MaskAt(a, mrow[r], j, &add);
              if (MASK) {
                if (!mean) s[mt][n][e] = fmaf(add, inv_scale, s[mt][n][e]);  // mean pass: P = 1
                nv[r] += valid;
              }
              mark(mt, n, e, valid && !(s[mt][n][e] < th[r]));
            }
          }
        }
      }
      uint32_t chunks = 0;  // bit mt * 4 + c: m-tile mt keeps a key of 16-key chunk c
      if constexpr (COUNT) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          nk[2 * mt] += __popc(km[mt] & 0x33333333u);
          nk[2 * mt + 1] += __popc(km[mt] & 0xccccccccu);
#pragma unroll
          for (int c = 0; c < kBN / 16; ++c) {
            chunks |= (((km[mt] >> (8 * c)) & 0xffu) != 0u ? 1u : 0u) << (mt * 4 + c);
          }
        }
        chunks = __reduce_or_sync(kFull, chunks);
      } else {
        bool live = false;  // some row of the thread kept a score (kept scores are finite)
#pragma unroll
        for (int r = 0; r < RT; ++r) {
#pragma unroll
          for (int x = 0; x < NA; ++x) live = live || tmax[r][x] != -INFINITY;
        }
        chunks = __any_sync(kFull, live) ? 1u : 0u;  // refined per chunk after the softmax
      }

      if (chunks != 0) {  // else nothing of this warp survived in the tile: no softmax update, no P·V
        float mc[RT], alpha[RT];
        bool rescale = false;
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          float tm = tmax[r][0];
#pragma unroll
          for (int x = 1; x < NA; ++x) tm = fmaxf(tm, tmax[r][x]);
          tm = fmaxf(tm, __shfl_xor_sync(kFull, tm, 1));
          tm = fmaxf(tm, __shfl_xor_sync(kFull, tm, 2));
          const float mn = fmaxf(m[r], tm);
          alpha[r] = isfinite(mn) ? Exp2((m[r] - mn) * c2) : 1.f;
          rescale = rescale || alpha[r] != 1.f;
          m[r] = mn;
          mc[r] = isfinite(mn) ? mn * c2 : 0.f;
        }
        if (__any_sync(kFull, rescale)) {
#pragma unroll
          for (int r = 0; r < RT; ++r) {
#pragma unroll
            for (int x = 0; x < NA; ++x) l[r][x] *= alpha[r];
#pragma unroll
            for (int n = 0; n < NO; ++n) {
              o[r >> 1][n][2 * (r & 1)] *= alpha[r];
              o[r >> 1][n][2 * (r & 1) + 1] *= alpha[r];
            }
          }
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int n = 0; n < NS; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = 2 * mt + (e >> 1);
              const float p = Exp2(fmaf(s[mt][n][e], c2, -mc[r]));  // exp2(-inf) = 0 for pruned
              l[r][n % NA] += p;
              s[mt][n][e] = p;
            }
          }
        }
        // P as the A fragments of the P·V MMAs: packed here for all chunks when the chunks to skip are
        // found from P (COUNT = false), else per chunk below (fewer live registers).
        uint32_t pk[MT][kBN / 16][4];
        auto pack = [&](int mt, int kk) {
          pk[mt][kk][0] = Elem<T>::Pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
          pk[mt][kk][1] = Elem<T>::Pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
          pk[mt][kk][2] = Elem<T>::Pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
          pk[mt][kk][3] = Elem<T>::Pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        };
        if constexpr (!COUNT) {
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int kk = 0; kk < kBN / 16; ++kk) pack(mt, kk);
          }
          uint32_t nz = 0;
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int kk = 0; kk < kBN / 16; ++kk) {
              nz |= ((pk[mt][kk][0] | pk[mt][kk][1] | pk[mt][kk][2] | pk[mt][kk][3]) != 0u ? 1u : 0u) << (mt * 4 + kk);
            }
          }
          chunks = __reduce_or_sync(kFull, nz);
        }
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
          bool need[MT];
          bool any = false;
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            need[mt] = (chunks >> (mt * 4 + kk)) & 1u;
            any = any || need[mt];
          }
          if (!any) continue;
          if constexpr (COUNT) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) pack(mt, kk);
          }
          const uint32_t vrow = vb + kk * 16 * kRowBytes;
#pragma unroll
          for (int np = 0; np < NO / 2; ++np) {
            uint32_t bf[4];
            LdMatrixX4Trans(bf, vrow + (lane_v ^ (np << 5)));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              if (!need[mt]) continue;
              Mma16816<T>(o[mt][2 * np], pk[mt][kk], bf);
              Mma16816<T>(o[mt][2 * np + 1], pk[mt][kk], bf + 2);
            }
          }
        }
      }
    }
    __syncthreads();
  }
  CpAsyncWait<0>();

  // Epilogue: row sums and counts over the quad, compensation, store.
  float lsum[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    lsum[r] = l[r][0];
#pragma unroll
    for (int x = 1; x < NA; ++x) lsum[r] += l[r][x];
    lsum[r] += __shfl_xor_sync(kFull, lsum[r], 1);
    lsum[r] += __shfl_xor_sync(kFull, lsum[r], 2);
    if (COUNT) {
      nk[r] += __shfl_xor_sync(kFull, nk[r], 1);
      nk[r] += __shfl_xor_sync(kFull, nk[r], 2);
      nv[r] += __shfl_xor_sync(kFull, nv[r], 1);
      nv[r] += __shfl_xor_sync(kFull, nv[r], 2);
    }
  }
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int i = row_of(r);
    if (i >= Sq) continue;
    const int mt = r >> 1, e2 = 2 * (r & 1);
    const int64_t row = (b * a.p.Hq + h) * a.p.Sq + i;
    if (mean) {
      const float inv = lsum[r] > 0.f ? 1.f / lsum[r] : 0.f;
      float* vb = a.vbar + row * dm;
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        if (PAD && n * 8 >= dm) break;
        *reinterpret_cast<float2*>(vb + n * 8 + 2 * t) = make_float2(o[mt][n][e2] * inv, o[mt][n][e2 + 1] * inv);
      }
      continue;
    }
    const int64_t klen = KeyLen(a.p, b);  // read again: Ktot need not stay live through the tile loop
    const RowConst rc = RowConstants(a, klen, h, i);
    const int n_valid = MASK ? nv[r] : static_cast<int>(a.p.causal ? min(rc.pos + 1, klen) : klen);
    const RowFinal f = FinishRow(a, lsum[r], m[r] * a.p.scale, rc.theta, rc.rho, nk[r], n_valid);
    const float* vbar = f.dp_inv != 0.f ? a.vbar + row * dm : nullptr;
    T* out = static_cast<T*>(a.p.out) + OutputOffset(a.p, b, h, i);
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      if (PAD && n * 8 >= dm) break;
      const int c = n * 8 + 2 * t;
      float x0 = o[mt][n][e2] * f.inv, x1 = o[mt][n][e2 + 1] * f.inv;
      if (vbar) {
        x0 = fmaf(f.dp_inv, vbar[c], x0);
        x1 = fmaf(f.dp_inv, vbar[c + 1], x1);
      }
      *reinterpret_cast<uint32_t*>(out + c) = Elem<T>::Pack(x0, x1);
    }
    if (a.p.kept && t == 0) a.p.kept[row] = nk[r];
  }
}

template <typename T, int D, bool MASK, int MT, int WARPS, bool COUNT, bool CAP = false, bool PAD = false>
cudaError_t Run(const KernelArgs& a, cudaStream_t stream) {
  constexpr int smem = SmemBytes<D, MT, WARPS>();
  constexpr int bm = RowsPerBlock<MT, WARPS>();
  static_assert(smem <= 227 * 1024, "shared memory");
  cudaError_t e = AllowSmem<PrefillKernel<T, D, MASK, MT, WARPS, COUNT, CAP, PAD>>(smem);
  if (e != cudaSuccess) return e;
  const int64_t ntq = (a.p.Sq + bm - 1) / bm;
  const dim3 grid(static_cast<unsigned>(a.p.B * a.p.Hq * ntq));
  PrefillKernel<T, D, MASK, MT, WARPS, COUNT, CAP, PAD><<<grid, WARPS * 32, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int MT, int WARPS, bool COUNT>
cudaError_t RunV(const KernelArgs& a, cudaStream_t stream) {
  const bool mask = a.p.mask_kind != MaskKind::kNone;
  if (a.p.D == 64) {
    return mask ? Run<T, 64, true, MT, WARPS, COUNT>(a, stream) : Run<T, 64, false, MT, WARPS, COUNT>(a, stream);
  }
  return mask ? Run<T, 128, true, MT, WARPS, COUNT>(a, stream) : Run<T, 128, false, MT, WARPS, COUNT>(a, stream);
}

// Head dim 256 has one kernel, 8 warps x 16 rows with Q in shared memory (MakePlan reports it as variant 0).
template <typename T, bool COUNT>
cudaError_t RunD256(const KernelArgs& a, cudaStream_t stream) {
  const bool mask = a.p.mask_kind != MaskKind::kNone;
  return mask ? Run<T, 256, true, 1, 8, COUNT>(a, stream) : Run<T, 256, false, 1, 8, COUNT>(a, stream);
}

// The padded head dims (80, 96 in tiles of 128, 32 in tiles of 64) have one kernel too, 8 warps x 16 rows (variant
// 0 in MakePlan).
template <typename T, int D, bool COUNT>
cudaError_t RunPadded(const KernelArgs& a, cudaStream_t stream) {
  const bool mask = a.p.mask_kind != MaskKind::kNone;
  return mask ? Run<T, D, true, 1, 8, COUNT, false, true>(a, stream)
              : Run<T, D, false, 1, 8, COUNT, false, true>(a, stream);
}

// A softcap has one kernel per head dim: 8 warps x 16 rows (with Q in shared memory at D = 256), with counts
// (MakePlan reports it as variant 0).
template <typename T, int D, bool PAD = false>
cudaError_t RunCapD(const KernelArgs& a, cudaStream_t stream) {
  const bool mask = a.p.mask_kind != MaskKind::kNone;
  return mask ? Run<T, D, true, 1, 8, true, true, PAD>(a, stream) : Run<T, D, false, 1, 8, true, true, PAD>(a, stream);
}

// Variants (KernelArgs::prefill_variant): 0 = 8 warps x 16 rows, 1 = 4 warps x 16 rows,
// 2 = 4 warps x 32 rows.
template <typename T>
cudaError_t RunT(const KernelArgs& a, cudaStream_t stream) {
  // Default (-1): 4 warps x 32 rows, the fastest measured on H100 (also with a mask, though that
  // instantiation spills a few registers).
  const int v = a.plan.prefill_variant >= 0 ? a.plan.prefill_variant : 2;
  // Kept counts are needed for the `kept` output and for the compensation's pruned count.
  const bool count = a.p.kept != nullptr || a.p.comp_mode >= 1 || a.mean_pass != 0;
  const bool pad = PaddedHeadDim(a.p.D), pad64 = pad && TileHeadDim(a.p.D) == 64;
  if (a.p.softcap > 0.f) {
    if (pad) return pad64 ? RunCapD<T, 64, true>(a, stream) : RunCapD<T, 128, true>(a, stream);
    return a.p.D == 64 ? RunCapD<T, 64>(a, stream)
                       : (a.p.D == 128 ? RunCapD<T, 128>(a, stream) : RunCapD<T, 256>(a, stream));
  }
  if (pad64) return count ? RunPadded<T, 64, true>(a, stream) : RunPadded<T, 64, false>(a, stream);
  if (pad) return count ? RunPadded<T, 128, true>(a, stream) : RunPadded<T, 128, false>(a, stream);
  if (a.p.D == 256) return count ? RunD256<T, true>(a, stream) : RunD256<T, false>(a, stream);
  switch (v) {
    case 1: return RunV<T, 1, 4, true>(a, stream);
    case 2: return count ? RunV<T, 2, 4, true>(a, stream) : RunV<T, 2, 4, false>(a, stream);
    default: return RunV<T, 1, 8, true>(a, stream);
  }
}

}  // namespace

cudaError_t LaunchPrefill(const KernelArgs& a, cudaStream_t stream) {
  if (a.plan.prefill_variant == 3) return LaunchPrefillSm90(a, stream);  // Hopper (MakePlan checked it applies)
  return a.p.dtype == DType::kBF16 ? RunT<__nv_bfloat16>(a, stream) : RunT<__half>(a, stream);
}

}  // namespace cuda
}  // namespace toptheta

// Prefill kernel of TopThetaAttention: flash-style tiles on tensor cores (mma.sync m16n8k16, fp32
// accumulate). A block owns 128 query rows of one (batch, query head): 8 warps x 16 rows (MT = 1, Q
// fragments in registers) or 4 warps x 32 rows (MT = 2, Q in shared memory; every K/V fragment read
// from shared memory feeds two MMAs). K/V tiles of 64 keys stream through shared memory (cp.async,
// double buffered). Per tile and warp: S = Q K^T, the threshold test s >= theta on the fp32 scores,
// online softmax over the kept scores (running max starts at theta), kept/valid counts, and P·V only
// for the 16-row x 16-key chunks in which some score survived (a tile with nothing kept skips the
// softmax update too). Fully masked causal tiles are not visited. comp_mode 2 runs the kernel twice:
// mean_pass = 1 (P = validity, output = V-mean in fp32), then the real pass reads that mean.
#include "common.cuh"

namespace toptheta {
namespace cuda {
namespace {

constexpr int kBM = 128;  // query rows per block
constexpr int kBN = 64;   // keys per tile

__device__ __forceinline__ float Rescale(float from, float to) {
  return isfinite(to) ? Exp2((from - to) * kLog2e) : 1.f;
}

template <typename T, int D, int THREADS>
__device__ __forceinline__ void LoadTile(const KernelArgs& a, const T* Kg, const T* Vg, int64_t k0, uint32_t ks,
                                         uint32_t vs, bool with_k) {
  constexpr int CH = D / 8;
  for (int c = threadIdx.x; c < kBN * CH; c += THREADS) {
    const int r = c / CH, ch = c % CH;
    const int64_t key = k0 + r;
    const bool ok = key < a.Ktot;
    const int64_t off = (ok ? key : 0) * D + ch * 8;
    if (with_k) CpAsync16(ks + Swz<CH>(r, ch), Kg + off, ok);
    CpAsync16(vs + Swz<CH>(r, ch), Vg + off, ok);
  }
}

template <int MT>
constexpr int Threads() {
  return (kBM / (16 * MT)) * 32;
}

template <typename T, int D, int MT>
constexpr int SmemBytes() {
  return (MT == 2 ? kBM * D * 2 : 0) + 4 * kBN * D * 2;
}

// MT m-tiles of 16 rows per warp; thread rows r = 2 * mt + e are w0 + 16 * mt + g + 8 * e.
template <typename T, int D, bool MASK, int MT>
__global__ void __launch_bounds__(Threads<MT>(), 1) PrefillKernel(const KernelArgs a) {
  constexpr int THREADS = Threads<MT>();
  constexpr int CH = D / 8;       // 16-byte chunks per K/V row
  constexpr int KS = D / 16;      // k-steps of Q K^T
  constexpr int NS = kBN / 8;     // n-blocks of S (8 keys each)
  constexpr int NO = D / 8;       // n-blocks of O (8 columns each)
  constexpr int RT = 2 * MT;      // rows per thread
  constexpr uint32_t kTileBytes = kBN * D * 2;
  constexpr uint32_t kQBytes = MT == 2 ? kBM * D * 2 : 0;
  extern __shared__ __align__(128) unsigned char smem[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int64_t h = blockIdx.x, b = blockIdx.z;
  const int64_t i0 = (static_cast<int64_t>(gridDim.y) - 1 - blockIdx.y) * kBM;  // longest (causal) first
  const int64_t kvh = h / a.G;
  const bool mean = a.mean_pass != 0;
  const T* Qg = static_cast<const T*>(a.q) + (b * a.Hq + h) * a.Sq * D;
  const T* Kg = static_cast<const T*>(a.k) + (b * a.Hkv + kvh) * a.Ktot * D;
  const T* Vg = static_cast<const T*>(a.v) + (b * a.Hkv + kvh) * a.Ktot * D;
  const uint32_t qbase = SmemAddr(smem), sbase = qbase + kQBytes;

  const int64_t w0 = i0 + warp * 16 * MT;  // first row of this warp
  int64_t pos[RT];
  float theta[RT], rho[RT];
  bool row_ok[RT];
  const char* mrow[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int64_t i = w0 + 16 * (r >> 1) + g + 8 * (r & 1);
    row_ok[r] = i < a.Sq;
    mrow[r] = nullptr;
    if (row_ok[r]) {
      const RowConst rc = RowConstants(a, h, i);
      pos[r] = rc.pos;
      theta[r] = mean ? -INFINITY : rc.theta;
      rho[r] = rc.rho;
      if (MASK) mrow[r] = MaskRow(a, b, h, i);
    } else {
      pos[r] = -1;
      theta[r] = INFINITY;  // never kept
      rho[r] = 0.f;
    }
  }

  // Q: fragments in registers (MT = 1), or a swizzled shared-memory tile (MT = 2, loaded with tile 0).
  uint32_t qf[MT == 1 ? KS : 1][4];
  if constexpr (MT == 1) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t i = w0 + g + 8 * e;
        const T* p = Qg + (i < a.Sq ? i : 0) * D + ks * 16 + 2 * t;
        qf[ks][e] = i < a.Sq ? *reinterpret_cast<const uint32_t*>(p) : 0u;
        qf[ks][2 + e] = i < a.Sq ? *reinterpret_cast<const uint32_t*>(p + 8) : 0u;
      }
    }
  } else if (!mean) {
    for (int c = threadIdx.x; c < kBM * CH; c += THREADS) {
      const int r = c / CH, ch = c % CH;
      const bool ok = i0 + r < a.Sq;
      CpAsync16(qbase + Swz<CH>(r, ch), Qg + (ok ? i0 + r : 0) * D + ch * 8, ok);
    }
  }

  // Key ranges: the block's (causal: up to its last row) and this warp's.
  const int64_t last_row = min(i0 + kBM, a.Sq) - 1;
  const int64_t off = a.Ktot - a.Sq;
  const int64_t kend = a.causal ? min(a.Ktot, off + last_row + 1) : a.Ktot;
  const int ntiles = static_cast<int>((kend + kBN - 1) / kBN);
  const int64_t wlast = min(w0 + 16 * MT - 1, a.Sq - 1);
  const int64_t wkend = w0 >= a.Sq ? 0 : (a.causal ? min(a.Ktot, off + wlast + 1) : a.Ktot);
  const int64_t wfirst_pos = off + w0;  // smallest row position of the warp

  float o[MT][NO][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int n = 0; n < NO; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
  }
  float m[RT], l[RT];
  int nk[RT], nv[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    m[r] = mean ? 0.f : theta[r];
    l[r] = 0.f;
    nk[r] = nv[r] = 0;
  }

  if (ntiles > 0) LoadTile<T, D, THREADS>(a, Kg, Vg, 0, sbase, sbase + 2 * kTileBytes, !mean);
  CpAsyncCommit();
  for (int tile = 0; tile < ntiles; ++tile) {
    const int buf = tile & 1;
    if (tile + 1 < ntiles) {
      LoadTile<T, D, THREADS>(a, Kg, Vg, static_cast<int64_t>(tile + 1) * kBN, sbase + (buf ^ 1) * kTileBytes,
                              sbase + (2 + (buf ^ 1)) * kTileBytes, !mean);
    }
    CpAsyncCommit();
    CpAsyncWait<1>();
    __syncthreads();

    const int64_t k0 = static_cast<int64_t>(tile) * kBN;
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
          if constexpr (MT == 1) {
#pragma unroll
            for (int x = 0; x < 4; ++x) qa[0][x] = qf[ks][x];
          } else {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              LdMatrixX4(qa[mt], qbase + Swz<CH>(warp * 16 * MT + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                 ks * 2 + (lane >> 4)));
            }
          }
#pragma unroll
          for (int np = 0; np < NS / 2; ++np) {
            uint32_t bf[4];
            LdMatrixX4(bf, kb + Swz<CH>(np * 16 + (lane >> 4) * 8 + (lane & 7), ks * 2 + ((lane >> 3) & 1)));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              Mma16816<T>(s[mt][2 * np], qa[mt], bf);
              Mma16816<T>(s[mt][2 * np + 1], qa[mt], bf + 2);
            }
          }
        }
      }

      // Threshold test; s keeps the score of kept keys and -inf elsewhere. Bit mt * 4 + c of `chunks`:
      // some row of m-tile mt keeps a key of the 16-key chunk c.
      const bool full = !MASK && k0 + kBN <= a.Ktot && (!a.causal || k0 + kBN - 1 <= wfirst_pos);
      uint32_t chunks = 0;
      float tmax[RT];
#pragma unroll
      for (int r = 0; r < RT; ++r) tmax[r] = -INFINITY;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < NS; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = 2 * mt + (e >> 1);
            float x = s[mt][n][e] * a.scale;
            bool valid = true;
            if (!full) {
              const int64_t j = k0 + n * 8 + 2 * t + (e & 1);
              float add = 0.f;
              valid = row_ok[r] && j < a.Ktot && (!a.causal || j <= pos[r]);
              if (MASK && valid) valid = MaskAt(a, mrow[r], j, &add);
              x += add;
              nv[r] += valid;
            }
            const bool kept = valid && (mean || x >= theta[r]);
            nk[r] += kept;
            s[mt][n][e] = kept ? x : -INFINITY;
            tmax[r] = fmaxf(tmax[r], s[mt][n][e]);
            chunks |= static_cast<uint32_t>(kept) << (mt * 4 + (n >> 1));
          }
        }
      }
      if (full) {
#pragma unroll
        for (int r = 0; r < RT; ++r) nv[r] += 2 * NS;
      }
      chunks = __reduce_or_sync(kFull, chunks);

      if (chunks != 0) {  // else nothing of this warp survived in the tile: no softmax update, no P·V
        float ml[RT];
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          if (!mean) {
            tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(kFull, tmax[r], 1));
            tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(kFull, tmax[r], 2));
            const float mn = fmaxf(m[r], tmax[r]);
            const float alpha = Rescale(m[r], mn);
            m[r] = mn;
            l[r] *= alpha;
#pragma unroll
            for (int n = 0; n < NO; ++n) {
              o[r >> 1][n][2 * (r & 1)] *= alpha;
              o[r >> 1][n][2 * (r & 1) + 1] *= alpha;
            }
          }
          ml[r] = isfinite(m[r]) ? m[r] * kLog2e : 0.f;
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int n = 0; n < NS; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int r = 2 * mt + (e >> 1);
              const bool kept = s[mt][n][e] != -INFINITY;
              const float p = kept ? (mean ? 1.f : Exp2(fmaf(s[mt][n][e], kLog2e, -ml[r]))) : 0.f;
              l[r] += p;
              s[mt][n][e] = p;
            }
          }
        }
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
          uint32_t need[MT];
          bool any = false;
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            need[mt] = (chunks >> (mt * 4 + kk)) & 1u;
            any = any || need[mt];
          }
          if (!any) continue;
          uint32_t pa[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            pa[mt][0] = Elem<T>::Pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
            pa[mt][1] = Elem<T>::Pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
            pa[mt][2] = Elem<T>::Pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
            pa[mt][3] = Elem<T>::Pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
          }
#pragma unroll
          for (int np = 0; np < NO / 2; ++np) {
            uint32_t bf[4];
            LdMatrixX4Trans(bf, vb + Swz<CH>(kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7), np * 2 + (lane >> 4)));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              if (!need[mt]) continue;
              Mma16816<T>(o[mt][2 * np], pa[mt], bf);
              Mma16816<T>(o[mt][2 * np + 1], pa[mt], bf + 2);
            }
          }
        }
      }
    }
    __syncthreads();
  }
  CpAsyncWait<0>();

  // Epilogue: row sums and counts over the quad, compensation, store.
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    l[r] += __shfl_xor_sync(kFull, l[r], 1);
    l[r] += __shfl_xor_sync(kFull, l[r], 2);
    nk[r] += __shfl_xor_sync(kFull, nk[r], 1);
    nk[r] += __shfl_xor_sync(kFull, nk[r], 2);
    nv[r] += __shfl_xor_sync(kFull, nv[r], 1);
    nv[r] += __shfl_xor_sync(kFull, nv[r], 2);
  }
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    if (!row_ok[r]) continue;
    const int mt = r >> 1, e2 = 2 * (r & 1);
    const int64_t i = w0 + 16 * mt + g + 8 * (r & 1);
    const int64_t row = (b * a.Hq + h) * a.Sq + i;
    if (mean) {
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      float* vb = a.vbar + row * D;
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        *reinterpret_cast<float2*>(vb + n * 8 + 2 * t) = make_float2(o[mt][n][e2] * inv, o[mt][n][e2 + 1] * inv);
      }
      continue;
    }
    const RowFinal f = FinishRow(a, l[r], m[r], theta[r], rho[r], nk[r], nv[r]);
    const float* vbar = f.dp_inv != 0.f ? a.vbar + row * D : nullptr;
    T* out = static_cast<T*>(a.out) + row * D;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      const int c = n * 8 + 2 * t;
      float x0 = o[mt][n][e2] * f.inv, x1 = o[mt][n][e2 + 1] * f.inv;
      if (vbar) {
        x0 = fmaf(f.dp_inv, vbar[c], x0);
        x1 = fmaf(f.dp_inv, vbar[c + 1], x1);
      }
      *reinterpret_cast<uint32_t*>(out + c) = Elem<T>::Pack(x0, x1);
    }
    if (a.kept && t == 0) a.kept[row] = nk[r];
  }
}

template <typename T, int D, bool MASK, int MT>
cudaError_t Run(const KernelArgs& a, cudaStream_t stream) {
  constexpr int smem = SmemBytes<T, D, MT>();
  static_assert(smem <= 227 * 1024, "shared memory");
  cudaError_t e = AllowSmem<PrefillKernel<T, D, MASK, MT>>(smem);
  if (e != cudaSuccess) return e;
  const int64_t ntq = (a.Sq + kBM - 1) / kBM;
  dim3 grid(static_cast<unsigned>(a.Hq), static_cast<unsigned>(ntq), static_cast<unsigned>(a.B));
  PrefillKernel<T, D, MASK, MT><<<grid, Threads<MT>(), smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int MT>
cudaError_t RunM(const KernelArgs& a, cudaStream_t stream) {
  const bool mask = a.mask_kind != 0;
  if (a.D == 64) return mask ? Run<T, 64, true, MT>(a, stream) : Run<T, 64, false, MT>(a, stream);
  return mask ? Run<T, 128, true, MT>(a, stream) : Run<T, 128, false, MT>(a, stream);
}

template <typename T>
cudaError_t RunT(const KernelArgs& a, cudaStream_t stream) {
  return a.prefill_mt == 2 ? RunM<T, 2>(a, stream) : RunM<T, 1>(a, stream);
}

}  // namespace

cudaError_t LaunchPrefill(const KernelArgs& a, cudaStream_t stream) {
  return a.dtype == 2 ? RunT<__nv_bfloat16>(a, stream) : RunT<__half>(a, stream);
}

}  // namespace cuda
}  // namespace toptheta

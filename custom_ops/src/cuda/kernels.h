// Host interface of the TopThetaAttention CUDA kernels (docs/op.md). Plain C++: included by the
// onnxruntime op (register_cuda.cc), the C entry point (c_api.cc) and the .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../params.h"

namespace toptheta {
namespace cuda {

// Which kernel family runs a call.
enum class Path : int {
  kGeneric = 0,  // any dtype / head dim: one block per query row, scalar fp32 (slow, exact semantics)
  kPrefill = 1,  // fp16/bf16, D = Dv in {64, 128}: flash-style tiles on tensor cores
  kDecode = 2,   // same types, (Hq/Hkv) * Sq <= 16: split-K over keys, V rows gathered only when kept
};

struct Plan {
  Path path = Path::kGeneric;
  int splits = 1;          // decode: key splits per (batch, kv head)
  int prefill_variant = -1; // prefill: 0 = 8 warps x 16 rows, 1 = 4 x 16, 2 = 4 x 32 (mma.sync kernels),
                            // 3 = Hopper wgmma kernel where it applies, -1 = default (3 on sm_90 where it
                            // applies, else 2); TOPTHETA_PREFILL_VARIANT overrides
  size_t workspace = 0;    // device scratch bytes Launch needs
};

// Everything a kernel reads, by value. Offsets are in elements.
struct KernelArgs {
  int64_t B, Hq, Hkv, Sq, Ktot, D, Dv, R;
  int64_t G;  // Hq / Hkv
  float scale;
  int causal, comp_mode, dtype, mask_kind;
  const void* q;
  const void* k;
  const void* v;
  const float* theta;
  const float* sdc;
  const void* mask;
  int64_t mask_sb, mask_sh, mask_sq;
  void* out;
  int32_t* kept;
  // V-mean pass (comp_mode 2): vbar [B*Hq*Sq, Dv] fp32. mean_pass = 1 while computing it.
  float* vbar;
  int mean_pass;
  // decode partials: per row and part, stats (m, l, n_kept, n_valid) and O [Dv] fp32.
  float4* part_stats;  // [B*Hq*Sq, parts]
  float* part_o;       // [B*Hq*Sq, parts, Dv]
  int parts;
  int splits;
  int prefill_variant;  // see Plan
};

// Chooses the kernel family and scratch size for p on `device` (TOPTHETA_CUDA_PATH=generic,
// TOPTHETA_DECODE_SPLITS=N and TOPTHETA_PREFILL_VARIANT=0|1|2|3 override, for tests and benchmarks).
Plan MakePlan(const AttnParams& p, int device);

// Enqueues the kernels of one call on `stream` (no host synchronisation). `workspace` must hold
// plan.workspace bytes (may be null when that is 0). Returns the first CUDA error.
cudaError_t Launch(const AttnParams& p, const Plan& plan, void* workspace, cudaStream_t stream);

// Kernel launchers (one .cu file each).
cudaError_t LaunchGeneric(const KernelArgs& a, cudaStream_t stream);
cudaError_t LaunchPrefill(const KernelArgs& a, cudaStream_t stream);
// Hopper prefill (prefill_sm90.cu, variant 3): whether this build has it and `device` is sm_90, and its
// launcher (MakePlan picks it for the calls it covers: see launch.cc).
bool PrefillSm90Available(int device);
cudaError_t LaunchPrefillSm90(const KernelArgs& a, cudaStream_t stream);
cudaError_t LaunchDecode(const KernelArgs& a, cudaStream_t stream);
cudaError_t LaunchDecodeCombine(const KernelArgs& a, cudaStream_t stream);
// Decode blocks that fit on one SM at once (head dim 64 or 128).
int DecodeBlocksPerSm(int D);

// Rows per decode block tile (query heads of one kv head times query tokens).
constexpr int kDecodeRows = 16;
constexpr int kDecodeWarps = 4;
constexpr int kDecodeSubKeys = 16;  // keys per warp step

}  // namespace cuda
}  // namespace toptheta

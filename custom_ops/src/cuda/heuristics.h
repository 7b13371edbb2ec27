// Which CUDA kernel runs a TopThetaAttention call, and the scratch it needs: pure functions of the call
// (AttnParams), the device (DeviceProps) and the overrides (KernelOptions, read once per kernel). No CUDA
// calls here, so the choice is the same wherever it is made. Design notes: docs/cuda-notes.md.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../params.h"

namespace toptheta {
namespace cuda {

// Which kernel family runs a call.
enum class Path : int {
  kGeneric = 0,  // any dtype / head dim: one block per query row, scalar fp32 (slow, exact semantics)
  kPrefill = 1,  // fp16/bf16, D = Dv in {64, 80, 96, 128, 256}: flash-style tiles on tensor cores
  kDecode = 2,   // same types, (Hq/Hkv) * Sq <= 16: split-K over keys, V rows gathered only when kept
};

// Prefill kernels: 0 = 8 warps x 16 rows, 1 = 4 x 16, 2 = 4 x 32 (mma.sync kernels), 3 = the Hopper wgmma
// kernel where it applies.
constexpr int kPrefillDefault = -1;  // 3 where the Hopper kernel applies, else 2

// Overrides of the kernel choice, for tests and benchmarks. The onnxruntime op reads them from the
// environment once, when the kernel is created; the C entry point takes them as an argument.
struct KernelOptions {
  int32_t force_generic = 0;                  // TOPTHETA_CUDA_PATH=generic: 1
  int32_t decode_splits = 0;                  // TOPTHETA_DECODE_SPLITS=N (> 0; 0 = heuristic)
  int32_t prefill_variant = kPrefillDefault;  // TOPTHETA_PREFILL_VARIANT=0|1|2|3
  int32_t decode_kstages = 0;                 // TOPTHETA_DECODE_KSTAGES=3|4 (0 = kDecodeKStagesDefault)
  int32_t no_shadow = 0;                      // TOPTHETA_SHADOW=0: 1 (ignore a shadow K that the call passes)
};

// The TOPTHETA_* environment variables above (unset or invalid: the default).
KernelOptions KernelOptionsFromEnv();

// What the heuristics need to know about the GPU (queried once per device by DevicePropsOf in launch.cc).
struct DeviceProps {
  int sm_count = 100;
  int decode_blocks_per_sm_d64 = 1;   // resident decode blocks per SM, head dim 64 (kDecodeKStagesDefault)
  int decode_blocks_per_sm_d128 = 1;  // and 128
  int decode_blocks_per_sm_d256 = 1;  // and 256 (3 K stages)
  bool prefill_sm90 = false;          // this build has the Hopper prefill kernel and the GPU is sm_90
};

struct Plan {
  Path path = Path::kGeneric;
  int32_t splits = 1;                         // decode: key splits per (batch, kv head), one partial each
  int32_t prefill_variant = kPrefillDefault;  // prefill: the kernel (above); kPrefillDefault: 2
  int32_t decode_kstages = 0;                 // decode: K tiles in flight + 1 (3 or 4)
  int32_t shadow = 0;                         // decode: 1 = scan the shadow K first, read K rows of candidates only
  size_t workspace = 0;                       // device scratch bytes Launch needs
};

// Byte offsets inside the workspace.
struct WorkspaceLayout {
  size_t vbar = 0;    // comp_mode 2: V mean [B*Hq*Sq, Dv] fp32
  size_t stats = 0;   // decode: (m, l, n_kept, n_valid) per row and split
  size_t part_o = 0;  // decode: O [B*Hq*Sq, splits, Dv] fp32
  size_t cand = 0;    // shadow: candidate keys, [B*Hkv, splits, kDecodeWarps, ShadowListCap] int32
  size_t cand_n = 0;  // shadow: their counts, [B*Hkv, splits, kDecodeWarps] int32
  size_t total = 0;
};

// The kernel family, decode split count, prefill kernel and workspace size of a call.
Plan MakePlan(const AttnParams& p, const DeviceProps& device, const KernelOptions& options);
WorkspaceLayout MakeLayout(const AttnParams& p, const Plan& plan);

// Head dims of the tensor-core kernels (mma.sync prefill and decode; the Hopper prefill kernel: 64 and 128 only).
// 80 and 96 (Phi-3, some GPT-NeoX) run the head dim 128 tiles with the channels past D zero-filled in shared
// memory: 25-60 % more tensor-core work and shared memory per row than needed, no more bytes read from memory.
// 32 (all-MiniLM-L6-v2, an encoder) runs the prefill kernel's head dim 64 tiles the same way, twice the work.
constexpr bool TensorCoreHeadDim(int64_t D) { return D == 32 || D == 64 || D == 80 || D == 96 || D == 128 || D == 256; }

// The head dim of the tiles that run a tensor-core head dim.
constexpr int64_t TileHeadDim(int64_t D) { return D == 32 ? 64 : (D == 80 || D == 96 ? 128 : D); }

// Head dims of the decode kernel: all but 32, whose few query rows (an encoder's are never few) run in the prefill
// kernel.
constexpr bool DecodeHeadDim(int64_t D) { return TensorCoreHeadDim(D) && D != 32; }

// Whether a head dim runs zero-padded tiles (TileHeadDim(D) > D).
constexpr bool PaddedHeadDim(int64_t D) { return TileHeadDim(D) != D; }

// Whether the call needs the V mean (comp_mode 2 with sdc).
inline bool NeedsVMean(const AttnParams& p) { return p.comp_mode == 2 && p.sdc != nullptr; }

// Whether a decode call can use its shadow K: the bound is for scores alone, so no additive mask (a bool mask only
// removes keys), no softcap (the bound is for uncapped scores), and no compensation (it counts every valid key,
// which the candidate lists do not hold).
inline bool ShadowCovers(const AttnParams& p) {
  return p.shadow_k != nullptr && p.shadow_range != nullptr && p.dtype != DType::kF32 && (p.D == 64 || p.D == 128) &&
         p.softcap == 0.f && (p.mask == nullptr || p.mask_kind == MaskKind::kNone || p.mask_kind == MaskKind::kBool) &&
         !(p.comp_mode >= 1 && p.sdc != nullptr);
}

// Rows per decode block tile (query heads of one kv head times query tokens).
constexpr int kDecodeRows = 16;
constexpr int kDecodeWarps = 4;
constexpr int kDecodeSubKeys = 16;  // keys per warp step
// K pipeline depth of the decode kernel: 4 stages keep 3 K tiles of a warp in flight (2 blocks of 4 warps fit an
// SM's shared memory at head dim 128 either way); 3 is the earlier design, kept as an override for comparison.
constexpr int kDecodeKStagesDefault = 4;

// Candidate slots per decode warp with a shadow K: a split covers ceil(blocks / splits) shadow blocks of
// kShadowBlock keys, and its warps take every kDecodeWarps-th of them.
inline int64_t ShadowListCap(int64_t kv_capacity, int64_t splits) {
  const int64_t blocks = (kv_capacity + kShadowBlock - 1) / kShadowBlock;
  const int64_t per_split = (blocks + splits - 1) / splits;
  return (per_split + kDecodeWarps - 1) / kDecodeWarps * kShadowBlock;
}

}  // namespace cuda
}  // namespace toptheta

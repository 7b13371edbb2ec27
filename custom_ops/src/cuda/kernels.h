// Host interface of the TopThetaAttention CUDA kernels (docs/op.md). Plain C++: included by the
// onnxruntime op (register_cuda.cc), the C entry point (c_api.cc) and the .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../params.h"
#include "heuristics.h"

namespace toptheta {
namespace cuda {

// Everything a kernel reads, by value: the call (AttnParams, as the op layer filled it), the plan, and
// what Launch derives for the device (scratch pointers, the pass).
struct KernelArgs {
  AttnParams p;
  Plan plan;
  int64_t G = 1;  // Hq / Hkv
  // V-mean pass (comp_mode 2): vbar [B*Hq*Sq, Dv] fp32. mean_pass = 1 while computing it.
  float* vbar = nullptr;
  int mean_pass = 0;
  // decode partials, one per row and split (plan.splits): stats (m, l, n_kept, n_valid) and O [Dv] fp32.
  float4* part_stats = nullptr;  // [B*Hq*Sq, splits]
  float* part_o = nullptr;       // [B*Hq*Sq, splits, Dv]
  // shadow K (plan.shadow): the scan's candidate keys and counts per (batch, kv head, split, warp).
  int32_t* cand = nullptr;
  int32_t* cand_n = nullptr;
  int32_t cand_cap = 0;  // ShadowListCap

  KernelArgs(const AttnParams& params, const Plan& plan_) : p(params), plan(plan_), G(params.Hq / params.Hkv) {
    if (p.mask == nullptr) p.mask_kind = MaskKind::kNone;  // the kernels branch on the kind only
  }
};

// The device's properties for MakePlan, queried once per device (host-side queries only, so that CUDA
// graph capture after the first call works).
const DeviceProps& DevicePropsOf(int device);

// Enqueues the kernels of one call on `stream` (no host synchronisation). `workspace` must hold
// plan.workspace bytes (may be null when that is 0). Returns the first CUDA error.
cudaError_t Launch(const AttnParams& p, const Plan& plan, void* workspace, cudaStream_t stream);

// Kernel launchers (one .cu file each).
cudaError_t LaunchGeneric(const KernelArgs& a, cudaStream_t stream);
cudaError_t LaunchPrefill(const KernelArgs& a, cudaStream_t stream);
// Hopper prefill (prefill_sm90.cu, variant 3): whether this build has it and `device` is sm_90, and its
// launcher (MakePlan picks it for the calls it covers: see heuristics.cc).
bool PrefillSm90Available(int device);
cudaError_t LaunchPrefillSm90(const KernelArgs& a, cudaStream_t stream);
cudaError_t LaunchDecode(const KernelArgs& a, cudaStream_t stream);
cudaError_t LaunchDecodeCombine(const KernelArgs& a, cudaStream_t stream);
// Shadow-K scan (plan.shadow, decode.cu): the candidate lists that DecodeKernel then reads instead of every key.
cudaError_t LaunchShadowScan(const KernelArgs& a, cudaStream_t stream);
// Shared-buffer form (append.cu): writes key / value [B, Hkv, Sk, *] to rows [P_b, P_b + Sk) of the
// [B, Hkv, kv_capacity, *] buffers k_buf / v_buf, P_b read on the device (KeyLen). Nothing without p.past_lens.
cudaError_t LaunchAppendKV(const AttnParams& p, void* k_buf, void* v_buf, const void* key, const void* value,
                           cudaStream_t stream);
// Shadow K of the shared form (shadow.cu): quantises the blocks of 64 keys the call completes (P_b read on the device)
// from the cache rows p.k into codes / range (docs/op.md, "Shadow K"). Nothing without p.past_lens.
cudaError_t LaunchShadowUpdate(const AttnParams& p, uint8_t* codes, void* range, cudaStream_t stream);
// Decode blocks that fit on one SM at once (head dim 64 or 128, 3 or 4 K stages).
int DecodeBlocksPerSm(int D, int kstages);

}  // namespace cuda
}  // namespace toptheta

// Device properties for the kernel choice, and the launch sequence of one TopThetaAttention call on CUDA.
#include <array>
#include <atomic>
#include <mutex>

#include "kernels.h"

namespace toptheta {
namespace cuda {

const DeviceProps& DevicePropsOf(int device) {
  static std::mutex mu;
  static std::array<DeviceProps, 64> props;
  static std::array<std::atomic<bool>, 64> known = {};
  const int d = device >= 0 && device < 64 ? device : 0;
  if (known[d].load(std::memory_order_acquire)) return props[d];
  std::lock_guard<std::mutex> lock(mu);
  if (!known[d].load(std::memory_order_relaxed)) {
    DeviceProps& p = props[d];
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && n > 0) {
      p.sm_count = n;
    } else {
      cudaGetLastError();
    }
    p.decode_blocks_per_sm_d64 = DecodeBlocksPerSm(64, kDecodeKStagesDefault);
    p.decode_blocks_per_sm_d128 = DecodeBlocksPerSm(128, kDecodeKStagesDefault);
    p.decode_blocks_per_sm_d256 = DecodeBlocksPerSm(256, 3);
    p.prefill_sm90 = PrefillSm90Available(device);
    known[d].store(true, std::memory_order_release);
  }
  return props[d];
}

cudaError_t Launch(const AttnParams& p, const Plan& plan, void* workspace, cudaStream_t stream) {
  if (p.B == 0 || p.Hq == 0 || p.Sq == 0) return cudaSuccess;
  KernelArgs a(p, plan);
  if (plan.path == Path::kGeneric) return LaunchGeneric(a, stream);

  const WorkspaceLayout l = MakeLayout(p, plan);
  char* ws = static_cast<char*>(workspace);
  a.vbar = NeedsVMean(p) ? reinterpret_cast<float*>(ws + l.vbar) : nullptr;
  if (plan.path == Path::kDecode) {
    a.part_stats = reinterpret_cast<float4*>(ws + l.stats);
    a.part_o = reinterpret_cast<float*>(ws + l.part_o);
    if (plan.shadow) {
      a.cand = reinterpret_cast<int32_t*>(ws + l.cand);
      a.cand_n = reinterpret_cast<int32_t*>(ws + l.cand_n);
      a.cand_cap = static_cast<int32_t>(ShadowListCap(p.kv_capacity, plan.splits));
    }
  }
  for (int pass = NeedsVMean(p) ? 1 : 0; pass >= 0; --pass) {
    a.mean_pass = pass;
    cudaError_t e;
    if (plan.path == Path::kPrefill) {
      e = LaunchPrefill(a, stream);
    } else {
      e = plan.shadow ? LaunchShadowScan(a, stream) : cudaSuccess;
      if (e == cudaSuccess) e = LaunchDecode(a, stream);
      if (e == cudaSuccess) e = LaunchDecodeCombine(a, stream);
    }
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace toptheta

// onnxruntime registration of ai.toptheta::TopThetaAttention (CPU op; CUDA op when built with CUDA).
// The library links no libonnxruntime: the API table comes in through RegisterCustomOps().
#include <cstring>
#include <mutex>
#include <vector>

#include "cpu_kernel.h"
#include "onnxruntime_cxx_api.h"
#include "op_common.h"
#include "op_shell.h"
#include "shadow.h"
#ifdef TOPTHETA_WITH_CUDA
#include "cuda/register_cuda.h"
#endif

namespace toptheta {
namespace {

void OrtParallelFor(void* runner, void (*fn)(void*, size_t), size_t total, void* data) {
  static_cast<const Ort::KernelContext*>(runner)->ParallelFor(fn, total, 0, data);
}

void RunCopies(const std::vector<Copy2D>& copies) {
  for (const Copy2D& c : copies) {
    for (size_t row = 0; row < c.height; ++row) {
      std::memcpy(static_cast<char*>(c.dst) + row * c.dst_pitch, static_cast<const char*>(c.src) + row * c.src_pitch,
                  c.width);
    }
  }
}

// The CPU execution provider's kernel (op shell: op_shell.h): [past ; new] K/V by memcpy (shared form: the new
// rows into the cache buffer at P_b; with a shadow K, its newly completed blocks), then TopThetaCpu on onnxruntime's
// intra-op thread pool.
struct CpuKernel {
  static constexpr const char* kExecutionProvider = "CPUExecutionProvider";

  explicit CpuKernel(const OrtKernelInfo*) {}

  void Compute(const Ort::KernelContext& ctx, PreparedCall& call) {
    CheckPastLengthsOnHost(call);  // before anything is written
    std::vector<char> scratch[2];
    for (int t = 0; t < 2; ++t) {
      if (!call.NeedsKV(t)) continue;
      void* dst = call.present[t];
      if (!dst) {
        scratch[t].resize(call.KVBytes(t));
        dst = scratch[t].data();
      }
      RunCopies(call.KVCopies(t, dst));
      RunCopies(call.AppendCopies(t, dst));
      call.SetKV(t, dst);
    }
    if (call.HasShadow()) {  // the blocks this call completes, from the K rows now in the cache
      RunCopies(call.ShadowCopies());
      UpdateShadowOnHost(call.params, static_cast<uint8_t*>(call.present_shadow[0]), call.present_shadow[1]);
    }
    TopThetaCpu(call.params, &OrtParallelFor, const_cast<void*>(static_cast<const void*>(&ctx)));
  }
};

// The domain lives as long as the process (sessions hold pointers to it and its ops).
Ort::CustomOpDomain& Domain() {
  static Ort::CustomOpDomain* domain = [] {
    auto* d = new Ort::CustomOpDomain(kDomain);
    AddOps<CpuKernel, DType::kF32, DType::kF16>(*d);
#ifdef TOPTHETA_WITH_CUDA
    toptheta::cuda::RegisterCudaOps(*d);
#endif
    return d;
  }();
  return *domain;
}

}  // namespace
}  // namespace toptheta

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    const OrtApi* v1 = api_base->GetApi(1);
    return v1 ? v1->CreateStatus(ORT_FAIL, "libtoptheta_ops needs onnxruntime >= 1.21: upgrade onnxruntime") : nullptr;
  }
  Ort::InitApi(api);
  return toptheta::StatusFrom([&] {
    static std::mutex mu;
    std::lock_guard<std::mutex> lock(mu);
    Ort::UnownedSessionOptions(options).Add(toptheta::Domain());
  });
}

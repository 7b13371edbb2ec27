// onnxruntime registration of ai.toptheta::TopThetaAttention (CPU op; CUDA op when built with CUDA).
// The library links no libonnxruntime: the API table comes in through RegisterCustomOps().
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "onnxruntime_cxx_api.h"
#include "op_common.h"
#include "cpu_kernel.h"
#ifdef TOPTHETA_WITH_CUDA
#include "cuda/register_cuda.h"
#endif

namespace toptheta {
namespace {

void OrtParallelFor(void* runner, void (*fn)(void*, size_t), size_t total, void* data) {
  static_cast<const Ort::KernelContext*>(runner)->ParallelFor(fn, total, 0, data);
}

struct CpuKernel {
  OpAttributes attrs;
  DType dtype;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return StatusFrom([&] {
      Ort::KernelContext ctx(context);
      PreparedCall call = PrepareCall(ctx, attrs, dtype);
      std::vector<char> scratch[2];
      for (int t = 0; t < 2; ++t) {
        if (!call.NeedsKV(t)) continue;
        void* dst = call.present[t];
        if (!dst) {
          scratch[t].resize(call.KVBytes(t));
          dst = scratch[t].data();
        }
        for (const Copy2D& c : call.KVCopies(t, dst)) {
          for (size_t row = 0; row < c.height; ++row) {
            std::memcpy(static_cast<char*>(c.dst) + row * c.dst_pitch,
                        static_cast<const char*>(c.src) + row * c.src_pitch, c.width);
          }
        }
        call.SetKV(t, dst);
      }
      TopThetaCpu(call.params, &OrtParallelFor, &ctx);
    });
  }
};

// One registration per T (float32, float16): typed inputs let onnxruntime pick the kernel and infer
// output types; attn_mask is type-agnostic (bool, T or float32).
template <DType DT>
struct CpuOp : Ort::CustomOpBase<CpuOp<DT>, CpuKernel, true> {
  CpuOp() {
    this->start_ver_ = kOpVersion;
    this->end_ver_ = kOpVersion;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return StatusFrom([&] { *kernel = new CpuKernel{ReadAttributes(info), DT}; });
  }

  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }

  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == kThresholds || i == kSdc) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    if (i == kMask) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    return OnnxType(DT);
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= kMask ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

  size_t GetOutputTypeCount() const { return kNumOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    return i == kKept ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : OnnxType(DT);
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i == kOut ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

// The domain and its ops live as long as the process (sessions hold pointers to them).
Ort::CustomOpDomain& Domain() {
  static CpuOp<DType::kF32> op_f32;
  static CpuOp<DType::kF16> op_f16;
  static Ort::CustomOpDomain* domain = [] {
    auto* d = new Ort::CustomOpDomain(kDomain);
    d->Add(&op_f32);
    d->Add(&op_f16);
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
    return v1 ? v1->CreateStatus(ORT_FAIL, "libtoptheta_ops needs onnxruntime >= 1.21: upgrade onnxruntime")
              : nullptr;
  }
  Ort::InitApi(api);
  return toptheta::StatusFrom([&] {
    static std::mutex mu;
    std::lock_guard<std::mutex> lock(mu);
    Ort::UnownedSessionOptions(options).Add(toptheta::Domain());
  });
}

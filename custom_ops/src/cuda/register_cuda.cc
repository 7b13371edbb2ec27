// onnxruntime CUDA-EP op of ai.toptheta::TopThetaAttention: parses the call with the shared op layer
// (op_common.h), fills the [past ; new] K/V buffers with async copies, and enqueues the kernels on the
// kernel context's compute stream. No host synchronisation; scratch comes from onnxruntime's CUDA
// allocator (or, where that is unavailable, a private stream-ordered memory pool).
#include "register_cuda.h"

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>

#include "../op_common.h"
#include "kernels.h"

namespace toptheta {
namespace cuda {
namespace {

void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("TopThetaAttention (CUDA): ") + what + " failed: " + cudaGetErrorString(e));
  }
}

size_t AlignUp(size_t n) { return (n + 255) / 256 * 256; }

// A stream-ordered pool that keeps its memory (fallback when onnxruntime's allocator is not reachable).
cudaMemPool_t FallbackPool(int device) {
  static std::mutex mu;
  static cudaMemPool_t pools[64] = {};
  std::lock_guard<std::mutex> lock(mu);
  const int d = device >= 0 && device < 64 ? device : 0;
  if (!pools[d]) {
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    Check(cudaMemPoolCreate(&pools[d], &props), "cudaMemPoolCreate");
    uint64_t keep = UINT64_MAX;
    Check(cudaMemPoolSetAttribute(pools[d], cudaMemPoolAttrReleaseThreshold, &keep), "cudaMemPoolSetAttribute");
  }
  return pools[d];
}

// Device scratch for one call, released (stream-ordered) when it goes out of scope.
class Scratch {
 public:
  Scratch(const Ort::KernelContext& ctx, int device, size_t bytes, cudaStream_t stream, std::atomic<bool>* use_ort)
      : stream_(stream) {
    if (bytes == 0) return;
    if (use_ort->load()) {
      try {
        Ort::MemoryInfo info("Cuda", OrtArenaAllocator, device, OrtMemTypeDefault);
        alloc_ = ctx.GetAllocator(*static_cast<const OrtMemoryInfo*>(info));
        if (alloc_) ptr_ = alloc_->Alloc(alloc_, bytes);
      } catch (const Ort::Exception&) {
        ptr_ = nullptr;
      }
      if (ptr_) return;
      Release();
      use_ort->store(false);
    }
    Check(cudaMallocFromPoolAsync(&ptr_, bytes, FallbackPool(device), stream), "cudaMallocFromPoolAsync");
  }
  ~Scratch() {
    if (ptr_ && alloc_) {
      alloc_->Free(alloc_, ptr_);
    } else if (ptr_) {
      cudaFreeAsync(ptr_, stream_);
    }
    Release();
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  char* data() const { return static_cast<char*>(ptr_); }

 private:
  void Release() {
    if (alloc_) Ort::GetApi().ReleaseAllocator(alloc_);
    alloc_ = nullptr;
  }
  cudaStream_t stream_;
  OrtAllocator* alloc_ = nullptr;
  void* ptr_ = nullptr;
};

struct CudaKernel {
  OpAttributes attrs;
  DType dtype;
  KernelOptions options = KernelOptionsFromEnv();  // TOPTHETA_* overrides, read once per kernel
  std::atomic<bool> use_ort_allocator{true};

  CudaKernel(OpAttributes a, DType t) : attrs(std::move(a)), dtype(t) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return StatusFrom([&] { Compute(context); });
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    PreparedCall call = PrepareCall(ctx, attrs, dtype);
    AttnParams& p = call.params;
    cudaStream_t stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
    const int device = ctx.GetInput(0).GetTensorMemoryInfo().GetDeviceId();
    const Plan plan = MakePlan(p, DevicePropsOf(device), options);

    // Scratch: concatenated K / V where no present output receives them, then the kernel workspace.
    size_t kv_off[2] = {0, 0}, total = 0;
    for (int t = 0; t < 2; ++t) {
      if (call.NeedsKV(t) && !call.present[t]) {
        kv_off[t] = total;
        total += AlignUp(call.KVBytes(t));
      }
    }
    const size_t ws_off = total;
    total += plan.workspace;
    Scratch scratch(ctx, device, total, stream, &use_ort_allocator);

    for (int t = 0; t < 2; ++t) {
      if (!call.NeedsKV(t)) continue;
      void* dst = call.present[t] ? call.present[t] : scratch.data() + kv_off[t];
      for (const Copy2D& c : call.KVCopies(t, dst)) {
        Check(cudaMemcpy2DAsync(c.dst, c.dst_pitch, c.src, c.src_pitch, c.width, c.height, cudaMemcpyDeviceToDevice,
                                stream),
              "K/V copy");
      }
      call.SetKV(t, dst);
    }
    Check(Launch(p, plan, plan.workspace ? scratch.data() + ws_off : nullptr, stream), "kernel launch");
  }
};

template <DType DT>
struct CudaOp : Ort::CustomOpBase<CudaOp<DT>, CudaKernel, true> {
  CudaOp() {
    this->start_ver_ = kOpVersion;
    this->end_ver_ = kOpVersion;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return StatusFrom([&] { *kernel = new CudaKernel(ReadAttributes(info), DT); });
  }

  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }

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

}  // namespace

void RegisterCudaOps(Ort::CustomOpDomain& domain) {
  static CudaOp<DType::kF32> op_f32;
  static CudaOp<DType::kF16> op_f16;
  static CudaOp<DType::kBF16> op_bf16;
  domain.Add(&op_f32);
  domain.Add(&op_f16);
  domain.Add(&op_bf16);
}

}  // namespace cuda
}  // namespace toptheta

// onnxruntime CUDA-EP kernel of ai.toptheta::TopThetaAttention (the op shell, shared with the CPU EP, is
// ../op_shell.h; it validates the call with op_common.h): fills the [past ; new] K/V buffers with async copies
// and enqueues the kernels on the kernel context's compute stream. No host synchronisation; scratch comes
// from onnxruntime's CUDA allocator (or, where that is unavailable, a private stream-ordered memory pool).
#include "register_cuda.h"

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>

#include "../op_common.h"
#include "../op_shell.h"
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

// The CUDA execution provider's kernel (op shell: ../op_shell.h).
class CudaKernel {
 public:
  static constexpr const char* kExecutionProvider = "CUDAExecutionProvider";

  // The TOPTHETA_* kernel-choice overrides are read here, once per node, not at each call.
  explicit CudaKernel(const OrtKernelInfo*) : options_(KernelOptionsFromEnv()) {}

  void Compute(const Ort::KernelContext& ctx, PreparedCall& call) {
    AttnParams& p = call.params;
    cudaStream_t stream = static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
    const int device = ctx.GetInput(0).GetTensorMemoryInfo().GetDeviceId();
    const Plan plan = MakePlan(p, DevicePropsOf(device), options_);

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
    Scratch scratch(ctx, device, total, stream, &use_ort_allocator_);

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
    // Shared form: the new rows into the buffer at P_b, which only the device reads (no host sync: the op stays
    // capturable in a CUDA graph, and a replay appends at the lengths of its own run).
    if (call.Shared()) {
      Check(LaunchAppendKV(p, call.present[0], call.present[1], call.fresh[0], call.fresh[1], stream), "K/V append");
    }
    // Shadow K: the blocks this call completes, from the appended cache, before the kernels that read them.
    if (call.HasShadow()) {
      for (const Copy2D& c : call.ShadowCopies()) {
        Check(cudaMemcpyAsync(c.dst, c.src, c.width, cudaMemcpyDeviceToDevice, stream), "shadow copy");
      }
      Check(LaunchShadowUpdate(p, static_cast<uint8_t*>(call.present_shadow[0]), call.present_shadow[1], stream),
            "shadow K update");
    }
    Check(Launch(p, plan, plan.workspace ? scratch.data() + ws_off : nullptr, stream), "kernel launch");
  }

 private:
  const KernelOptions options_;
  std::atomic<bool> use_ort_allocator_{true};
};

}  // namespace

void RegisterCudaOps(Ort::CustomOpDomain& domain) {
  AddOps<CudaKernel, DType::kF32, DType::kF16, DType::kBF16>(domain);
}

}  // namespace cuda
}  // namespace toptheta

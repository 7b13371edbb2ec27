// CUDA execution-provider registration of ai.toptheta::TopThetaAttention (built with TOPTHETA_WITH_CUDA).
#pragma once

#include "onnxruntime_cxx_api.h"

namespace toptheta {
namespace cuda {

// Adds the CUDA kernels (float32, float16, bfloat16) of TopThetaAttention to `domain`.
void RegisterCudaOps(Ort::CustomOpDomain& domain);

}  // namespace cuda
}  // namespace toptheta

// The onnxruntime custom op ai.toptheta::TopThetaAttention, written once for every execution provider: the
// schema (inputs, outputs, their types and optionality), attribute reading and input validation (PrepareCall)
// live here. An execution provider supplies only its kernel:
//
//   struct Kernel {
//     static constexpr const char* kExecutionProvider = "...ExecutionProvider";
//     explicit Kernel(const OrtKernelInfo* info);                 // per-node options, read once
//     void Compute(const Ort::KernelContext& ctx, PreparedCall& call);  // inputs checked, outputs allocated
//   };
//
// and registers TopThetaOp<Kernel, T> for each element type T it supports (AddOps).
#pragma once

#include <cstring>

#include "onnxruntime_cxx_api.h"
#include "op_common.h"

namespace toptheta {

// What onnxruntime creates per node: attributes read and checked once, then the EP's kernel.
template <typename Kernel>
class OpKernel {
 public:
  OpKernel(const OrtKernelInfo* info, DType dtype) : attrs_(ReadAttributes(info)), dtype_(dtype), kernel_(info) {}

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return StatusFrom([&] {
      Ort::KernelContext ctx(context);
      PreparedCall call = PrepareCall(ctx, attrs_, dtype_);
      kernel_.Compute(ctx, call);
    });
  }

 private:
  const OpAttributes attrs_;
  const DType dtype_;
  Kernel kernel_;
};

// The op schema of docs/op.md for element type DT on Kernel's execution provider. Typed inputs let
// onnxruntime pick the kernel and infer output types; attn_mask is type-agnostic (bool, T or float32).
template <typename Kernel, DType DT>
struct TopThetaOp : Ort::CustomOpBase<TopThetaOp<Kernel, DT>, OpKernel<Kernel>, true> {
  TopThetaOp() {
    this->start_ver_ = kOpVersion;
    this->end_ver_ = kOpVersion;
  }

  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return StatusFrom([&] { *kernel = new OpKernel<Kernel>(info, DT); });
  }

  const char* GetName() const { return kOpName; }
  const char* GetExecutionProviderType() const { return Kernel::kExecutionProvider; }

  size_t GetInputTypeCount() const { return kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    if (i == kThresholds || i == kSdc) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    // attn_mask: bool, T or float32; the shadow pair: checked in PrepareCall, so a wrong type gets its message
    if (i == kMask || i == kPastShadowKey || i == kPastShadowRange) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    if (i == kPastLens) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    return OnnxType(DT);
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= kMask ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

  size_t GetOutputTypeCount() const { return kNumOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t i) const {
    if (i == kKept) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    if (i == kPresentShadowKey) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    return OnnxType(DT);
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i == kOut ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

// The one instance of each op.
template <typename Kernel, DType DT>
TopThetaOp<Kernel, DT>& OpInstance() {
  static TopThetaOp<Kernel, DT> op;
  return op;
}

// Adds TopThetaOp<Kernel, T> for each T in DTs to `domain`. The ops live as long as the process (sessions
// hold pointers to them).
template <typename Kernel, DType... DTs>
void AddOps(Ort::CustomOpDomain& domain) {
  (domain.Add(&OpInstance<Kernel, DTs>()), ...);
}

}  // namespace toptheta

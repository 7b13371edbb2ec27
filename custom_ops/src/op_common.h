// Op-layer helpers shared by the CPU op (register.cc) and the CUDA op (cuda/): attribute reading,
// input validation, output allocation and the description of the past/new K/V concatenation.
// Nothing here touches tensor memory: it only reads shapes/types and takes data pointers, so the
// same code serves CPU and device tensors. Errors are thrown as toptheta::OpError (one line).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "onnxruntime_cxx_api.h"
#include "params.h"

namespace toptheta {

constexpr const char* kDomain = "ai.toptheta";
constexpr const char* kOpName = "TopThetaAttention";
constexpr int kOpVersion = 1;

enum Input : size_t {
  kQuery = 0,
  kKey,
  kValue,
  kThresholds,
  kMask,
  kPastKey,
  kPastValue,
  kSdc,
  kPastLens,         // past_sequence_length: the shared-buffer KV-cache form
  kPastShadowKey,    // shadow K codes (shared form, fp16/bf16): docs/op.md, "Shadow K"
  kPastShadowRange,  // its per-block (min, step)
  kNumInputs
};
enum Output : size_t {
  kOut = 0,
  kPresentKey,
  kPresentValue,
  kKept,
  kPresentShadowKey,
  kPresentShadowRange,
  kNumOutputs
};

// A user-facing error of one op call (bad shapes, types or attributes).
struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct OpAttributes {
  float scale = 0.f;  // 0: 1/sqrt(D)
  bool causal = false;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int comp_mode = 0;
  float softcap = 0.f;    // > 0: scores are softcap * tanh(score / softcap) (Gemma 2)
  std::string node_name;  // for error messages
};

// Reads the attributes of docs/op.md (defaults when absent); throws OpError on bad values.
OpAttributes ReadAttributes(const OrtKernelInfo* info);

// ONNX element type of T for a DType.
ONNXTensorElementDataType OnnxType(DType t);
size_t ElementBytes(DType t);

// One strided block copy: `height` rows of `width` bytes (cudaMemcpy2D-style pitches in bytes).
struct Copy2D {
  void* dst;
  size_t dst_pitch;
  const void* src;
  size_t src_pitch;
  size_t width;
  size_t height;
};

// Result of PrepareCall: the kernel parameters plus what the caller must still do for K/V.
//
// t = 0 is key, t = 1 is value. When NeedsKV(t) the kernel must read a [B, Hkv, kv_capacity, *] buffer:
// present[t] when that output was requested, else a scratch buffer of KVBytes(t) the caller allocates
// (in the op's memory space). The caller runs KVCopies(t, dst) (memcpy / cudaMemcpy2DAsync), in the
// shared form then appends the new rows at P_b (AppendCopies on the host; a device kernel on CUDA), and
// then SetKV(t, dst). Without NeedsKV(t), params already point at the `key` / `value` inputs (never in the
// packed layout: the kernels read K/V heads first).
//
// Shared form (params.past_lens set): past and present are the [B, Hkv, M, *] cache buffer, present is
// always requested, and KVCopies copies past into present only when they are different memory.
struct PreparedCall {
  AttnParams params;
  int64_t past_len = 0;   // rows of past_key: P (concat form) or M (shared form)
  int64_t new_len = 0;    // Sk
  size_t elem_bytes = 0;  // bytes of one T element
  const void* past[2] = {nullptr, nullptr};
  const void* fresh[2] = {nullptr, nullptr};
  void* present[2] = {nullptr, nullptr};
  // Shadow K (shared form only): s = 0 the codes, s = 1 the ranges; present is what the op writes (and what
  // params.shadow_k / shadow_range point at), past its input, copied into present first when other memory.
  const void* past_shadow[2] = {nullptr, nullptr};
  void* present_shadow[2] = {nullptr, nullptr};
  const std::string* node_name = nullptr;  // for errors raised after PrepareCall (owned by the kernel)

  bool Shared() const { return params.past_lens != nullptr; }
  bool NeedsKV(int t) const { return Shared() || params.packed || past[t] != nullptr || present[t] != nullptr; }
  size_t RowBytes(int t) const;  // D or Dv elements
  size_t KVBytes(int t) const;   // B * Hkv * kv_capacity rows
  // Concat form: the copies that fill dst ([B, Hkv, Ktot, *]) with [past ; new] per (batch, kv head).
  // Shared form: the copy of past into dst when they differ (nothing when the buffer is shared).
  std::vector<Copy2D> KVCopies(int t, void* dst) const;
  // Shared form, lengths readable on the host: the copies of the new rows to [P_b, P_b + Sk) of dst.
  std::vector<Copy2D> AppendCopies(int t, void* dst) const;
  void SetKV(int t, const void* buf);

  bool HasShadow() const { return present_shadow[0] != nullptr; }
  size_t ShadowBytes(int s) const;  // codes [B, Hkv, M, D/2] bytes; ranges [B, Hkv, ceil(M/64), 2, D] elements
  // The copy of past's shadow into present when they are different memory (nothing when shared, or no shadow).
  std::vector<Copy2D> ShadowCopies() const;
};

// Shared form on the host (CPU op): checks 0 <= P_b and P_b + Sk <= M for every batch row; throws OpError.
// (The CUDA op cannot read device memory here; its kernels clamp instead: params.h KeyLen.)
void CheckPastLengthsOnHost(const PreparedCall& call);

// Validates the inputs of one call against docs/op.md, allocates the requested outputs
// (`output` always; present_key/present_value/kept when the node has them) and fills the
// parameters. `dtype` is the T the calling kernel was registered for. Throws OpError.
PreparedCall PrepareCall(const Ort::KernelContext& ctx, const OpAttributes& attrs, DType dtype);

// Runs fn and turns exceptions into an OrtStatus (nullptr on success), for ComputeV2/CreateKernelV2.
template <typename Fn>
OrtStatus* StatusFrom(Fn&& fn) {
  try {
    fn();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const OpError& e) {
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  } catch (...) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, "TopThetaAttention: unknown error");
  }
}

}  // namespace toptheta

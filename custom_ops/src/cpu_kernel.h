// CPU kernel of TopThetaAttention (docs/op.md): fp32 accumulation, float32 / float16 tensors.
#pragma once

#include <cstddef>

#include "params.h"

namespace toptheta {

// Runs fn(data, i) for i in [0, total); onnxruntime's intra-op pool in the op, a plain loop in tests.
using ParallelForFn = void (*)(void* runner, void (*fn)(void*, size_t), size_t total, void* data);

// Computes p.out (and p.kept when non-null). K/V in p are the full [B, Hkv, Ktot, *] tensors.
// p.softcap > 0 caps every score s to softcap * tanh(s / softcap) before the mask is added (docs/op.md).
void TopThetaCpu(const AttnParams& p, ParallelForFn parallel_for, void* runner);

}  // namespace toptheta

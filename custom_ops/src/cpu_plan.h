// What the CPU kernel's ISA-specific translation units (cpu_kernel_avx2.cc, the scalar body in cpu_kernel.cc)
// share with the baseline code in cpu_kernel.cc. Kept free of standard-library inline code on purpose: the AVX2
// unit is compiled with -mavx2, and an inline function it instantiated could be picked by the linker for the
// baseline code too (and fault on a CPU without AVX2).
#pragma once

#include <cstddef>
#include <cstdint>

#include "params.h"

namespace toptheta {
namespace cpu {

constexpr int64_t kTileKeys = 64;  // the most keys per tile: one uint64_t of keep bits

// How TopThetaCpu cut the call into tasks. Task t = ((b * Hkv + g) * row_blocks + block) * splits + split.
// A task covers the query heads of kv head g (GQA group), `rows_per_block` rows of each and the keys of one
// split; splits > 1 only when there are too few (batch, group, row block) tasks for the threads (decode).
struct TaskPlan {
  const AttnParams* p = nullptr;
  int64_t group = 1;       // Hq / Hkv
  int64_t tile_keys = 64;  // <= kTileKeys, a multiple of 8
  int64_t rows_per_block = 1, row_blocks = 1;
  int64_t splits = 1, split_keys = 0;  // split_keys: a multiple of tile_keys
  float* partial = nullptr;            // splits > 1: [B*Hq*Sq, splits, kPartialHead + Dv]
  const int64_t* key_len = nullptr;    // [B]: KeyLen(p, b), the keys of each batch row
  size_t scratch_bytes = 0;            // per task, see ScratchLayout in cpu_kernel_body.h
  float softcap = 0.f;                 // > 0: scores capped to softcap * tanh(s / softcap) (docs/op.md)
};

// A row's online-softmax state after some keys: running max m (>= theta), denominator, counts, numerator.
struct RowState {
  float m, dk;
  int64_t n_valid, n_kept;
  const float* acc;  // [Dv]
};
constexpr int64_t kPartialHead = 4;  // m, dk, n_valid, n_kept (as floats: exact below 2^24 keys)

// Baseline helpers the ISA units call (defined in cpu_kernel.cc).
// Compensation, V mean (comp_mode 2), normalization and the store of output row i of head h, and kept.
void FinishRow(const AttnParams& p, int64_t b, int64_t h, int64_t i, const RowState& st);
// Address of the mask row (b, h, i) (rows with the same address have the same mask).
const void* MaskRowAddress(const AttnParams& p, int64_t b, int64_t h, int64_t i);
// Mask of keys [j0, j0 + n) of a mask row: returns the valid bits, add[] = additive values (0 if excluded).
// *has_add = false when every valid key adds 0 (bool masks).
uint64_t MaskTile(const AttnParams& p, const void* mask_row, int64_t j0, int64_t n, float* add, bool* has_add);
void HalfRowToFloat(const uint16_t* src, float* dst, int64_t n);

// One task of the plan; scratch holds plan.scratch_bytes (64-byte aligned).
void RunTaskScalar(const TaskPlan& plan, size_t task, unsigned char* scratch);
void RunTaskAvx2(const TaskPlan& plan, size_t task, unsigned char* scratch);
size_t ScratchBytes(const AttnParams& p, int64_t rows);

}  // namespace cpu
}  // namespace toptheta

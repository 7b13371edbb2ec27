// Kernel choice and workspace layout of one TopThetaAttention call on CUDA (pure: see heuristics.h),
// and the environment overrides.
#include "heuristics.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace toptheta {
namespace cuda {
namespace {

constexpr size_t kAlign = 256;

size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

int64_t Rows(const AttnParams& p) { return p.B * p.Hq * p.Sq; }

int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

// Decode split count: one wave of blocks (resident blocks per SM x SMs) over the (batch, kv head)
// pairs, at least 16 key steps (256 keys) per block; several waves only when the pairs alone fill one.
int DecodeSplits(const AttnParams& p, const DeviceProps& dev, const KernelOptions& opt) {
  const int64_t nsub = (p.Ktot + kDecodeSubKeys - 1) / kDecodeSubKeys;
  const int64_t pairs = std::max<int64_t>(1, p.B * p.Hkv);
  const int64_t tile_d = TileHeadDim(p.D);
  const int per_sm = tile_d == 64    ? dev.decode_blocks_per_sm_d64
                     : tile_d == 128 ? dev.decode_blocks_per_sm_d128
                                     : dev.decode_blocks_per_sm_d256;
  const int64_t slots = static_cast<int64_t>(dev.sm_count) * per_sm;
  int64_t s = std::max<int64_t>(1, slots / pairs);
  s = std::min(s, std::max<int64_t>(1, nsub / 16));
  if (opt.decode_splits > 0) s = std::min<int64_t>(opt.decode_splits, nsub);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(s, 65535)));
}

// Calls the Hopper prefill kernel covers: no mask or a [B, Ktot] bool key-padding mask (what a rewritten
// decoder passes), no `kept` output and no compensation (so neither kept counts nor the V mean are needed: the
// rewrite's default), fp16/bf16, D = Dv in {64, 128}, no softcap.
bool Sm90Covers(const AttnParams& p) {
  const bool key_padding = p.mask_kind == MaskKind::kBool && p.mask_sh == 0 && p.mask_sq == 0;
  return (p.mask == nullptr || key_padding) && p.kept == nullptr && (p.comp_mode == 0 || p.sdc == nullptr) &&
         p.dtype != DType::kF32 && p.D == p.Dv && (p.D == 64 || p.D == 128) && p.softcap == 0.f;
}

}  // namespace

KernelOptions KernelOptionsFromEnv() {
  KernelOptions o;
  const char* path = std::getenv("TOPTHETA_CUDA_PATH");
  o.force_generic = path && std::strcmp(path, "generic") == 0 ? 1 : 0;
  o.decode_splits = std::max(0, EnvInt("TOPTHETA_DECODE_SPLITS", 0));
  o.prefill_variant = EnvInt("TOPTHETA_PREFILL_VARIANT", kPrefillDefault);
  o.decode_kstages = EnvInt("TOPTHETA_DECODE_KSTAGES", 0);
  const char* shadow = std::getenv("TOPTHETA_SHADOW");
  o.no_shadow = shadow && std::strcmp(shadow, "0") == 0 ? 1 : 0;
  return o;
}

Plan MakePlan(const AttnParams& p, const DeviceProps& device, const KernelOptions& options) {
  Plan plan;
  const bool fast =
      p.dtype != DType::kF32 && p.D == p.Dv && TensorCoreHeadDim(p.D) && p.Ktot > 0 && !options.force_generic;
  if (fast) {
    plan.path = (p.Hq / p.Hkv) * p.Sq <= kDecodeRows && DecodeHeadDim(p.D) ? Path::kDecode : Path::kPrefill;
  }
  if (plan.path == Path::kDecode) {
    plan.splits = DecodeSplits(p, device, options);
    plan.decode_kstages =
        options.decode_kstages == 3 || options.decode_kstages == 4 ? options.decode_kstages : kDecodeKStagesDefault;
    // D = 256: 4 stages of 512-byte rows do not fit in shared memory; softcap: its kernels have 3 stages only;
    // padded head dims: the default stages only
    if (PaddedHeadDim(p.D)) plan.decode_kstages = kDecodeKStagesDefault;
    if (p.D == 256 || p.softcap > 0.f) plan.decode_kstages = 3;
    plan.shadow = ShadowCovers(p) && !options.no_shadow ? 1 : 0;
  }
  if (plan.path == Path::kPrefill) {
    int v = options.prefill_variant;
    if (v < -1 || v > 3) v = kPrefillDefault;
    // The Hopper kernel (3) by default where it applies; asked for where it does not, the default runs.
    const bool sm90 = (v == -1 || v == 3) && Sm90Covers(p) && device.prefill_sm90;
    plan.prefill_variant = sm90 ? 3 : (v == 3 ? kPrefillDefault : v);
    // 8 warps x 16 rows: the one kernel for D = 256 (Q in shared memory), for the padded head dims and for a softcap
    if (p.D == 256 || PaddedHeadDim(p.D) || p.softcap > 0.f) plan.prefill_variant = 0;
  }
  plan.workspace = MakeLayout(p, plan).total;
  return plan;
}

WorkspaceLayout MakeLayout(const AttnParams& p, const Plan& plan) {
  WorkspaceLayout l;
  size_t off = 0;
  if (plan.path != Path::kGeneric && NeedsVMean(p)) {
    l.vbar = off;
    off += AlignUp(static_cast<size_t>(Rows(p) * p.Dv) * sizeof(float));
  }
  if (plan.path == Path::kDecode) {
    const size_t parts = static_cast<size_t>(plan.splits);
    l.stats = off;
    off += AlignUp(static_cast<size_t>(Rows(p)) * parts * 16);
    l.part_o = off;
    off += AlignUp(static_cast<size_t>(Rows(p)) * parts * static_cast<size_t>(p.Dv) * sizeof(float));
    if (plan.shadow) {
      const size_t lists = static_cast<size_t>(p.B * p.Hkv) * parts * kDecodeWarps;
      l.cand = off;
      off += AlignUp(lists * static_cast<size_t>(ShadowListCap(p.kv_capacity, plan.splits)) * sizeof(int32_t));
      l.cand_n = off;
      off += AlignUp(lists * sizeof(int32_t));
    }
  }
  l.total = off;
  return l;
}

}  // namespace cuda
}  // namespace toptheta

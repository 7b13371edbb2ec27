// Kernel choice, scratch layout and launch sequence of one TopThetaAttention call on CUDA.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace toptheta {
namespace cuda {
namespace {

constexpr size_t kAlign = 256;
constexpr int kDefaultPrefillVariant = -1;  // per mask kind, see prefill.cu

size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

int SmCount(int device) {
  static std::atomic<int> cache[64];
  if (device < 0 || device >= 64) device = 0;
  int n = cache[device].load(std::memory_order_relaxed);
  if (n <= 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n <= 0) {
      cudaGetLastError();
      n = 100;
    }
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

bool ForceGeneric() {
  const char* v = std::getenv("TOPTHETA_CUDA_PATH");
  return v && std::strcmp(v, "generic") == 0;
}

bool NeedsVMean(const AttnParams& p) { return p.comp_mode == 2 && p.sdc != nullptr; }

int64_t Rows(const AttnParams& p) { return p.B * p.Hq * p.Sq; }

// Decode split count: one wave of blocks (resident blocks per SM x SMs) over the (batch, kv head)
// pairs, at least 16 key steps (256 keys) per block; several waves only when the pairs alone fill one.
int DecodeSplits(const AttnParams& p, int device) {
  const int64_t nsub = (p.Ktot + kDecodeSubKeys - 1) / kDecodeSubKeys;
  const int64_t pairs = std::max<int64_t>(1, p.B * p.Hkv);
  const int64_t slots = static_cast<int64_t>(SmCount(device)) * DecodeBlocksPerSm(static_cast<int>(p.D));
  int64_t s = std::max<int64_t>(1, slots / pairs);
  s = std::min(s, std::max<int64_t>(1, nsub / 16));
  const int env = EnvInt("TOPTHETA_DECODE_SPLITS", 0);
  if (env > 0) s = std::min<int64_t>(env, nsub);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(s, 65535)));
}

// Byte offsets inside the workspace.
struct Layout {
  size_t vbar = 0, stats = 0, part_o = 0, total = 0;
};

Layout MakeLayout(const AttnParams& p, const Plan& plan) {
  Layout l;
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
  }
  l.total = off;
  return l;
}

KernelArgs ArgsFrom(const AttnParams& p) {
  KernelArgs a;
  std::memset(&a, 0, sizeof(a));
  a.B = p.B;
  a.Hq = p.Hq;
  a.Hkv = p.Hkv;
  a.Sq = p.Sq;
  a.Ktot = p.Ktot;
  a.D = p.D;
  a.Dv = p.Dv;
  a.R = p.R;
  a.G = p.Hq / p.Hkv;
  a.scale = p.scale;
  a.causal = p.causal ? 1 : 0;
  a.comp_mode = p.comp_mode;
  a.dtype = static_cast<int>(p.dtype);
  a.mask_kind = p.mask ? static_cast<int>(p.mask_kind) : 0;
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.theta = p.theta;
  a.sdc = p.sdc;
  a.mask = p.mask;
  a.mask_sb = p.mask_sb;
  a.mask_sh = p.mask_sh;
  a.mask_sq = p.mask_sq;
  a.out = p.out;
  a.kept = p.kept;
  return a;
}

// Calls the Hopper prefill kernel covers: no mask or a [B, Ktot] bool key-padding mask (what a rewritten
// decoder passes), no `kept` output and no compensation (so neither kept counts nor the V mean are needed: the
// rewrite's default), fp16/bf16, D = Dv in {64, 128}.
bool Sm90Covers(const AttnParams& p) {
  const bool key_padding = p.mask_kind == MaskKind::kBool && p.mask_sh == 0 && p.mask_sq == 0;
  return (p.mask == nullptr || key_padding) && p.kept == nullptr && (p.comp_mode == 0 || p.sdc == nullptr) &&
         p.dtype != DType::kF32 && p.D == p.Dv && (p.D == 64 || p.D == 128);
}

}  // namespace

Plan MakePlan(const AttnParams& p, int device) {
  Plan plan;
  const bool fast = p.dtype != DType::kF32 && p.D == p.Dv && (p.D == 64 || p.D == 128) && p.Ktot > 0 &&
                    !ForceGeneric();
  if (fast) {
    plan.path = (p.Hq / p.Hkv) * p.Sq <= kDecodeRows ? Path::kDecode : Path::kPrefill;
  }
  if (plan.path == Path::kDecode) plan.splits = DecodeSplits(p, device);
  if (plan.path == Path::kPrefill) {
    int v = EnvInt("TOPTHETA_PREFILL_VARIANT", kDefaultPrefillVariant);
    if (v < -1 || v > 3) v = kDefaultPrefillVariant;
    // The Hopper kernel (3) by default where it applies; asked for where it does not, the default runs.
    const bool sm90 = (v == -1 || v == 3) && Sm90Covers(p) && PrefillSm90Available(device);
    plan.prefill_variant = sm90 ? 3 : (v == 3 ? kDefaultPrefillVariant : v);
  }
  plan.workspace = MakeLayout(p, plan).total;
  return plan;
}

cudaError_t Launch(const AttnParams& p, const Plan& plan, void* workspace, cudaStream_t stream) {
  if (p.B == 0 || p.Hq == 0 || p.Sq == 0) return cudaSuccess;
  KernelArgs a = ArgsFrom(p);
  if (plan.path == Path::kGeneric) return LaunchGeneric(a, stream);

  const Layout l = MakeLayout(p, plan);
  char* ws = static_cast<char*>(workspace);
  a.vbar = NeedsVMean(p) ? reinterpret_cast<float*>(ws + l.vbar) : nullptr;
  a.splits = plan.splits;
  a.prefill_variant = plan.prefill_variant;
  a.parts = plan.splits;  // one partial per decode block
  if (plan.path == Path::kDecode) {
    a.part_stats = reinterpret_cast<float4*>(ws + l.stats);
    a.part_o = reinterpret_cast<float*>(ws + l.part_o);
  }
  for (int pass = NeedsVMean(p) ? 1 : 0; pass >= 0; --pass) {
    a.mean_pass = pass;
    cudaError_t e;
    if (plan.path == Path::kPrefill) {
      e = LaunchPrefill(a, stream);
    } else {
      e = LaunchDecode(a, stream);
      if (e == cudaSuccess) e = LaunchDecodeCombine(a, stream);
    }
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace toptheta

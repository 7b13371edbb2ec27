// Attribute reading, input validation and output allocation for TopThetaAttention (docs/op.md).
#include "op_common.h"

#include <cmath>
#include <sstream>
#include <type_traits>

namespace toptheta {
namespace {

using Shape = std::vector<int64_t>;

std::string ShapeStr(const Shape& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

const char* TypeName(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    default: return "unsupported type";
  }
}

// Builds "TopThetaAttention node 'x': <msg>" errors.
class Checker {
 public:
  explicit Checker(const std::string& node) : prefix_(std::string(kOpName) + " node '" + node + "': ") {}

  [[noreturn]] void Fail(const std::string& msg) const { throw OpError(prefix_ + msg); }
  void Check(bool ok, const std::string& msg) const {
    if (!ok) Fail(msg);
  }

 private:
  std::string prefix_;
};

// Shape, type and data pointer of one (possibly absent) input.
struct InputInfo {
  bool present = false;
  Shape shape;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  const void* data = nullptr;
};

InputInfo GetInput(const Ort::KernelContext& ctx, size_t index) {
  InputInfo r;
  if (index >= ctx.GetInputCount()) return r;
  Ort::ConstValue v = ctx.GetInput(index);
  if (!v) return r;
  auto info = v.GetTensorTypeAndShapeInfo();
  r.present = true;
  r.shape = info.GetShape();
  r.type = info.GetElementType();
  r.data = v.GetTensorRawData();
  return r;
}

// Allocates output `index` when the node has it (*exists tells, where given) and returns its data.
void* AllocOutput(const Ort::KernelContext& ctx, size_t index, const Shape& shape, bool required,
                  bool* exists = nullptr) {
  if (exists) *exists = false;
  if (index >= ctx.GetOutputCount()) return nullptr;
  Ort::UnownedValue v = ctx.GetOutput(index, shape);
  if (!v) {
    if (required) throw OpError(std::string(kOpName) + ": could not allocate output " + std::to_string(index));
    return nullptr;
  }
  if (exists) *exists = true;
  return v.GetTensorMutableRawData();
}

void CheckRank(const Checker& c, const InputInfo& in, const char* name, size_t rank, const char* layout) {
  c.Check(in.shape.size() == rank, std::string(name) + " must be " + layout + ", got shape " + ShapeStr(in.shape));
}

void CheckType(const Checker& c, const InputInfo& in, const char* name, ONNXTensorElementDataType want) {
  c.Check(in.type == want, std::string(name) + " must be " + TypeName(want) + ", got " + TypeName(in.type));
}

// Fills the mask fields of p from input 4 (absent, [B, Ktot], or 4-D broadcastable to [B, Hq, Sq, Ktot]);
// `kname` names the key dimension in messages (M in the shared form, where Ktot is the capacity).
void ParseMask(const Checker& c, const InputInfo& m, DType dtype, AttnParams& p, const std::string& kname) {
  if (!m.present) return;
  if (m.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL) {
    p.mask_kind = MaskKind::kBool;
  } else if (m.type == OnnxType(dtype)) {
    p.mask_kind = MaskKind::kAdditive;
  } else if (m.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    p.mask_kind = MaskKind::kAdditiveF32;
  } else {
    c.Fail(std::string("attn_mask must be bool, float32 or the query type (") + TypeName(OnnxType(dtype)) + "), got " +
           TypeName(m.type));
  }
  const Shape& s = m.shape;
  const std::string want = "[B, " + kname + "] = [" + std::to_string(p.B) + ", " + std::to_string(p.Ktot) +
                           "] or 4-D broadcastable to [B, Hq, Sq, " + kname + "] = [" + std::to_string(p.B) + ", " +
                           std::to_string(p.Hq) + ", " + std::to_string(p.Sq) + ", " + std::to_string(p.Ktot) + "]";
  auto fits = [](int64_t d, int64_t full) { return d == full || d == 1; };
  if (s.size() == 2) {
    c.Check(fits(s[0], p.B) && s[1] == p.Ktot, "attn_mask shape " + ShapeStr(s) + " does not fit: expected " + want);
    p.mask_sb = s[0] == 1 ? 0 : p.Ktot;
    p.mask_sh = p.mask_sq = 0;
  } else if (s.size() == 4) {
    c.Check(fits(s[0], p.B) && fits(s[1], p.Hq) && fits(s[2], p.Sq) && s[3] == p.Ktot,
            "attn_mask shape " + ShapeStr(s) + " does not fit: expected " + want);
    p.mask_sq = s[2] == 1 ? 0 : s[3];
    p.mask_sh = s[1] == 1 ? 0 : s[2] * s[3];
    p.mask_sb = s[0] == 1 ? 0 : s[1] * s[2] * s[3];
  } else {
    c.Fail("attn_mask must be " + want + ", got rank-" + std::to_string(s.size()) + " shape " + ShapeStr(s));
  }
  p.mask = m.data;
}

// The shadow K pair, inputs 9 (codes) and 10 (ranges) (docs/op.md, "Shadow K"): both or neither, only in the shared
// form with fp16/bf16 K and D a multiple of 32 (the lane order), of the cache buffer's shape. Fills
// call.past_shadow; returns whether the call has a shadow (its outputs are allocated with the others).
bool CheckShadowInputs(const Checker& c, const InputInfo& codes, const InputInfo& range, size_t num_outputs,
                       PreparedCall& call) {
  const AttnParams& p = call.params;
  if (!codes.present && !range.present) {
    c.Check(num_outputs <= kPresentShadowKey,
            "present_shadow_key / present_shadow_range need the past_shadow_key and past_shadow_range inputs: add "
            "them (the same buffers) or drop those outputs");
    return false;
  }
  c.Check(codes.present && range.present, "past_shadow_key and past_shadow_range must be given together");
  c.Check(call.Shared(),
          "past_shadow_key / past_shadow_range (shadow K) need the shared KV buffer form: add past_sequence_length "
          "(input 8) with the cache buffers, or drop the shadow inputs");
  c.Check(p.dtype != DType::kF32,
          "past_shadow_key / past_shadow_range (shadow K) need float16 or bfloat16 keys, got float32: drop the "
          "shadow inputs");
  c.Check(p.D % 32 == 0,
          "past_shadow_key / past_shadow_range (shadow K) need a head size D that is a multiple of 32 "
          "(the codes' lane order), got D=" +
              std::to_string(p.D) + ": drop the shadow inputs");
  const int64_t M = p.kv_capacity, nb = (M + kShadowBlock - 1) / kShadowBlock;
  const Shape want_codes{p.B, p.Hkv, M, p.D / 2}, want_range{p.B, p.Hkv, nb, 2, p.D};
  CheckType(c, codes, "past_shadow_key", ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  c.Check(codes.shape == want_codes, "past_shadow_key must be uint8 [B, Hkv, M, D/2] = " + ShapeStr(want_codes) +
                                         ", got " + ShapeStr(codes.shape));
  CheckType(c, range, "past_shadow_range", OnnxType(p.dtype));
  c.Check(range.shape == want_range, std::string("past_shadow_range must be ") + TypeName(OnnxType(p.dtype)) +
                                         " [B, Hkv, ceil(M/64), 2, D] = " + ShapeStr(want_range) + ", got " +
                                         ShapeStr(range.shape));
  call.past_shadow[0] = codes.data;
  call.past_shadow[1] = range.data;
  return true;
}

// Reads an optional attribute through the C API (absent: keeps *out).
template <typename V>
void OptionalAttr(const OrtKernelInfo* info, const char* name, V* out) {
  const OrtApi& api = Ort::GetApi();
  OrtStatus* st;
  if constexpr (std::is_same_v<V, float>) {
    st = api.KernelInfoGetAttribute_float(info, name, out);
  } else {
    st = api.KernelInfoGetAttribute_int64(info, name, out);
  }
  if (st) api.ReleaseStatus(st);
}

}  // namespace

ONNXTensorElementDataType OnnxType(DType t) {
  switch (t) {
    case DType::kF16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    case DType::kBF16: return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
    default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
}

size_t ElementBytes(DType t) { return t == DType::kF32 ? 4 : 2; }

OpAttributes ReadAttributes(const OrtKernelInfo* info) {
  OpAttributes a;
  try {
    a.node_name = Ort::ConstKernelInfo(info).GetNodeName();
  } catch (const Ort::Exception&) {
  }
  Checker c(a.node_name);
  int64_t causal = 0, comp_mode = 0;
  OptionalAttr(info, "scale", &a.scale);
  OptionalAttr(info, "causal", &causal);
  OptionalAttr(info, "num_heads", &a.num_heads);
  OptionalAttr(info, "num_kv_heads", &a.num_kv_heads);
  OptionalAttr(info, "comp_mode", &comp_mode);
  OptionalAttr(info, "softcap", &a.softcap);
  c.Check(causal == 0 || causal == 1, "attribute causal must be 0 or 1, got " + std::to_string(causal));
  c.Check(comp_mode >= 0 && comp_mode <= 2,
          "attribute comp_mode must be 0 (none), 1 (SDC) or 2 (SDC + VMC), got " + std::to_string(comp_mode));
  c.Check(a.num_heads >= 0 && a.num_kv_heads >= 0, "attributes num_heads / num_kv_heads must be >= 0");
  c.Check(std::isfinite(a.scale), "attribute scale must be finite");
  c.Check(std::isfinite(a.softcap) && a.softcap >= 0.f,
          "attribute softcap must be 0 (none) or a finite positive cap, got " + std::to_string(a.softcap));
  a.causal = causal == 1;
  a.comp_mode = static_cast<int>(comp_mode);
  return a;
}

size_t PreparedCall::RowBytes(int t) const { return static_cast<size_t>(t == 0 ? params.D : params.Dv) * elem_bytes; }

size_t PreparedCall::KVBytes(int t) const {
  return static_cast<size_t>(params.B * params.Hkv * params.kv_capacity) * RowBytes(t);
}

std::vector<Copy2D> PreparedCall::KVCopies(int t, void* dst) const {
  std::vector<Copy2D> out;
  if (Shared()) {  // the whole buffer, unless present is past itself (the point of the shared form)
    const size_t bytes = KVBytes(t);
    if (past[t] && past[t] != dst && bytes > 0) out.push_back(Copy2D{dst, bytes, past[t], bytes, bytes, 1});
    return out;
  }
  const size_t row = RowBytes(t);
  const size_t height = static_cast<size_t>(params.B * params.Hkv);
  const size_t dpitch = static_cast<size_t>(params.Ktot) * row;
  char* d = static_cast<char*>(dst);
  auto add = [&](char* to, const void* from, int64_t rows) {
    if (rows <= 0 || height == 0 || row == 0) return;
    Copy2D cp{to, dpitch, from, static_cast<size_t>(rows) * row, static_cast<size_t>(rows) * row, height};
    if (cp.width == cp.dst_pitch) {  // contiguous: one flat copy
      cp.width *= height;
      cp.dst_pitch = cp.src_pitch = cp.width;
      cp.height = 1;
    }
    out.push_back(cp);
  };
  if (past[t]) add(d, past[t], past_len);
  if (!params.packed) {
    add(d + static_cast<size_t>(past_len) * row, fresh[t], new_len);
    return out;
  }
  // Packed new rows [B, Sk, Hkv, *]: one copy per (batch, kv head), Sk rows Hkv rows apart.
  if (new_len <= 0 || row == 0) return out;
  for (int64_t bg = 0; bg < params.B * params.Hkv; ++bg) {
    const int64_t b = bg / params.Hkv, g = bg % params.Hkv;
    const char* from = static_cast<const char*>(fresh[t]) + static_cast<size_t>(b * new_len * params.Hkv + g) * row;
    out.push_back(Copy2D{d + static_cast<size_t>(bg) * dpitch + static_cast<size_t>(past_len) * row, row, from,
                         static_cast<size_t>(params.Hkv) * row, row, static_cast<size_t>(new_len)});
  }
  return out;
}

std::vector<Copy2D> PreparedCall::AppendCopies(int t, void* dst) const {
  std::vector<Copy2D> out;
  const AttnParams& p = params;
  const size_t row = RowBytes(t);
  if (!Shared() || p.Sk == 0 || p.Hkv == 0 || row == 0) return out;
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t P = KeyLen(p, b) - p.Sk;  // checked by CheckPastLengthsOnHost on the CPU
    if (p.packed) {                         // [B, Sk, Hkv, *]: per kv head, Sk rows Hkv rows apart
      for (int64_t g = 0; g < p.Hkv; ++g) {
        char* to = static_cast<char*>(dst) + static_cast<size_t>((b * p.Hkv + g) * p.kv_capacity + P) * row;
        const char* from = static_cast<const char*>(fresh[t]) + static_cast<size_t>(b * p.Sk * p.Hkv + g) * row;
        out.push_back(Copy2D{to, row, from, static_cast<size_t>(p.Hkv) * row, row, static_cast<size_t>(p.Sk)});
      }
      continue;
    }
    char* to = static_cast<char*>(dst) + static_cast<size_t>(b * p.Hkv * p.kv_capacity + P) * row;
    const char* from = static_cast<const char*>(fresh[t]) + static_cast<size_t>(b * p.Hkv * p.Sk) * row;
    out.push_back(Copy2D{to, static_cast<size_t>(p.kv_capacity) * row, from, static_cast<size_t>(p.Sk) * row,
                         static_cast<size_t>(p.Sk) * row, static_cast<size_t>(p.Hkv)});
  }
  return out;
}

void CheckPastLengthsOnHost(const PreparedCall& call) {
  const AttnParams& p = call.params;
  if (!call.Shared()) return;
  const Checker c(call.node_name ? *call.node_name : std::string());
  const int64_t n = p.past_lens_sb == 0 ? 1 : p.B;
  for (int64_t b = 0; b < n; ++b) {
    const int64_t P = p.past_lens[b];
    c.Check(P >= 0 && P + p.Sk <= p.kv_capacity,
            "past_sequence_length[" + std::to_string(b) + "] = " + std::to_string(P) +
                " is out of range: need 0 <= P_b and P_b + Sk <= M (Sk=" + std::to_string(p.Sk) +
                ", M=" + std::to_string(p.kv_capacity) + "); pass the valid cache rows of each batch row");
  }
}

size_t PreparedCall::ShadowBytes(int s) const {
  const AttnParams& p = params;
  const size_t heads = static_cast<size_t>(p.B * p.Hkv);
  if (s == 0) return heads * static_cast<size_t>(p.kv_capacity * (p.D / 2));
  const int64_t nb = (p.kv_capacity + kShadowBlock - 1) / kShadowBlock;
  return heads * static_cast<size_t>(nb * 2 * p.D) * elem_bytes;
}

std::vector<Copy2D> PreparedCall::ShadowCopies() const {
  std::vector<Copy2D> out;
  for (int s = 0; s < 2; ++s) {
    const size_t bytes = ShadowBytes(s);
    if (past_shadow[s] && present_shadow[s] && past_shadow[s] != present_shadow[s] && bytes > 0) {
      out.push_back(Copy2D{present_shadow[s], bytes, past_shadow[s], bytes, bytes, 1});
    }
  }
  return out;
}

void PreparedCall::SetKV(int t, const void* buf) {
  if (t == 0) {
    params.k = buf;
  } else {
    params.v = buf;
  }
}

PreparedCall PrepareCall(const Ort::KernelContext& ctx, const OpAttributes& attrs, DType dtype) {
  const Checker c(attrs.node_name);
  const ONNXTensorElementDataType T = OnnxType(dtype);
  const InputInfo q = GetInput(ctx, kQuery), k = GetInput(ctx, kKey), v = GetInput(ctx, kValue);
  const InputInfo th = GetInput(ctx, kThresholds), mask = GetInput(ctx, kMask);
  const InputInfo pk = GetInput(ctx, kPastKey), pv = GetInput(ctx, kPastValue), sdc = GetInput(ctx, kSdc);
  const InputInfo lens = GetInput(ctx, kPastLens);
  const InputInfo shadow_codes = GetInput(ctx, kPastShadowKey), shadow_range = GetInput(ctx, kPastShadowRange);
  const bool shared = lens.present;
  c.Check(q.present && k.present && v.present && th.present, "query, key, value and thresholds are required");

  // Heads first ([B, H, S, *], rank 4) or packed ([B, S, H·*], rank 3, heads from the attributes): docs/op.md.
  const bool packed = q.shape.size() == 3;
  if (packed) {
    c.Check(attrs.num_heads > 0 && attrs.num_kv_heads > 0,
            "a packed query [B, Sq, Hq·D] (rank 3) needs the attributes num_heads and num_kv_heads: set them, or "
            "pass query as [B, Hq, Sq, D]");
    CheckRank(c, k, "key", 3, "[B, Sk, Hkv·D] when query is packed [B, Sq, Hq·D]");
    CheckRank(c, v, "value", 3, "[B, Sk, Hkv·Dv] when query is packed [B, Sq, Hq·D]");
  } else {
    CheckRank(c, q, "query", 4, "[B, Hq, Sq, D] (or packed [B, Sq, Hq·D])");
    CheckRank(c, k, "key", 4, "[B, Hkv, Sk, D]");
    CheckRank(c, v, "value", 4, "[B, Hkv, Sk, Dv]");
  }
  CheckType(c, q, "query", T);
  CheckType(c, k, "key", T);
  CheckType(c, v, "value", T);

  PreparedCall call;
  call.node_name = &attrs.node_name;
  AttnParams& p = call.params;
  p.dtype = dtype;
  p.packed = packed;
  call.elem_bytes = ElementBytes(dtype);
  p.B = q.shape[0];
  if (packed) {
    const int64_t hq = attrs.num_heads, hkv = attrs.num_kv_heads;
    c.Check(q.shape[2] % hq == 0 && k.shape[2] % hkv == 0 && v.shape[2] % hkv == 0,
            "packed query " + ShapeStr(q.shape) + ", key " + ShapeStr(k.shape) + " and value " + ShapeStr(v.shape) +
                " must split into num_heads=" + std::to_string(hq) + " / num_kv_heads=" + std::to_string(hkv) +
                " heads: fix the attributes");
    p.Sq = q.shape[1];
    p.Hq = hq;
    p.D = q.shape[2] / hq;
    p.Hkv = hkv;
    p.Dv = v.shape[2] / hkv;
    call.new_len = k.shape[1];
    c.Check(p.D > 0, "query " + ShapeStr(q.shape) + " must have D > 0");
    c.Check(k.shape[0] == p.B && k.shape[2] / hkv == p.D,
            "key shape " + ShapeStr(k.shape) + " does not match query " + ShapeStr(q.shape) + " (B and D must agree)");
    c.Check(v.shape[0] == p.B && v.shape[1] == call.new_len,
            "value shape " + ShapeStr(v.shape) + " does not match key " + ShapeStr(k.shape) + " in B, Sk");
  } else {
    p.Hq = q.shape[1];
    p.Sq = q.shape[2];
    p.D = q.shape[3];
    p.Hkv = k.shape[1];
    p.Dv = v.shape[3];
    call.new_len = k.shape[2];
    c.Check(p.D > 0 && p.Hq > 0, "query " + ShapeStr(q.shape) + " must have Hq > 0 and D > 0");
    c.Check(k.shape[0] == p.B && k.shape[3] == p.D,
            "key shape " + ShapeStr(k.shape) + " does not match query " + ShapeStr(q.shape) + " (B and D must agree)");
    c.Check(v.shape[0] == p.B && v.shape[1] == p.Hkv && v.shape[2] == call.new_len,
            "value shape " + ShapeStr(v.shape) + " does not match key " + ShapeStr(k.shape) + " in B, Hkv, Sk");
  }
  c.Check(p.Hkv > 0 && p.Hq % p.Hkv == 0, "query heads Hq=" + std::to_string(p.Hq) +
                                              " must be a multiple of key/value heads Hkv=" + std::to_string(p.Hkv));
  c.Check(attrs.num_heads == 0 || attrs.num_heads == p.Hq,
          "attribute num_heads=" + std::to_string(attrs.num_heads) +
              " disagrees with query heads Hq=" + std::to_string(p.Hq));
  c.Check(attrs.num_kv_heads == 0 || attrs.num_kv_heads == p.Hkv,
          "attribute num_kv_heads=" + std::to_string(attrs.num_kv_heads) +
              " disagrees with key/value heads Hkv=" + std::to_string(p.Hkv));

  // thresholds / sdc: float32 [Hq, R], R >= 1
  CheckType(c, th, "thresholds", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  c.Check(th.shape.size() == 2 && th.shape[0] == p.Hq && th.shape[1] >= 1,
          "thresholds must be float32 [Hq, R] = [" + std::to_string(p.Hq) + ", R>=1], got shape " + ShapeStr(th.shape));
  p.R = th.shape[1];
  p.theta = static_cast<const float*>(th.data);
  if (sdc.present) {
    CheckType(c, sdc, "sdc", ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    c.Check(sdc.shape == th.shape,
            "sdc shape " + ShapeStr(sdc.shape) + " must equal thresholds shape " + ShapeStr(th.shape));
    p.sdc = static_cast<const float*>(sdc.data);
  }

  // past key/value: the concatenated past (P rows), or in the shared form the cache buffer (M rows)
  c.Check(pk.present == pv.present, "past_key and past_value must be given together");
  if (shared) {
    c.Check(pk.present,
            "past_sequence_length (shared KV buffer form) needs past_key and past_value: pass the [B, Hkv, M, D] "
            "cache buffers");
    CheckType(c, lens, "past_sequence_length", ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32);
    c.Check(lens.shape.size() == 1 && (lens.shape[0] == p.B || lens.shape[0] == 1),
            "past_sequence_length must be int32 [B] = [" + std::to_string(p.B) + "] or [1], got shape " +
                ShapeStr(lens.shape));
  }
  const std::string rows = shared ? "M" : "P";
  if (pk.present) {
    CheckType(c, pk, "past_key", T);
    CheckType(c, pv, "past_value", T);
    c.Check(pk.shape.size() == 4 && pk.shape[0] == p.B && pk.shape[1] == p.Hkv && pk.shape[3] == p.D,
            "past_key must be [B, Hkv, " + rows + ", D] = [" + std::to_string(p.B) + ", " + std::to_string(p.Hkv) +
                ", " + rows + ", " + std::to_string(p.D) + "], got " + ShapeStr(pk.shape));
    call.past_len = pk.shape[2];
    c.Check(pv.shape.size() == 4 && pv.shape[0] == p.B && pv.shape[1] == p.Hkv && pv.shape[2] == call.past_len &&
                pv.shape[3] == p.Dv,
            "past_value must be [B, Hkv, " + rows + ", Dv] = [" + std::to_string(p.B) + ", " + std::to_string(p.Hkv) +
                ", " + std::to_string(call.past_len) + ", " + std::to_string(p.Dv) + "], got " + ShapeStr(pv.shape));
    if (call.past_len > 0) {
      call.past[0] = pk.data;
      call.past[1] = pv.data;
    }
  }
  p.Sk = call.new_len;
  if (shared) {
    p.past_lens = static_cast<const int32_t*>(lens.data);
    p.past_lens_sb = lens.shape[0] == 1 ? 0 : 1;
    p.Ktot = call.past_len;  // M: kernels size their grids with it and stop at KeyLen(p, b)
    c.Check(p.Sk <= p.Ktot, "key length Sk=" + std::to_string(p.Sk) + " exceeds the KV buffer capacity M=" +
                                std::to_string(p.Ktot) + ": allocate past_key/past_value with more rows");
    c.Check(p.Sq <= p.Sk, "query length Sq=" + std::to_string(p.Sq) + " exceeds the new key length Sk=" +
                              std::to_string(p.Sk) + " (shared KV buffer form: pass the keys of every query row)");
  } else {
    p.Ktot = call.past_len + call.new_len;
    c.Check(p.Sq <= p.Ktot, "query length Sq=" + std::to_string(p.Sq) + " exceeds key length Ktot=P+Sk=" +
                                std::to_string(p.Ktot) + " (rows are bottom-right aligned; pass past_key/past_value)");
  }
  p.kv_capacity = p.Ktot;
  // The kernels index keys and rows with 32-bit integers.
  c.Check(p.Ktot < (int64_t{1} << 31),
          "key length " + std::to_string(p.Ktot) + " must be below 2^31 (split the cache into several calls)");

  const bool shadow = CheckShadowInputs(c, shadow_codes, shadow_range, ctx.GetOutputCount(), call);

  ParseMask(c, mask, dtype, p, shared ? "M" : "Ktot");

  p.scale = attrs.scale != 0.f ? attrs.scale : 1.0f / std::sqrt(static_cast<float>(p.D));
  p.causal = attrs.causal;
  p.comp_mode = attrs.comp_mode;
  p.softcap = attrs.softcap;
  p.q = q.data;
  call.fresh[0] = k.data;
  call.fresh[1] = v.data;
  p.k = k.data;
  p.v = v.data;

  p.out = AllocOutput(ctx, kOut, packed ? Shape{p.B, p.Sq, p.Hq * p.Dv} : Shape{p.B, p.Hq, p.Sq, p.Dv}, true);
  bool has_present[2];
  call.present[0] = AllocOutput(ctx, kPresentKey, {p.B, p.Hkv, p.Ktot, p.D}, false, &has_present[0]);
  call.present[1] = AllocOutput(ctx, kPresentValue, {p.B, p.Hkv, p.Ktot, p.Dv}, false, &has_present[1]);
  c.Check(!shared || (has_present[0] && has_present[1]),
          "past_sequence_length (shared KV buffer form) needs the present_key and present_value outputs: add them "
          "to the node and bind them to the past_key/past_value buffers");
  p.kept = static_cast<int32_t*>(AllocOutput(ctx, kKept, {p.B, p.Hq, p.Sq}, false));
  if (shadow) {  // the kernels read the shadow the op maintains: present (past copied in when other memory)
    const int64_t nb = (p.kv_capacity + kShadowBlock - 1) / kShadowBlock;
    bool has[2];
    call.present_shadow[0] = AllocOutput(ctx, kPresentShadowKey, {p.B, p.Hkv, p.kv_capacity, p.D / 2}, false, &has[0]);
    call.present_shadow[1] = AllocOutput(ctx, kPresentShadowRange, {p.B, p.Hkv, nb, 2, p.D}, false, &has[1]);
    c.Check(has[0] && has[1],
            "past_shadow_key / past_shadow_range need the present_shadow_key and present_shadow_range outputs: add "
            "them to the node and bind them to the same buffers");
    p.shadow_k = static_cast<const uint8_t*>(call.present_shadow[0]);
    p.shadow_range = call.present_shadow[1];
  }
  return call;
}

}  // namespace toptheta

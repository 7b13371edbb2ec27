"""onnxruntime's fused kernels for the parts of a decoder layer outside attention (docs/graph.md, "Fusions").

``FuseForOrt`` rewrites, with onnxscript rewriter rules, what the export leaves as several small kernels per layer:

* ``RmsNormToSimplified``: ONNX ``RMSNormalization`` (opset 23) -> onnxruntime's ``SimplifiedLayerNormalization``
  (the same function; onnxruntime runs both with one kernel, but only the latter has a residual-add fusion), then
  onnxscript's ``SkipSimplifiedLayerNormalization`` fusion: ``Add(residual, x)`` + the next norm become one node
  that returns both the normalised value and the sum (``SimplifiedToRmsNorm`` turns a norm left without one back);
* rotary embedding: onnxscript's ``RotaryEmbedding`` fusion finds ``x·cos + rotate_half(x)·sin`` on
  ``[B, H, S, D]`` (Slice, Slice, Neg, Concat, Mul, Mul, Add: 7 nodes, 6 kernels per Q and per K) and
  ``RotaryCosSinCache`` turns it into ``com.microsoft.RotaryEmbedding(x, position_ids, cos_cache, sin_cache)``
  with the caches ``[max_positions, D/2]`` computed here from the graph's constant inverse frequencies, the way
  the export computes the angles (float32 ``position · inv_freq``), in either form transformers writes them:
  a broadcast ``Mul`` (transformers 5.2x) or, ``RotaryCosSinCacheMatMul``, ``Transpose(MatMul(Expand(inv_freq),
  positions))`` (earlier 5.x, e.g. 5.17). ``RotaryBeforeTranspose`` then applies it to ``[B, S, H·D]`` ahead of the
  Reshape/Transpose into heads, so that a consumer reading ``[B, S, H·D]`` (GroupQueryAttention) needs no
  Transpose at all.
* ``layout.PackAttentionLayout``: TopThetaAttention reads Q, K, V and writes its output packed, ``[B, S, H·D]``,
  so the four Transposes around it per layer go (docs/op.md, "Layouts").
* ``projections.ConcatProjections``: the Q/K/V GEMMs, which read one activation, become one GEMM and a ``Split``,
  as onnxruntime-genai's model builder packs them.

TopThetaAttention nodes keep their θ, cache and mask inputs, attributes (the head counts added) and count, checked
after the rewrite; their query and new key now come from ``RotaryEmbedding``, packed. The pass suits every graph of
the end-to-end bench alike (Top-θ, the dense export, the GroupQueryAttention twin). It changes float rounding only
(fused kernels, fp32 accumulation in the norm), not the function.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult
from onnx_ir.passes.common import InlinePass, RemoveUnusedNodesPass
from onnxscript.rewriter import pattern
from onnxscript.rewriter.pattern import MatchResult  # in a rule class, its own ``pattern`` method shadows the module

from .._errors import TopThetaError
from . import names
from .layout import PackAttentionLayout
from .projections import ConcatProjections
from .variants import op_nodes

__all__ = [
    "FUSIONS_META",
    "FUSION_MODES",
    "ROTARY_CACHE_PREFIX",
    "FuseForOrt",
    "RmsNormInputCast",
    "RmsNormToSimplified",
    "RotaryBeforeTranspose",
    "RotaryCosSinCache",
    "RotaryCosSinCacheMatMul",
    "SimplifiedToRmsNorm",
    "fused",
    "rotary_cache_rows",
    "rotary_caches",
]

FUSIONS_META = names.META_PREFIX + "fusions"
# metadata: rows of the rotary caches; onnxruntime reads row position_ids[b, s] unchecked, so a generator refuses
# to reach past them (ort.device_generation)
ROTARY_ROWS_META = names.META_PREFIX + "rotary_rows"
# rows past the model's maximum position: a buffer of a full context holds a token or two more (the e2e bench
# decodes at position = context)
ROTARY_MARGIN = 16
FUSION_MODES = ("auto", "on", "off")
ORT_DOMAIN = "com.microsoft"
_FUSION_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate RotaryEmbedding (a function until rewritten)
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
ROTARY_CACHE_PREFIX = names.META_PREFIX + "rotary."  # toptheta.rotary.{i}.{cos,sin}_cache initializers
_INV_FREQ_META = names.META_PREFIX + "rotary.{}.inv_freq"  # metadata: the float32 inverse frequencies of cache i


def rotary_caches(model: ir.Model) -> dict[str, np.ndarray]:
    """Cache initializer name -> the float32 inverse frequencies it was computed from (what a weight-less copy of
    the graph needs to compute the cache again: ``cos/sin(arange(rows) · inv_freq)``)."""
    out = {}
    for name in model.graph.initializers:
        if name.startswith(ROTARY_CACHE_PREFIX):
            index = name[len(ROTARY_CACHE_PREFIX) :].split(".")[0]
            text = model.metadata_props.get(_INV_FREQ_META.format(index))
            if text:
                out[name] = np.array([float(x) for x in text.split(",")], np.float32)
    return out


def rotary_cache_rows(max_positions: int) -> int:
    """Rows of the rotary caches for a model of ``max_positions`` positions (what ``FuseForOrt`` is given)."""
    return int(max_positions) + ROTARY_MARGIN


def fused(model: ir.Model) -> dict[str, int] | None:
    """The fusion counts recorded by ``FuseForOrt`` (None: the model was not fused)."""
    text = model.metadata_props.get(FUSIONS_META)
    if not text:
        return None
    return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}


class RmsNormInputCast(pattern.RewriteRuleClassBase):
    """``RMSNormalization(x, scale)`` with ``x`` in another float type than ``scale`` -> the same norm of
    ``Cast(x, to=scale's type)``: run by the dense export right after onnxscript's RMSNormalization fusion.

    That fusion takes ``x`` from before the norm's cast to float32, so a norm that scales in float32 and casts back
    afterwards (Gemma's ``x.float() · (1 + w.float())``, then ``type_as``) fuses into float16 ``x`` with a float32
    scale. The opset-23 schema allows the mix, but onnx's type inference gives Y the type of X (onnx.checker fails)
    and onnxruntime's function body multiplies by the scale in X's type (the session fails): the cast goes back in
    front. Exact, since the norm is computed in float32 (stash_type) either way.
    """

    def pattern(self, op, x, scale):
        return op.RMSNormalization(x, scale, _allow_other_attributes=True, _outputs=["normalized"])

    def check(self, context, x, scale, **_) -> MatchResult:
        result = MatchResult()
        if x.dtype not in _FLOAT_TYPES or scale.dtype not in _FLOAT_TYPES:
            return result.fail("the norm's input or scale is not a float tensor of known type", x)
        if x.dtype == scale.dtype:
            return result.fail("the norm's input and scale are of one type", x)
        return result

    def rewrite(self, op, x, scale, normalized, **_):
        attrs = normalized.producer().attributes
        cast = op.Cast(x, to=scale.dtype)
        cast.dtype, cast.shape = scale.dtype, x.shape  # typed, for the rules that check it (RmsNormToSimplified)
        return op.RMSNormalization(
            cast,
            scale,
            axis=attrs.get_int("axis", -1),
            epsilon=attrs.get_float("epsilon", 1e-5),
            stash_type=attrs.get_int("stash_type", int(ir.DataType.FLOAT)),
        )


class RmsNormToSimplified(pattern.RewriteRuleClassBase):
    """``RMSNormalization(x, scale)`` -> ``SimplifiedLayerNormalization(x, scale)`` (same axis, epsilon, stash)."""

    def pattern(self, op, x, scale):
        return op.RMSNormalization(x, scale, _allow_other_attributes=True, _outputs=["normalized"])

    def check(self, context, x, scale, normalized, **_) -> MatchResult:
        result = MatchResult()
        attrs = normalized.producer().attributes
        if attrs.get_int("stash_type", 1) != int(ir.DataType.FLOAT):
            return result.fail("the norm is computed in another type than float32", normalized)
        if x.dtype not in _FLOAT_TYPES or scale.dtype not in _FLOAT_TYPES:
            return result.fail("the norm's input or scale is not a float tensor", x)
        return result

    def rewrite(self, op, x, scale, normalized, **_):
        attrs = normalized.producer().attributes
        return op.SimplifiedLayerNormalization(
            x,
            scale,
            axis=attrs.get_int("axis", -1),
            epsilon=attrs.get_float("epsilon", 1e-5),
            stash_type=int(ir.DataType.FLOAT),
        )


class SimplifiedToRmsNorm(pattern.RewriteRuleClassBase):
    """A ``SimplifiedLayerNormalization`` no residual Add was fused into (the first layer's input norm) -> ONNX
    ``RMSNormalization`` again: the same kernel in onnxruntime, and a graph onnx.checker accepts (onnxruntime
    registers ``SimplifiedLayerNormalization`` in the ONNX domain, which ONNX does not know)."""

    def pattern(self, op, x, scale):
        return op.SimplifiedLayerNormalization(x, scale, _allow_other_attributes=True, _outputs=["normalized"])

    def rewrite(self, op, x, scale, normalized, **_):
        attrs = normalized.producer().attributes
        return op.RMSNormalization(
            x,
            scale,
            axis=attrs.get_int("axis", -1),
            epsilon=attrs.get_float("epsilon", 1e-5),
            stash_type=attrs.get_int("stash_type", int(ir.DataType.FLOAT)),
        )


class RotaryCosSinCache(pattern.RewriteRuleClassBase):
    """onnxscript's intermediate ``RotaryEmbedding(x, cos4, sin4)``, with ``cos4 = Unsqueeze(Cast?(Cos(emb)), 1)``,
    ``emb = Concat(f, f)``, ``f = Mul(Cast(Unsqueeze(position_ids, 2), float), inv_freq)`` -> the onnxruntime op
    on ``position_ids`` and constant ``[max_positions, D/2]`` caches (one pair per inv_freq, shared by the layers).
    """

    def __init__(self, name: str, *, cast: bool, max_positions: int, inv_freqs: dict[str, str]) -> None:
        super().__init__(name, remove_nodes=False)  # cos/sin feed every layer: the unused ones go afterwards
        self._cast = cast
        self.max_positions = int(max_positions)
        self._caches: dict[tuple[int, int], tuple[ir.Value, ir.Value]] = {}
        self.inv_freqs = inv_freqs  # metadata to record (shared by the rules of one pass)

    def cleanup(self) -> None:
        self._caches.clear()

    def pattern(self, op, x, position_ids, axis, inv_freq, unsq_axis, dtype, interleaved, num_heads):
        positions = op.Cast(op.Unsqueeze(position_ids, axis), to=ir.DataType.FLOAT)
        return self._rotary(op, x, op.Mul(positions, inv_freq), unsq_axis, dtype, interleaved, num_heads)

    def _rotary(self, op, x, freqs, unsq_axis, dtype, interleaved, num_heads):
        """The intermediate RotaryEmbedding on the cos/sin of the angles ``freqs`` [B, S, D/2] (both forms)."""
        emb = op.Concat(freqs, freqs, axis=-1)
        cos, sin = op.Cos(emb), op.Sin(emb)
        if self._cast:
            cos, sin = op.Cast(cos, to=dtype), op.Cast(sin, to=dtype)
        return op.RotaryEmbedding(
            x,
            op.Unsqueeze(cos, unsq_axis),
            op.Unsqueeze(sin, unsq_axis),
            interleaved=interleaved,
            num_heads=num_heads,
            _domain=_FUSION_DOMAIN,
        )

    def check(self, context, x, position_ids, axis, inv_freq, unsq_axis, interleaved, **_) -> MatchResult:
        result = MatchResult()
        if _ints(axis) not in ([2], [-1]) or _ints(unsq_axis) != [1]:
            return result.fail("the positions or the caches are unsqueezed on other axes", axis)
        if inv_freq.const_value is None or inv_freq.const_value.numpy().ndim != 1:
            return result.fail("the inverse frequencies are not a constant vector", inv_freq)
        return _check_rotated(result, x, position_ids, inv_freq.const_value.numpy().size, interleaved)

    def rewrite(self, op, x, position_ids, inv_freq, dtype=None, **_):
        target = ir.DataType(dtype.as_int()) if self._cast and dtype is not None else x.dtype
        key = (id(inv_freq), int(target))
        if key not in self._caches:
            freqs = np.asarray(inv_freq.const_value.numpy(), np.float32).reshape(-1)
            index = len(self.inv_freqs)
            self.inv_freqs[_INV_FREQ_META.format(index)] = ",".join(repr(float(f)) for f in freqs)
            cache = []
            for what, table in zip(("cos", "sin"), cos_sin_cache(freqs, self.max_positions)):
                name = f"{ROTARY_CACHE_PREFIX}{index}.{what}_cache"
                cache.append(op.initializer(ir.tensor(table.astype(target.numpy()), name=name), name=name))
            self._caches[key] = (cache[0], cache[1])
        cos_cache, sin_cache = self._caches[key]
        return op.RotaryEmbedding(x, position_ids, cos_cache, sin_cache, interleaved=0, _domain=ORT_DOMAIN)


class RotaryCosSinCacheMatMul(RotaryCosSinCache):
    """``RotaryCosSinCache`` for the angles as transformers' rotary module wrote them before 5.2x:
    ``Transpose(MatMul(Cast?(Expand(inv_freq [1, D/2, 1], [B, 1, 1])), Cast(Unsqueeze(position_ids, 1))))``."""

    def __init__(self, name: str, *, cast: bool, cast_freq: bool, max_positions: int, inv_freqs: dict[str, str]):
        super().__init__(name, cast=cast, max_positions=max_positions, inv_freqs=inv_freqs)
        self._cast_freq = cast_freq

    def pattern(self, op, x, position_ids, axis, inv_freq, expand_shape, unsq_axis, dtype, interleaved, num_heads):
        column = op.Expand(inv_freq, expand_shape)
        if self._cast_freq:
            column = op.Cast(column, to=ir.DataType.FLOAT)
        positions = op.Cast(op.Unsqueeze(position_ids, axis), to=ir.DataType.FLOAT)
        freqs = op.Transpose(op.MatMul(column, positions), perm=[0, 2, 1])
        return self._rotary(op, x, freqs, unsq_axis, dtype, interleaved, num_heads)

    def check(self, context, x, position_ids, axis, inv_freq, unsq_axis, interleaved, **_) -> MatchResult:
        result = MatchResult()
        if _ints(axis) != [1] or _ints(unsq_axis) != [1]:
            return result.fail("the positions or the caches are unsqueezed on other axes", axis)
        freqs = inv_freq.const_value
        if freqs is None or len(freqs.shape) != 3 or freqs.shape[0] != 1 or freqs.shape[2] != 1:
            return result.fail("the inverse frequencies are not a constant [1, D/2, 1] column", inv_freq)
        return _check_rotated(result, x, position_ids, int(freqs.shape[1]), interleaved)


def _check_rotated(result: MatchResult, x, position_ids, half: int, interleaved) -> MatchResult:
    """The checks both cos/sin-cache rules share: [B, S] positions, whole [B, H, S, 2·half] heads, not interleaved."""
    if position_ids.shape is None or len(position_ids.shape) != 2:
        return result.fail("position_ids is not [B, S]", position_ids)
    if x.shape is None or len(x.shape) != 4 or x.shape[3] != 2 * half:
        return result.fail(f"the rotated tensor is not [B, H, S, {2 * half}]", x)
    if interleaved.as_int() != 0:
        return result.fail("interleaved rotary", x)
    return result


class RotaryBeforeTranspose(pattern.RewriteRuleClassBase):
    """``RotaryEmbedding(Transpose(Reshape(x, [B, S, H, D]), [0, 2, 1, 3]), ...)`` -> the same rotary on ``x``
    ``[B, S, H·D]`` (onnxruntime's op takes both layouts), then the Reshape and Transpose: the layout change then
    sits next to the consumer's, and where that is the opposite Transpose (GroupQueryAttention reads ``[B, S, H·D]``)
    onnxruntime's optimizer cancels the pair."""

    def pattern(self, op, x, shape, position_ids, cos_cache, sin_cache):
        heads = op.Transpose(op.Reshape(x, shape, _outputs=["split_heads"]), perm=[0, 2, 1, 3])
        return op.RotaryEmbedding(
            heads, position_ids, cos_cache, sin_cache, _domain=ORT_DOMAIN, _allow_other_attributes=True
        )

    def check(self, context, x, split_heads, cos_cache, **_) -> MatchResult:
        result = MatchResult()
        xs, hs = x.shape, split_heads.shape
        if xs is None or len(xs) != 3 or hs is None or len(hs) != 4:
            return result.fail("not a [B, S, H·D] -> [B, S, H, D] reshape", x)
        if not isinstance(hs[2], int) or not isinstance(hs[3], int) or not isinstance(xs[2], int):
            return result.fail("the head count or size is not static", split_heads)
        if xs[2] != hs[2] * hs[3] or cos_cache.shape is None or cos_cache.shape[1] * 2 != hs[3]:
            return result.fail("the rotary does not span whole heads", x)
        return result

    def rewrite(self, op, x, shape, position_ids, cos_cache, sin_cache, split_heads, **_):
        rotated = op.RotaryEmbedding(
            x, position_ids, cos_cache, sin_cache, interleaved=0, num_heads=split_heads.shape[2], _domain=ORT_DOMAIN
        )
        return op.Transpose(op.Reshape(rotated, shape), perm=[0, 2, 1, 3])


def cos_sin_cache(inv_freq: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``cos``/``sin`` of ``position · inv_freq`` for positions ``0 .. rows - 1``, ``[rows, D/2]``; the angles
    in float32, as the exported graph computes them."""
    angles = np.arange(rows, dtype=np.float32)[:, None] * np.asarray(inv_freq, np.float32)[None, :]
    return np.cos(angles), np.sin(angles)


def _ints(value: ir.Value | None) -> list[int] | None:
    tensor = None if value is None else ir.convenience.get_const_tensor(value)
    return None if tensor is None else [int(v) for v in np.asarray(tensor.numpy()).reshape(-1)]


def _op_signature(model: ir.Model) -> list[tuple[Any, ...]]:
    """Every TopThetaAttention node as (layer, name, inputs 3.. by name, attributes but the head counts): what must
    survive (Q and the new K now come from RotaryEmbedding, all three packed ones from the projections)."""
    out = []
    for layer, node in op_nodes(model.graph):
        attrs = tuple(
            sorted((k, repr(a.value)) for k, a in node.attributes.items() if k not in ("num_heads", "num_kv_heads"))
        )
        out.append((layer, node.name, tuple(v.name if v is not None else None for v in node.inputs[3:]), attrs))
    return out


class FuseForOrt(InPlacePass):
    """The fusions of the module docstring; metadata ``toptheta.fusions`` records what each one matched.

    ``max_positions``: rows of the rotary caches (the model's maximum position; onnxruntime reads row
    ``position_ids[b, s]``, so every position the graph will see must be below it).
    """

    def __init__(self, max_positions: int) -> None:
        super().__init__()
        if max_positions < 1:
            raise TopThetaError(f"max_positions {max_positions} is not positive: pass the model's maximum position")
        self.max_positions = int(max_positions)

    def call(self, model: ir.Model) -> PassResult:
        from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_rotary_embedding
        from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

        done = fused(model)
        if done is not None:  # fused before; a concat-form graph given the shared cache since can pack now
            layout = PackAttentionLayout()
            if not layout(model).modified:
                return PassResult(model, False)
            done["packed_attention"] = done.get("packed_attention", 0) + layout.packed
            model.metadata_props[FUSIONS_META] = ",".join(f"{k}={v}" for k, v in done.items())
            return PassResult(model, True)
        before = _op_signature(model)
        counts = {"simplified_layer_norm": pattern.RewriteRuleSet([RmsNormToSimplified.rule()]).apply_to_model(model)}
        counts["skip_simplified_layer_norm"] = fuse_skip_rms_normalization(model)
        pattern.RewriteRuleSet([SimplifiedToRmsNorm.rule()]).apply_to_model(model)
        found = fuse_rotary_embedding(model)
        inv_freqs: dict[str, str] = {}
        rules = [
            RotaryCosSinCache.rule(
                f"RotaryCosSinCache{'_cast' if c else ''}",
                cast=c,
                max_positions=self.max_positions,
                inv_freqs=inv_freqs,
            )
            for c in (True, False)
        ] + [
            RotaryCosSinCacheMatMul.rule(
                f"RotaryCosSinCacheMatMul{'_cast' if c else ''}{'_castfreq' if cf else ''}",
                cast=c,
                cast_freq=cf,
                max_positions=self.max_positions,
                inv_freqs=inv_freqs,
            )
            for c in (True, False)
            for cf in (True, False)
        ]
        counts["rotary_embedding"] = pattern.RewriteRuleSet(rules).apply_to_model(model)
        counts["rotary_before_transpose"] = pattern.RewriteRuleSet([RotaryBeforeTranspose.rule()]).apply_to_model(model)
        layout = PackAttentionLayout()
        layout(model)
        counts["packed_attention"] = layout.packed
        projections = ConcatProjections()
        projections(model)
        counts["concat_projections"] = projections.groups
        model.metadata_props.update(inv_freqs)
        if counts["rotary_embedding"]:
            model.metadata_props[ROTARY_ROWS_META] = str(self.max_positions)
        if counts["rotary_embedding"] != found:  # a form the cache rule does not know: back to the plain nodes
            InlinePass()(model)
        model.functions.clear()
        model.opset_imports.pop(_FUSION_DOMAIN, None)
        RemoveUnusedNodesPass()(model)
        if any(counts.values()):
            model.opset_imports.setdefault(ORT_DOMAIN, 1)
        if _op_signature(model) != before:
            raise TopThetaError(
                "the fusions changed a TopThetaAttention node (a bug): keep the model unfused (fusions 'off')"
            )
        model.metadata_props[FUSIONS_META] = ",".join(f"{k}={v}" for k, v in counts.items())
        return PassResult(model, True)

"""Replace every ONNX ``Attention`` node of a dense export by ``ai.toptheta::TopThetaAttention``.

See docs/graph.md for what is matched and what the rewritten graph looks like, docs/op.md for the operator.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .._errors import TopThetaError
from . import exporter as _export
from . import names
from .exporter import write_onnx
from .layers import REEXPORT_FIX, attention_layers, attention_nodes, layer_of, name_for
from .names import DOMAIN, KEPT_PREFIX, MASK_NAME, META_PREFIX, OP_TYPE, OP_VERSION, SDC_PREFIX, THETA_PREFIX

__all__ = ["KEPT_PREFIX", "MASK_NAME", "SDC_PREFIX", "THETA_PREFIX", "layer_of", "load_onnx", "rewrite"]

_FIX = REEXPORT_FIX  # kept under its old name for callers


# -- loading -----------------------------------------------------------------------------------------


def load_onnx(path):
    """``onnx_ir.load`` with one-line TopThetaErrors for missing or corrupt files."""
    import onnx_ir as ir

    path = Path(path)
    if not path.is_file():
        raise TopThetaError(f"ONNX model {path} does not exist: export it first with 'topθ-export export'")
    try:
        return ir.load(path)
    except Exception as e:  # noqa: BLE001 - any parse failure becomes the one-line error
        raise TopThetaError(f"{path} is not a valid ONNX model: {_first_line(e)}; re-export it") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _load_thresholds(thresholds):
    from ..thresholds import Thresholds

    if isinstance(thresholds, Thresholds):
        return thresholds, "in-memory"
    return Thresholds.load(thresholds), str(thresholds)


# -- layers ------------------------------------------------------------------------------------------


def _check_layers(layers: dict[Any, tuple[int, str]], num_layers: int) -> None:
    found = sorted(layers.values())
    present = {layer for layer, _ in found}
    missing = [i for i in range(num_layers) if i not in present]
    extra = sorted(present - set(range(num_layers)))
    if not missing and not extra:
        return
    if missing:
        first_layer, first_name = found[0] if found else (0, "")
        what = ", ".join(
            f"layer {i}" + (f" ({n})" if (n := name_for(first_name, first_layer, i)) else "") for i in missing
        )
        raise TopThetaError(
            f"{what}: attention block not found in the exported graph ({len(found)} of {num_layers} layers "
            f"matched); {_FIX}, and check that the thresholds belong to this model"
        )
    raise TopThetaError(
        f"the exported graph has attention blocks for layers {extra} but the thresholds have only "
        f"{num_layers} layers: use thresholds calibrated for this model"
    )


# -- mask --------------------------------------------------------------------------------------------


def _graph_input(graph, name):
    return next((v for v in graph.inputs if v.name == name), None)


def _sliding_window(th_meta: dict, onnx_meta: dict) -> int | None:
    """The model's sliding window (0 = none) from the thresholds or the export metadata; None if unknown."""
    if "sliding_window" in th_meta:
        if th_meta.get("use_sliding_window") is False:
            return 0
        return int(th_meta["sliding_window"] or 0)
    v = onnx_meta.get(META_PREFIX + "sliding_window")
    return None if v in (None, "") else int(v or 0)


def _mask_plan(graph, th_meta: dict, onnx_meta: dict):
    """The rules' MaskPlan, decided once for the whole graph: every layer shares one bool key-padding mask
    cast from the 2-D ``attention_mask`` input when causality is known and there is no sliding window;
    otherwise every layer keeps its exported mask."""
    from .rules import MaskPlan

    am = _graph_input(graph, names.ATTENTION_MASK)
    causal = _is_causal(th_meta, onnx_meta)
    if am is None or am.shape is None or len(am.shape) != 2:
        return MaskPlan(causal=bool(causal))
    if causal is None or (causal and _sliding_window(th_meta, onnx_meta) != 0):
        return MaskPlan(causal=bool(causal))
    return MaskPlan.key_padding(graph, am, causal)


def _is_causal(th_meta: dict, onnx_meta: dict) -> bool | None:
    """Causality from the thresholds and the export metadata (they must agree); None if neither says."""
    mine = th_meta.get("causal")
    theirs = onnx_meta.get(META_PREFIX + "causal")
    mine = None if mine is None else bool(mine)
    theirs = None if theirs in (None, "") else bool(int(theirs))
    if mine is not None and theirs is not None and mine != theirs:
        raise TopThetaError(
            f"the thresholds are for a {'causal' if mine else 'bidirectional'} model but the ONNX "
            f"graph is {'causal' if theirs else 'bidirectional'}: use thresholds calibrated for "
            "this model"
        )
    return mine if mine is not None else theirs


# -- the pass ----------------------------------------------------------------------------------------


def rewrite(
    onnx_in,
    thresholds,
    onnx_out,
    *,
    comp_mode: int = 0,
    expose_kept: bool = False,
    kv_cache: str = "concat",
    theta_extrapolation: str = "last-row",
    max_context: int | None = None,
    fusions: str = "off",
    shadow_k: bool = False,
) -> dict[str, Any]:
    """Rewrite ``onnx_in`` (a dense export) into ``onnx_out`` with one TopThetaAttention per layer.

    ``thresholds``: a ``Thresholds`` or its path. Returns a report dict (per-layer matching details).
    The matching itself is the rule set of ``topthetaexport.onnx.rules`` (docs/graph.md). ``kv_cache``:
    ``concat`` (the graph concatenates past and new K/V, as exported) or ``shared`` (``ShareKvBuffer``: one
    preallocated buffer per layer and kind, bound as past and present).
    ``theta_extrapolation`` "fit": θ materialised up to ``max_context`` rows (default: the model's maximum
    position, from the calibration metadata) with the per-head log fit of ``Thresholds.extended``;
    "last-row": the calibrated rows only, the operator reuses the last one past them (docs/op.md).
    ``fusions`` "on": onnxruntime's fused kernels outside attention (``onnx.fusions.FuseForOrt``: skip + RMS norm,
    rotary with cos/sin caches of ``max_context`` or the model's maximum position); "off": as matched. Graphs made
    elsewhere are written with their own nodes either way. ``shadow_k`` (shared form, float16/bfloat16): the 4-bit
    shadow K pair per layer (``kv_cache.AddShadowK``; docs/op.md, "Shadow K"), which the CUDA decode kernel reads.
    """
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from .kv_cache import ShareKvBuffer, kv_cache_form
    from .rules import RuleContext, attention_rules, unsupported_reason

    if comp_mode not in (0, 1, 2):
        raise TopThetaError(f"comp_mode must be 0 (none), 1 (SDC) or 2 (SDC + V-mean), got {comp_mode}")
    if kv_cache not in names.KV_CACHE_FORMS:
        raise TopThetaError(f"unknown KV-cache form {kv_cache!r} (--kv-cache): use concat or shared")
    if fusions not in ("on", "off"):
        raise TopThetaError(f"unknown fusions mode {fusions!r} (--fusions): use on or off")
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    if onnx_out.suffix != ".onnx" or onnx_out.is_dir():
        raise TopThetaError(f"output path {onnx_out} must be a file ending in .onnx: pass e.g. model.onnx")
    th, th_source = _load_thresholds(thresholds)
    th.check_values()  # in-memory thresholds can have been edited after they were built
    th = extend_for_context(th, theta_extrapolation, max_context)
    model = load_onnx(onnx_in)
    graph = model.graph
    onnx_meta = dict(model.metadata_props)
    if any(n.op_type == OP_TYPE and n.domain == DOMAIN for n in graph):
        raise TopThetaError(f"{onnx_in} already contains TopThetaAttention nodes: rewrite the dense export instead")
    if not attention_nodes(graph):
        from .foreign_rules import foreign_sites

        if foreign_sites(graph):  # a graph made elsewhere (optimum, onnxruntime-genai): docs/graph.md
            if shadow_k:
                raise TopThetaError(
                    f"{onnx_in} is a graph made elsewhere, whose inputs and outputs stay as exported: --shadow-k adds "
                    "cache inputs, so it takes graphs of topthetaexport's export only"
                )
            return _rewrite_foreign(model, th, th_source, onnx_in, onnx_out, comp_mode, expose_kept, kv_cache)
    if shadow_k and kv_cache != "shared":
        raise TopThetaError(
            "the shadow K (--shadow-k) lives in the shared-buffer KV cache: add --kv-cache shared, or drop --shadow-k"
        )
    if kv_cache == "shared" and kv_cache_form(graph) is None:
        raise TopThetaError(
            f"{onnx_in} has no KV cache (no past_key_values.* inputs), so there is no buffer to share: "
            "use kv_cache='concat' (--kv-cache concat), or export the decoder with the cache"
        )

    layers = attention_layers(graph)
    for node, (layer, name) in sorted(layers.items(), key=lambda item: item[1]):
        why = unsupported_reason(node)
        if why:
            raise TopThetaError(
                f"layer {layer} ({name}): the attention node cannot be replaced because {why}; "
                "this model's attention is not supported by TopThetaAttention"
            )
    _check_layers(layers, th.num_layers)
    context = RuleContext(th, layers, comp_mode=comp_mode, mask_plan=_mask_plan(graph, th.meta, onnx_meta))
    attention_rules(context).apply_to_model(model)
    for node in attention_nodes(graph):
        layer, name = layers[node]
        raise TopThetaError(
            f"layer {layer} ({name}): no rewrite rule accepts the attention node "
            f"({context.why_not(node)}); this model's attention is not supported by "
            "TopThetaAttention"
        )
    if expose_kept:
        from .variants import ExposeKept

        ExposeKept()(model)
    RemoveUnusedNodesPass()(model)
    if kv_cache == "shared":
        ShareKvBuffer()(model)  # after the dead-node pass: the 4-D mask subgraph no longer reads the cache
    if fusions == "on":
        from .fusions import FuseForOrt, rotary_cache_rows

        rows = max_context or th.meta.get("max_positions")
        if not rows:
            raise TopThetaError(
                "the fusions need the model's maximum position for the rotary caches: pass --max-context N "
                "(these thresholds do not record it), or --fusions off"
            )
        FuseForOrt(rotary_cache_rows(rows))(model)
    if shadow_k:  # after the fusions, which edit the op's first inputs and outputs only
        from .kv_cache import AddShadowK

        AddShadowK()(model)
    model.opset_imports[DOMAIN] = OP_VERSION
    model.metadata_props.update(_metadata(th, th_source, comp_mode))
    form = kv_cache_form(graph)
    if form is not None:
        model.metadata_props[names.KV_CACHE_META] = form
    external = _initializer_bytes(graph) > _export.EXTERNAL_DATA_THRESHOLD
    if not external:
        ir.external_data.load_to_model(model)
    write_onnx(model, onnx_out, external)
    matched = [context.matched[layer] for layer in sorted(context.matched)]
    report = _report(matched, th, comp_mode, expose_kept, onnx_in, onnx_out, th_source) | {"kv_cache": form}
    return report | ({"shadow_k": True} if shadow_k else {})


def _rewrite_foreign(model, th, th_source, onnx_in, onnx_out, comp_mode, expose_kept, kv_cache) -> dict[str, Any]:
    """``rewrite`` of a graph made elsewhere (``foreign_rules``): its inputs and outputs are kept as they are."""
    import onnx
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

    from .foreign_rules import foreign_layers, foreign_rules
    from .rules import RuleContext

    graph = model.graph
    ShapeInferencePass(strict_mode=False)(model)  # head counts: exporters store no intermediate shapes
    layers = foreign_layers(graph, th)
    if kv_cache == "shared" and not all(n.op_type == "GroupQueryAttention" for n in layers):
        raise TopThetaError(
            f"{onnx_in}: --kv-cache shared maps only GroupQueryAttention's KV buffer; this graph's inputs and "
            "outputs stay as exported: use --kv-cache concat"
        )
    context = RuleContext(th, layers, comp_mode=comp_mode)
    foreign_rules(context, kv_cache=kv_cache).apply_to_model(model)
    for node, (layer, name) in sorted(layers.items(), key=lambda item: item[1]):
        if layer not in context.matched:
            raise TopThetaError(
                f"layer {layer} ({name}): no rewrite rule accepts the attention block ({context.why_not(node)}); "
                "this graph's attention form is not supported (docs/graph.md, 'Graphs made elsewhere')"
            )
    if expose_kept:
        from .variants import ExposeKept

        ExposeKept()(model)
    RemoveUnusedNodesPass()(model)
    model.opset_imports[DOMAIN] = OP_VERSION
    model.metadata_props.update(_metadata(th, th_source, comp_mode))
    model.metadata_props[META_PREFIX + "foreign_forms"] = ",".join(
        sorted({context.matched[i].form for i in context.matched})
    )
    model.metadata_props[names.KV_CACHE_META] = kv_cache
    external = _initializer_bytes(graph) > _export.EXTERNAL_DATA_THRESHOLD
    if not external:
        ir.external_data.load_to_model(model)
    # onnxruntime-only ops (com.microsoft, SimplifiedLayerNormalization in the default domain) fail onnx.checker;
    # the onnxruntime session is their check
    runtime_only = any(
        n.domain == "com.microsoft" or (n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)) for n in graph
    )
    write_onnx(model, onnx_out, external, check=not runtime_only)
    matched = [context.matched[layer] for layer in sorted(context.matched)]
    return _report(matched, th, comp_mode, expose_kept, onnx_in, onnx_out, th_source) | {"kv_cache": kv_cache}


def extend_for_context(th, theta_extrapolation: str, max_context: int | None):
    """``th`` materialised for deployment (see ``rewrite``); unchanged when already long enough."""
    if theta_extrapolation not in ("fit", "last-row"):
        raise TopThetaError(f"unknown --theta-extrapolation '{theta_extrapolation}': use fit or last-row")
    if theta_extrapolation == "last-row" and not max_context:
        return th
    rows = max_context or th.meta.get("max_positions")
    if not rows:
        raise TopThetaError(
            "θ extrapolation 'fit' needs the deployment length: pass --max-context N (these thresholds do not "
            "record the model's maximum position)"
        )
    if th.meta.get("theta_extrapolation") and th.num_rows >= int(rows):
        return th  # extended before (e.g. by the pipeline, which saves the thresholds it deploys)
    return th.extended(max(int(rows), th.num_rows), theta_extrapolation)


def _initializer_bytes(graph) -> int:
    return sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)


def _metadata(th, source: str, comp_mode: int) -> dict[str, str]:
    from .. import __version__

    return {
        META_PREFIX + "version": __version__,
        META_PREFIX + "k": str(th.meta.get("k", "")),
        META_PREFIX + "comp_mode": str(comp_mode),
        META_PREFIX + "thresholds_source": source,
        META_PREFIX + "calib_source": str(th.meta.get("calib_source", "")),
        META_PREFIX + "dense_layers": ",".join(str(i) for i in th.dense_layers),
        META_PREFIX + "theta_extrapolation": str(th.meta.get("theta_extrapolation", "last-row")),
        META_PREFIX + "calibrated_rows": str(th.meta.get("calibrated_rows", th.num_rows)),
        META_PREFIX + "theta_rows": str(th.num_rows),
    }


def _report(blocks, th, comp_mode, expose_kept, onnx_in, onnx_out, source) -> dict[str, Any]:
    return {
        "input": str(onnx_in),
        "output": str(onnx_out),
        "thresholds": source,
        "comp_mode": comp_mode,
        "expose_kept": expose_kept,
        "num_layers": len(blocks),
        "layers": [b.report(th.num_rows) for b in blocks],
    }

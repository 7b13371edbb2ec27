"""A summary of an ONNX file (for ``topθ-export inspect``): signature, op counts, TopThetaAttention nodes."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .layout import is_packed
from .names import DOMAIN, LAYER_META, META_PREFIX, OP_TYPE, kv_cache_form
from .rewriter import layer_of, load_onnx

__all__ = ["format_summary", "graph_dtype", "graph_kv_cache", "summarize"]

# ONNX element types (TensorProto and onnx_ir.DataType share the numbers) -> the names --dtype uses
_FLOAT_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64"}


def _dtype_of(elem_types) -> str | None:
    """The one floating-point type among a graph's inputs/outputs (None: none; 'mixed: a, b' if several)."""
    found = sorted({_FLOAT_TYPES[int(t)] for t in elem_types if t is not None and int(t) in _FLOAT_TYPES})
    if not found:
        return None
    return found[0] if len(found) == 1 else "mixed: " + ", ".join(found)


def graph_dtype(path) -> str | None:
    """What the model at ``path`` runs in, read from its graph inputs/outputs (weights are not loaded)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except DecodeError:  # not ONNX: the stage that loads it says so in its own words
        return None
    return _dtype_of(v.type.tensor_type.elem_type for v in [*graph.input, *graph.output])


def graph_kv_cache(path) -> str | None:
    """The KV-cache form of the model at ``path`` (``concat``, ``shared``, None: no cache), from its input names."""
    import onnx

    return kv_cache_form(v.name for v in onnx.load(str(path), load_external_data=False).graph.input)


def _dims(value) -> list:
    if value.shape is None:
        return []
    return [d if isinstance(d, int) else str(d) for d in value.shape]


def _io(value) -> dict[str, Any]:
    dtype = value.dtype.name.lower() if value.dtype is not None else "?"
    return {"name": value.name, "dtype": dtype, "shape": _dims(value)}


def _array(value) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return np.asarray(value.const_value.numpy(), dtype=np.float64)


def _theta_stats(theta: np.ndarray | None, sdc: np.ndarray | None) -> dict[str, Any]:
    if theta is None:
        return {}
    finite = np.isfinite(theta)
    out: dict[str, Any] = {
        "rows": int(theta.shape[-1]) if theta.ndim == 2 else None,
        "finite_fraction": float(finite.mean()) if theta.size else 0.0,
        "dense": bool(not finite.any()),
    }
    if finite.any():
        vals = theta[finite]
        out.update(theta_min=float(vals.min()), theta_mean=float(vals.mean()), theta_max=float(vals.max()))
    if sdc is not None and sdc.size:
        out["sdc_mean"] = float(sdc[finite].mean()) if finite.any() else 0.0
    return out


def _attention_node(node) -> dict[str, Any]:
    attrs = {name: a.value for name, a in node.attributes.items()}
    layer_meta = node.metadata_props.get(LAYER_META)
    layer, name = layer_of(node)
    if layer_meta is not None:
        layer = int(layer_meta)
    theta = node.inputs[3] if len(node.inputs) > 3 else None
    sdc = node.inputs[7] if len(node.inputs) > 7 else None
    mask = node.inputs[4] if len(node.inputs) > 4 else None
    info = {
        "layer": layer,
        "name": name,
        "node": node.name,
        "num_heads": int(attrs.get("num_heads", 0)),
        "num_kv_heads": int(attrs.get("num_kv_heads", 0)),
        "comp_mode": int(attrs.get("comp_mode", 0)),
        "causal": int(attrs.get("causal", 0)),
        "scale": float(attrs.get("scale", 0.0)),
        "layout": "packed" if is_packed(node) else "heads_first",  # docs/op.md, "Layouts"
        "mask": None if mask is None else ("key_padding" if mask.shape is not None and len(mask.shape) == 2 else "4d"),
        "thresholds": theta.name if theta is not None else None,
    }
    info.update(_theta_stats(_array(theta), _array(sdc)))
    return info


def summarize(path) -> dict[str, Any]:
    """Opset, inputs/outputs, op counts, metadata and one entry per TopThetaAttention node."""
    path = Path(path)
    model = load_onnx(path)
    graph = model.graph
    counts = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in graph.all_nodes()
    )
    nodes = [_attention_node(n) for n in graph.all_nodes() if n.op_type == OP_TYPE and n.domain == DOMAIN]
    nodes.sort(key=lambda d: (d["layer"] is None, d["layer"]))
    data_file = path.with_name(path.name + ".data")
    return {
        "path": str(path),
        "size_bytes": path.stat().st_size + (data_file.stat().st_size if data_file.is_file() else 0),
        "external_data": data_file.is_file(),
        "ir_version": model.ir_version,
        "opset": dict(model.opset_imports),
        "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        "dtype": _dtype_of(v.dtype for v in [*graph.inputs, *graph.outputs]),
        "kv_cache": _kv_cache(model),
        "inputs": [_io(v) for v in graph.inputs],
        "outputs": [_io(v) for v in graph.outputs],
        "num_nodes": sum(counts.values()),
        "op_counts": dict(counts.most_common()),
        "dense_attention_nodes": counts.get("Attention", 0),
        "metadata": dict(model.metadata_props),
        "toptheta_nodes": nodes,
        "thresholds": _overall(nodes),
    }


def _overall(nodes: list[dict]) -> dict[str, Any]:
    if not nodes:
        return {}
    sparse = [n for n in nodes if not n.get("dense", True)]
    means = [n["theta_mean"] for n in sparse if "theta_mean" in n]
    return {
        "layers": len(nodes),
        "dense_layers": [n["layer"] for n in nodes if n.get("dense")],
        "rows": sorted({n.get("rows") for n in nodes if n.get("rows") is not None}),
        "comp_modes": sorted({n["comp_mode"] for n in nodes}),
        "theta_min": min((n["theta_min"] for n in sparse), default=None),
        "theta_max": max((n["theta_max"] for n in sparse), default=None),
        "theta_mean": float(np.mean(means)) if means else None,
    }


def _kv_cache(model) -> str | None:
    """The KV-cache form from the input names; for a graph made elsewhere (GroupQueryAttention's shared buffer
    has no past_sequence_length input) the form its rewrite recorded."""
    meta = model.metadata_props
    if meta.get(META_PREFIX + "foreign_forms") and meta.get(META_PREFIX + "kv_cache"):
        return meta[META_PREFIX + "kv_cache"]
    return kv_cache_form(v.name for v in model.graph.inputs)


_KV_CACHE_TEXT = {
    "concat": "the graph concatenates past and new K/V into present.*",
    "shared": "one buffer per layer and kind, bound as past_key_values.* and present.*, with past_sequence_length"
    " (or seqlens_k in a GroupQueryAttention graph)",
}


def _fmt_shape(shape: list) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _num(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _io_lines(values: list[dict]) -> list[str]:
    """One line per graph input/output; numbered families (``present.0.key`` ... ``present.29.key``) with one
    dtype and shape are collapsed into ``present.{0..29}.key``."""
    groups: dict[tuple, list[int]] = {}
    order: list[tuple] = []
    for v in values:
        m = re.fullmatch(r"(.*?)\.(\d+)\.(.*)", v["name"])
        key = (
            (m.group(1), m.group(3), v["dtype"], tuple(v["shape"]))
            if m
            else (v["name"], None, v["dtype"], tuple(v["shape"]))
        )
        if key not in groups:
            groups[key] = []
            order.append(key)
        if m:
            groups[key].append(int(m.group(2)))
    lines = []
    for key in order:
        prefix, suffix, dtype, shape = key
        idx = sorted(groups[key])
        if suffix is None:
            name = prefix
        elif len(idx) > 1 and idx == list(range(idx[0], idx[-1] + 1)):
            name = f"{prefix}.{{{idx[0]}..{idx[-1]}}}.{suffix}"
        else:
            name = ", ".join(f"{prefix}.{i}.{suffix}" for i in idx)
        lines.append(f"  {name}: {dtype} {_fmt_shape(list(shape))}")
    return lines


def format_summary(s: dict[str, Any], *, max_ops: int = 12) -> str:
    """Plain-text rendering of ``summarize()`` (one fact per line)."""
    opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in s["opset"].items())
    lines = [
        f"{s['path']}  ({s['size_bytes'] / 1e6:.1f} MB{', external data' if s['external_data'] else ''})",
        f"opsets: {opsets}; {s['num_nodes']} nodes; runs in {s['dtype'] or 'no floating-point I/O'}",
    ]
    kv = s.get("kv_cache")
    if kv is not None:
        lines.append(f"KV cache: {kv} ({_KV_CACHE_TEXT[kv]})")
    lines.append("inputs:")
    lines += _io_lines(s["inputs"])
    lines.append("outputs:")
    lines += _io_lines(s["outputs"])
    ops = list(s["op_counts"].items())
    lines.append(
        "ops: "
        + ", ".join(f"{k} {v}" for k, v in ops[:max_ops])
        + (f", ... ({len(ops) - max_ops} more types)" if len(ops) > max_ops else "")
    )
    nodes = s["toptheta_nodes"]
    if not nodes:
        lines.append(f"no TopThetaAttention nodes ({s['dense_attention_nodes']} dense Attention nodes)")
        return "\n".join(lines)
    lines.append(f"TopThetaAttention: {len(nodes)} nodes")
    for n in nodes:
        theta = (
            "dense (θ=-inf)"
            if n.get("dense")
            else f"θ min/mean/max {_num(n.get('theta_min'))}/{_num(n.get('theta_mean'))}/{_num(n.get('theta_max'))}"
        )
        lines.append(
            f"  layer {n['layer']:>3} {n['name']}: heads {n['num_heads']}, kv heads {n['num_kv_heads']}, "
            f"R {n.get('rows')}, comp_mode {n['comp_mode']}, causal {n['causal']}, mask {n['mask']}, "
            f"{n.get('layout', 'heads_first').replace('_', ' ')}, {theta}"
        )
    meta = {k: v for k, v in s["metadata"].items() if k.startswith(META_PREFIX)}
    if meta:
        lines.append("metadata: " + ", ".join(f"{k[len(META_PREFIX) :]}={v}" for k, v in meta.items()))
    return "\n".join(lines)

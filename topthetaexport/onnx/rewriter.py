"""Replace every ONNX ``Attention`` node of a dense export by ``ai.toptheta::TopThetaAttention``.

See docs/graph.md for what is matched and what the rewritten graph looks like, docs/op.md for the operator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import exporter as _export
from .._errors import TopThetaError
from ..architectures import LAYER_PATH_RE as _LAYER_RE
from .exporter import write_onnx
from .names import DOMAIN, META_PREFIX, OP_TYPE, OP_VERSION

__all__ = ["rewrite", "load_onnx", "layer_of", "THETA_PREFIX", "SDC_PREFIX", "KEPT_PREFIX", "MASK_NAME"]

THETA_PREFIX = "toptheta.theta."
SDC_PREFIX = "toptheta.sdc."
KEPT_PREFIX = "toptheta.kept."
MASK_NAME = "toptheta.key_padding_mask"
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_FIX = "re-export the model with topthetaexport.export_onnx (attn_implementation='sdpa', opset 23)"


# -- loading -----------------------------------------------------------------------------------------

def load_onnx(path):
    """``onnx_ir.load`` with one-line TopThetaErrors for missing or corrupt files."""
    import onnx_ir as ir

    path = Path(path)
    if not path.is_file():
        raise TopThetaError(f"ONNX model {path} does not exist: export it first with 'topθ-export export'")
    try:
        return ir.load(path)
    except Exception as e:
        raise TopThetaError(f"{path} is not a valid ONNX model: {_first_line(e)}; re-export it") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _load_thresholds(thresholds):
    from ..thresholds import Thresholds

    if isinstance(thresholds, Thresholds):
        return thresholds, "in-memory"
    return Thresholds.load(thresholds), str(thresholds)


# -- matching ----------------------------------------------------------------------------------------

def _scopes(node) -> list[str]:
    raw = node.metadata_props.get(_SCOPES_KEY)
    if not raw:
        return []
    try:
        import ast

        scopes = ast.literal_eval(raw)
        return [str(s) for s in scopes] if isinstance(scopes, (list, tuple)) else []
    except (ValueError, SyntaxError):
        return []


def layer_of(node) -> tuple[int | None, str]:
    """(layer index, module name) from the node's torch name scopes; (None, node name) if absent."""
    scopes = _scopes(node)
    module = scopes[-2] if len(scopes) >= 2 else (scopes[-1] if scopes else "")
    if module.startswith("model."):  # strip the export wrapper's attribute name
        module = module[len("model."):]
    for scope in reversed(scopes):
        m = list(_LAYER_RE.finditer(scope))
        if m:
            return int(m[-1].group(1)), module or (node.name or "?")
    return None, module or (node.name or "?")


def _attr(node, name, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _unsupported(node) -> str | None:
    """Why this Attention node cannot become a TopThetaAttention, or None."""
    if float(_attr(node, "softcap", 0.0)) != 0.0:
        return "it uses softcap"
    if int(_attr(node, "qk_matmul_output_mode", 0)) != 0:
        return "it uses qk_matmul_output_mode"
    for out in node.outputs[1:]:
        if out is not None and (out.uses() or out.is_graph_output()):
            return f"its output '{out.name}' (not only Y) is used"
    extra = [v for v in node.inputs[4:] if v is not None]
    if extra:
        return "it takes past_key/past_value/nonpad_kv_seqlen inputs"
    q = node.inputs[0]
    if q is None or q.shape is None or len(q.shape) != 4:
        return "its query is not a 4-D [B, H, S, D] tensor"
    if not isinstance(q.shape[1], int) or not isinstance(q.shape[3], int):
        return f"its query shape {q.shape} has no static head count/head size"
    return None


@dataclass
class _Block:
    node: Any
    layer: int
    name: str
    num_heads: int = 0
    head_dim: int = 0
    key: Any = None
    value: Any = None
    num_kv_heads: int = 0
    gqa_peeled: bool = False
    mask_kind: str = "4d"
    causal: int = 0


def _find_blocks(graph) -> list[_Block]:
    nodes = [n for n in graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    blocks, by_layer = [], {}
    for order, node in enumerate(nodes):
        layer, name = layer_of(node)
        if layer is None:
            layer = order
        if layer in by_layer:
            raise TopThetaError(f"two attention blocks map to layer {layer} ({by_layer[layer].name} and {name}): "
                                f"{_FIX}")
        why = _unsupported(node)
        if why:
            raise TopThetaError(f"layer {layer} ({name}): the attention node cannot be replaced because {why}; "
                                "this model's attention is not supported by TopThetaAttention")
        q = node.inputs[0]
        block = _Block(node=node, layer=layer, name=name, num_heads=int(q.shape[1]), head_dim=int(q.shape[3]))
        by_layer[layer] = block
        blocks.append(block)
    return sorted(blocks, key=lambda b: b.layer)


def _check_layers(blocks: list[_Block], num_layers: int) -> None:
    found = {b.layer for b in blocks}
    missing = [i for i in range(num_layers) if i not in found]
    extra = sorted(found - set(range(num_layers)))
    if not missing and not extra:
        return
    if missing:
        pattern = blocks[0].name if blocks else ""
        names = [_name_for(pattern, blocks[0].layer, i) if blocks else "" for i in missing]
        what = ", ".join(f"layer {i}" + (f" ({n})" if n else "") for i, n in zip(missing, names))
        raise TopThetaError(
            f"{what}: attention block not found in the exported graph ({len(blocks)} of {num_layers} layers "
            f"matched); {_FIX}, and check that the thresholds belong to this model")
    raise TopThetaError(f"the exported graph has attention blocks for layers {extra} but the thresholds have only "
                        f"{num_layers} layers: use thresholds calibrated for this model")


def _name_for(pattern: str, layer: int, other: int) -> str:
    return _LAYER_RE.sub(lambda m: m.group(0).replace(f".{layer}", f".{other}", 1), pattern, count=1) \
        if pattern else ""


# -- GQA peeling -------------------------------------------------------------------------------------

def _const_ints(value) -> list[int] | None:
    import onnx_ir as ir

    if value is None:
        return None
    t = ir.convenience.get_const_tensor(value)
    if t is None:
        return None
    return [int(x) for x in np.asarray(t.numpy()).reshape(-1)]


def _peel(value, num_heads: int):
    """The [B, Hkv, S, D] source of an Unsqueeze(axis 2) -> Expand -> Reshape GQA expansion, or None."""
    reshape = value.producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    expand = reshape.inputs[0].producer() if reshape.inputs[0] is not None else None
    if expand is None or expand.op_type != "Expand":
        return None
    unsq = expand.inputs[0].producer() if expand.inputs[0] is not None else None
    if unsq is None or unsq.op_type != "Unsqueeze" or _const_ints(unsq.inputs[1]) not in ([2], [-3]):
        return None
    src = unsq.inputs[0]
    shape = src.shape
    if shape is None or len(shape) != 4 or not isinstance(shape[1], int):
        return None
    hkv = int(shape[1])
    eshape = expand.outputs[0].shape
    if hkv <= 0 or num_heads % hkv or (eshape is not None and len(eshape) == 5 and isinstance(eshape[2], int)
                                       and int(eshape[2]) * hkv != num_heads):
        return None
    if value.shape is not None and (len(value.shape) != 4 or value.shape[1] != num_heads):
        return None
    return src, hkv


def _set_kv(block: _Block) -> None:
    node = block.node
    k, v = node.inputs[1], node.inputs[2]
    pk, pv = _peel(k, block.num_heads), _peel(v, block.num_heads)
    if pk and pv and pk[1] == pv[1]:
        block.key, block.value, block.num_kv_heads, block.gqa_peeled = pk[0], pv[0], pk[1], pk[1] != block.num_heads
        return
    block.key, block.value = k, v
    heads = k.shape[1] if k.shape is not None and len(k.shape) == 4 else None
    block.num_kv_heads = int(heads) if isinstance(heads, int) else 0


# -- mask --------------------------------------------------------------------------------------------

def _graph_input(graph, name):
    return next((v for v in graph.inputs if v.name == name), None)


def _depends_on(value, target, limit: int = 2000) -> bool:
    """Whether ``target`` is an ancestor of ``value`` (bounded graph walk)."""
    seen, stack = set(), [value]
    while stack and len(seen) < limit:
        v = stack.pop()
        if v is target:
            return True
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        p = v.producer()
        if p is not None:
            stack.extend(p.inputs)
    return False


def _sliding_window(th_meta: dict, onnx_meta: dict) -> int | None:
    """The model's sliding window (0 = none) from the thresholds or the export metadata; None if unknown."""
    if "sliding_window" in th_meta:
        if th_meta.get("use_sliding_window") is False:
            return 0
        return int(th_meta["sliding_window"] or 0)
    v = onnx_meta.get(META_PREFIX + "sliding_window")
    return None if v in (None, "") else int(v or 0)


def _mask_plan(graph, th_meta: dict, onnx_meta: dict) -> tuple[str, Any]:
    """('key_padding', the attention_mask input) or ('4d', None), decided once for the whole graph."""
    am = _graph_input(graph, "attention_mask")
    if am is None or am.shape is None or len(am.shape) != 2:
        return "4d", None
    causal = _is_causal(th_meta, onnx_meta)
    if causal is None or (causal and _sliding_window(th_meta, onnx_meta) != 0):
        return "4d", None
    return "key_padding", am


def _is_causal(th_meta: dict, onnx_meta: dict) -> bool | None:
    """Causality from the thresholds and the export metadata (they must agree); None if neither says."""
    mine = th_meta.get("causal")
    theirs = onnx_meta.get(META_PREFIX + "causal")
    mine = None if mine is None else bool(mine)
    theirs = None if theirs in (None, "") else bool(int(theirs))
    if mine is not None and theirs is not None and mine != theirs:
        raise TopThetaError(f"the thresholds are for a {'causal' if mine else 'bidirectional'} model but the ONNX "
                            f"graph is {'causal' if theirs else 'bidirectional'}: use thresholds calibrated for "
                            "this model")
    return mine if mine is not None else theirs


def _shared_bool_mask(graph, am):
    import onnx_ir as ir

    if am.dtype == ir.DataType.BOOL:
        return am
    cast = ir.Node("", "Cast", [am], {"to": ir.AttrInt64("to", ir.DataType.BOOL)}, num_outputs=1,
                   name="toptheta/key_padding_mask")
    out = cast.outputs[0]
    out.name, out.dtype, out.shape = MASK_NAME, ir.DataType.BOOL, am.shape
    graph.insert_before(graph.node(0), cast)
    return out


# -- building the replacement -----------------------------------------------------------------------

def _check_thresholds(block: _Block, theta, th_meta: dict) -> None:
    if theta.dim() != 2 or theta.shape[0] != block.num_heads:
        raise TopThetaError(f"layer {block.layer} ({block.name}): thresholds have shape {list(theta.shape)} but the "
                            f"attention node has {block.num_heads} query heads (expected [{block.num_heads}, R]): "
                            "use thresholds calibrated for this model")
    kv = th_meta.get("num_kv_heads")
    if block.gqa_peeled and kv is not None and int(kv) != block.num_kv_heads:
        raise TopThetaError(f"layer {block.layer} ({block.name}): the graph has {block.num_kv_heads} kv heads but "
                            f"the thresholds were calibrated with {kv}: use thresholds calibrated for this model")


def _initializer(graph, name: str, array: np.ndarray):
    import onnx_ir as ir

    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array, dtype=np.float32), name=name))
    value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.FLOAT
    graph.register_initializer(value)
    return value


def _replace(graph, block: _Block, theta, sdc, mask, comp_mode: int, expose_kept: bool):
    import onnx_ir as ir

    node = block.node
    q_shape = node.inputs[0].shape
    scale = float(_attr(node, "scale", 0.0)) or 1.0 / math.sqrt(block.head_dim)
    th_v = _initializer(graph, f"{THETA_PREFIX}{block.layer}", theta)
    # ρ is always attached (a few KB per layer) so that a deployment can switch comp_mode without
    # re-exporting; with comp_mode 0 the operator ignores it.
    inputs = [node.inputs[0], block.key, block.value, th_v, mask, None, None,
              _initializer(graph, f"{SDC_PREFIX}{block.layer}", sdc)]
    while inputs and inputs[-1] is None:
        inputs.pop()
    attrs = [ir.AttrFloat32("scale", scale), ir.AttrInt64("causal", block.causal),
             ir.AttrInt64("num_heads", block.num_heads), ir.AttrInt64("num_kv_heads", block.num_kv_heads),
             ir.AttrInt64("comp_mode", comp_mode)]
    meta = dict(node.metadata_props)
    meta["toptheta.layer"] = str(block.layer)
    new = ir.Node(DOMAIN, OP_TYPE, inputs, attrs, num_outputs=4 if expose_kept else 1, version=OP_VERSION,
                  name=f"toptheta/attention.{block.layer}", metadata_props=meta)
    old_y, y = node.outputs[0], new.outputs[0]
    y.name, y.shape, y.dtype = f"toptheta.attn.{block.layer}", old_y.shape, old_y.dtype
    graph.insert_after(node, new)
    was_output = old_y.is_graph_output()
    old_y.replace_all_uses_with(y, replace_graph_outputs=True)
    if was_output:
        y.name = old_y.name
    graph.remove(node, safe=True)
    if expose_kept:
        new.outputs[1].name = new.outputs[2].name = ""
        kept = new.outputs[3]
        kept.name, kept.dtype = f"{KEPT_PREFIX}{block.layer}", ir.DataType.INT32
        kept.shape = ir.Shape([q_shape[0], q_shape[1], q_shape[2]])
        graph.outputs.append(kept)


# -- the pass ----------------------------------------------------------------------------------------

def rewrite(onnx_in, thresholds, onnx_out, *, comp_mode: int = 0, expose_kept: bool = False) -> dict[str, Any]:
    """Rewrite ``onnx_in`` (a dense export) into ``onnx_out`` with one TopThetaAttention per layer.

    ``thresholds``: a ``Thresholds`` or its path. Returns a report dict (per-layer matching details).
    """
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    if comp_mode not in (0, 1, 2):
        raise TopThetaError(f"comp_mode must be 0 (none), 1 (SDC) or 2 (SDC + V-mean), got {comp_mode}")
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    if onnx_out.suffix != ".onnx" or onnx_out.is_dir():
        raise TopThetaError(f"output path {onnx_out} must be a file ending in .onnx: pass e.g. model.onnx")
    th, th_source = _load_thresholds(thresholds)
    model = load_onnx(onnx_in)
    graph = model.graph
    onnx_meta = dict(model.metadata_props)
    if any(n.op_type == OP_TYPE and n.domain == DOMAIN for n in graph):
        raise TopThetaError(f"{onnx_in} already contains TopThetaAttention nodes: rewrite the dense export instead")

    blocks = _find_blocks(graph)
    _check_layers(blocks, th.num_layers)
    plan, am = _mask_plan(graph, th.meta, onnx_meta)
    causal = bool(_is_causal(th.meta, onnx_meta))
    shared_mask = _shared_bool_mask(graph, am) if plan == "key_padding" else None
    for block in blocks:
        _set_kv(block)
        theta, sdc = (t.numpy() for t in th.layer(block.layer))
        _check_thresholds(block, th.layer(block.layer)[0], th.meta)
        mask = block.node.inputs[3] if len(block.node.inputs) > 3 else None
        block.causal = int(_attr(block.node, "is_causal", 0))
        if shared_mask is not None and (mask is None or _depends_on(mask, am)):
            mask, block.mask_kind = shared_mask, "key_padding"
            block.causal = int(causal)
        else:
            block.mask_kind = "4d" if mask is not None else "none"
        _replace(graph, block, theta, sdc, mask, comp_mode, expose_kept)

    RemoveUnusedNodesPass()(model)
    model.opset_imports[DOMAIN] = OP_VERSION
    model.metadata_props.update(_metadata(th, th_source, comp_mode))
    external = _initializer_bytes(graph) > _export.EXTERNAL_DATA_THRESHOLD
    if not external:
        ir.external_data.load_to_model(model)
    write_onnx(model, onnx_out, external)
    return _report(blocks, th, comp_mode, expose_kept, onnx_in, onnx_out, th_source)


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
    }


def _report(blocks, th, comp_mode, expose_kept, onnx_in, onnx_out, source) -> dict[str, Any]:
    return {
        "input": str(onnx_in), "output": str(onnx_out), "thresholds": source,
        "comp_mode": comp_mode, "expose_kept": expose_kept, "num_layers": len(blocks),
        "layers": [{"layer": b.layer, "name": b.name, "num_heads": b.num_heads, "num_kv_heads": b.num_kv_heads,
                    "gqa_peeled": b.gqa_peeled, "mask": b.mask_kind, "causal": b.causal, "rows": th.num_rows}
                   for b in blocks],
    }

"""Evaluation variants of an exported Top-θ graph, built on the ONNX protobuf without re-exporting.

* ``topk``: every TopThetaAttention node of a sparse layer is replaced by standard ONNX ops computing exact
  per-row top-k attention (the baseline Top-θ approximates): scores ``s = scale·q·kᵀ``, valid keys (causal,
  bottom-right aligned, and the mask), ``τ = k-th largest valid score of the row`` (``TopK``), keep valid
  ``s >= τ`` (ties at τ are all kept; rows with ``<= k`` valid keys keep every valid key), softmax over the
  kept scores, times V. Dense layers keep the operator (their θ is ``-inf``: dense attention).
  The replacement also outputs the row's kept count, like the operator's ``kept`` output.
* ``toptheta`` with other thresholds: the θ / ρ initializers of every layer are replaced (so one export
  serves a whole sweep over k), optionally with another ``comp_mode``.
* ``dense``: every θ = ``-inf`` (dense attention through the operator).

Every variant exposes the per-layer kept counts as graph outputs ``toptheta.kept.{layer}``.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from . import names
from .._errors import TopThetaError

__all__ = ["write_variant", "replace_with_topk", "KEPT_PREFIX"]

KEPT_PREFIX = "toptheta.kept."
KEY_PADDING_MASK = "toptheta.key_padding_mask"  # = rewrite.MASK_NAME (not imported: keeps this module light)
_THETA_RE = re.compile(r"toptheta\.theta\.(\d+)$")


def _load(model_path: Path):
    import onnx

    try:
        return onnx.load(str(model_path), load_external_data=False)
    except Exception as e:
        raise TopThetaError(f"{model_path} is not a valid ONNX model ({str(e).splitlines()[0][:200]}): "
                            "re-export it") from None


def _op_nodes(graph):
    out = []
    for node in graph.node:
        if node.op_type == names.OP_TYPE and node.domain == names.DOMAIN:
            m = _THETA_RE.search(node.input[3]) if len(node.input) > 3 else None
            out.append((int(m.group(1)) if m else len(out), node))
    return out


def _attr(node, name, default):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _mask_info(graph, name: str) -> tuple[int | None, int]:
    """(element type or None, rank) of the op's mask input, from what the graph states about it.

    The rewrite gives the op either the shared ``[B, Ktot]`` key-padding mask (``attention_mask`` cast to
    bool) or the exported 4-D mask; a rank the graph does not state is taken as 4.
    """
    elem, rank = None, None
    for v in list(graph.value_info) + list(graph.input) + list(graph.output):
        if v.name == name:
            tt = v.type.tensor_type
            elem = tt.elem_type or None
            if tt.HasField("shape"):
                rank = len(tt.shape.dim)
    for node in graph.node:
        if name in node.output and node.op_type == "Cast" and elem is None:
            elem = _attr(node, "to", None)
    if name in (KEY_PADDING_MASK, "attention_mask"):
        rank = 2
    return elem, (rank if rank in (2, 4) else 4)


def _topk_nodes(layer: int, node, k: int, mask_info) -> tuple[list, list]:
    """Nodes (and constant initializers) computing exact top-k attention in place of ``node``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    p = f"toptheta/topk.{layer}/"
    q, key, v = node.input[0], node.input[1], node.input[2]
    mask = node.input[4] if len(node.input) > 4 and node.input[4] else None
    causal = int(_attr(node, "causal", 0))
    scale = float(_attr(node, "scale", 0.0))
    nodes, inits = [], []

    def c(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), p + name))
        return p + name

    def n(op, ins, outs=None, **attrs):
        outs = outs or [p + f"{op.lower()}{len(nodes)}"]
        nodes.append(helper.make_node(op, ins, outs, name=p + f"{op}{len(nodes)}", **attrs))
        return outs[0]

    zero_i, neg1 = c("zero", np.array([0], np.int64)), c("m1", np.array([-1], np.int64))
    shp_q, shp_k = n("Shape", [q]), n("Shape", [key])
    hq = n("Slice", [shp_q, c("s1", np.array([1], np.int64)), c("e2", np.array([2], np.int64))])
    hkv = n("Slice", [shp_k, c("s1b", np.array([1], np.int64)), c("e2b", np.array([2], np.int64))])
    grouped = n("Concat", [zero_i, hkv, neg1, zero_i], axis=0)   # [B, Hkv, G*Sq, D]
    per_head = n("Concat", [zero_i, hq, neg1, zero_i], axis=0)   # [B, Hq, Sq, *]
    # scores [B, Hq, Sq, Ktot]; GQA: query head h reads kv head h // G, so [B,Hq,Sq,D] -> [B,Hkv,G*Sq,D]
    qg = n("Reshape", [q, grouped])
    kt = n("Transpose", [key], perm=[0, 1, 3, 2])
    s = n("Reshape", [n("MatMul", [qg, kt]), per_head])
    if scale == 0.0:
        d = n("Slice", [shp_q, c("s3", np.array([3], np.int64)), c("e4", np.array([4], np.int64))])
        inv = n("Reciprocal", [n("Sqrt", [n("CastLike", [d, s])])])
        s = n("Mul", [s, inv])
    else:
        s = n("Mul", [s, n("CastLike", [c("scale", np.array(scale, np.float32)), s])])
    neg_inf = n("CastLike", [c("neginf", np.array(-np.inf, np.float32)), s])
    valid = None
    if mask is not None:
        mask_type, mask_rank = mask_info
        if mask_type in (None, TensorProto.BOOL):
            m = mask
        else:  # additive float mask: added to the scores, values <= -1e30 exclude
            s = n("Add", [s, n("CastLike", [mask, s])])
            m = n("Greater", [mask, n("CastLike", [c("lim", np.array(-1e30, np.float32)), mask])])
        if mask_rank == 2:
            m = n("Unsqueeze", [m, c("ax12", np.array([1, 2], np.int64))])  # [B, Ktot] -> [B, 1, 1, Ktot]
        valid = m
    if causal:
        ktot = n("Squeeze", [n("Slice", [shp_k, c("s2", np.array([2], np.int64)), c("e3", np.array([3], np.int64))])])
        sq = n("Squeeze", [n("Slice", [shp_q, c("s2b", np.array([2], np.int64)), c("e3b", np.array([3], np.int64))])])
        z, o = c("z0", np.array(0, np.int64)), c("o1", np.array(1, np.int64))
        rows = n("Unsqueeze", [n("Range", [n("Sub", [ktot, sq]), ktot, o]), c("one", np.array([1], np.int64))])
        cols = n("Range", [z, ktot, o])                                            # [Ktot]
        cm = n("LessOrEqual", [cols, rows])                                        # [Sq, Ktot]
        valid = cm if valid is None else n("And", [valid, cm])
    if valid is None:
        valid = n("Not", [n("IsNaN", [s])])
    masked = n("Where", [valid, s, neg_inf])                                        # [B, Hq, Sq, Ktot]
    ktot1 = n("Slice", [n("Shape", [masked]), c("sl", np.array([3], np.int64)), c("el", np.array([4], np.int64))])
    kk = n("Min", [c("k", np.array([int(k)], np.int64)), ktot1])
    top = n("TopK", [masked, kk], [p + "topv", p + "topi"], axis=-1, largest=1, sorted=1)
    tau = n("ReduceMin", [top, neg1], keepdims=1)                                   # k-th largest valid score
    keep = n("And", [valid, n("GreaterOrEqual", [s, tau])])
    zk = n("Where", [keep, s, neg_inf])
    mx = n("ReduceMax", [zk, neg1], keepdims=1)
    mx = n("Where", [n("IsInf", [mx]), n("CastLike", [c("zf", np.array(0.0, np.float32)), s]), mx])
    e = n("Exp", [n("Sub", [zk, mx])])
    den = n("Max", [n("ReduceSum", [e, neg1], keepdims=1), n("CastLike", [c("tiny", np.array(1e-30, np.float32)), s])])
    probs = n("Div", [e, den])                                                      # rows with nothing kept: 0
    y = n("MatMul", [n("Reshape", [probs, grouped]), v])                            # [B, Hkv, G*Sq, Dv]
    n("Reshape", [y, per_head], [node.output[0]])
    kept_name = node.output[3] if len(node.output) > 3 and node.output[3] else f"{KEPT_PREFIX}{layer}"
    n("ReduceSum", [n("Cast", [keep], to=onnx.TensorProto.INT32), neg1], [kept_name], keepdims=0)
    return nodes, inits


def replace_with_topk(model, k: int, dense_layers) -> list[int]:
    """In place: replace the TopThetaAttention node of every layer not in ``dense_layers`` by top-k ops.

    Returns the replaced layers. The replaced nodes' θ / ρ initializers are dropped.
    """
    if int(k) < 1:
        raise TopThetaError(f"top-k needs k >= 1 (got {k}): pass a positive k")
    graph = model.graph
    dense = {int(i) for i in dense_layers}
    replaced, drop = [], set()
    new_nodes = []
    ops = {id(node): layer for layer, node in _op_nodes(graph)}
    if not ops:
        raise TopThetaError("the model has no TopThetaAttention node: run 'topθ-export rewrite' on it first")
    for node in graph.node:
        layer = ops.get(id(node))
        if layer is None or layer in dense:
            new_nodes.append(node)
            continue
        mask = node.input[4] if len(node.input) > 4 and node.input[4] else None
        nodes, inits = _topk_nodes(layer, node, k, _mask_info(graph, mask) if mask else None)
        new_nodes.extend(nodes)
        graph.initializer.extend(inits)
        drop.update(i for i in (node.input[3], node.input[7] if len(node.input) > 7 else "") if i)
        replaced.append(layer)
    del graph.node[:]
    graph.node.extend(new_nodes)
    still_used = {i for node in graph.node for i in node.input}
    keep_inits = [t for t in graph.initializer if t.name not in drop or t.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    return replaced


def _expose_kept(model) -> None:
    import onnx

    graph = model.graph
    outs = {o.name for o in graph.output}
    for layer, node in _op_nodes(graph):
        o = list(node.output) + [""] * (4 - len(node.output))
        if not o[3]:
            o[3] = f"{KEPT_PREFIX}{layer}"
        del node.output[:]
        node.output.extend(o)
    for node in graph.node:
        for name in node.output:
            if name.startswith(KEPT_PREFIX) and name not in outs:
                graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT32, None))
                outs.add(name)


def write_variant(model_path, *, kind: str = "toptheta", k: int | None = None, dense_layers=(),
                  thresholds=None, comp_mode: int | None = None) -> Path:
    """A variant of the Top-θ model at ``model_path``, saved next to it (the caller deletes it).

    ``kind``: ``toptheta`` (θ/ρ from ``thresholds`` when given, a Thresholds), ``topk`` (exact top-k with
    ``k`` in every layer not in ``dense_layers``) or ``dense`` (every θ = -inf). ``comp_mode`` overrides
    the compensation mode of the remaining operators. Kept counts are always exposed.
    """
    from onnx import numpy_helper

    if kind not in ("toptheta", "topk", "dense"):
        raise TopThetaError(f"unknown variant '{kind}': use toptheta, topk or dense")
    if comp_mode is not None and comp_mode not in (0, 1, 2):
        raise TopThetaError(f"comp_mode must be 0, 1 or 2 (got {comp_mode})")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise TopThetaError(f"ONNX model {model_path} does not exist: run 'topθ-export export' first")
    model = _load(model_path)
    graph = model.graph
    ops = _op_nodes(graph)
    if not ops:
        raise TopThetaError(f"{model_path} has no TopThetaAttention node: run 'topθ-export rewrite' on it first")
    inits = {t.name: t for t in graph.initializer}
    if kind == "dense" or thresholds is not None:
        if thresholds is not None and thresholds.num_layers != len(ops):
            raise TopThetaError(f"thresholds have {thresholds.num_layers} layers but {model_path} has {len(ops)} "
                                "attention blocks: calibrate thresholds for this model")
        for layer, node in ops:
            for slot, idx in (("theta", 3), ("sdc", 7)):
                name = node.input[idx] if len(node.input) > idx else ""
                if not name or name not in inits:
                    continue
                old = inits[name]
                if kind == "dense":
                    arr = np.full(tuple(old.dims), -np.inf if slot == "theta" else 0.0, np.float32)
                else:
                    th, sdc = thresholds.layer(layer)
                    arr = (th if slot == "theta" else sdc).numpy().astype(np.float32)
                old.CopyFrom(numpy_helper.from_array(arr, name))
    if comp_mode is not None:
        for _, node in ops:
            for a in node.attribute:
                if a.name == "comp_mode":
                    a.i = int(comp_mode)
    if kind == "topk":
        if k is None:
            raise TopThetaError("the top-k variant needs k: pass k")
        replace_with_topk(model, int(k), dense_layers)
    _expose_kept(model)
    import onnx

    fd, tmp = tempfile.mkstemp(prefix=".variant-", suffix=".onnx", dir=model_path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def topk_attention_numpy(q, k, v, kk: int, *, scale: float | None = None, causal: bool = False,
                         key_padding=None) -> tuple[np.ndarray, np.ndarray]:
    """Float64 NumPy top-k attention (the definition above), for tests: (output, kept counts)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, hq, sq, d = q.shape
    hkv, ktot = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = scale or 1.0 / math.sqrt(d)
    kx, vx = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = np.einsum("bhid,bhjd->bhij", q, kx) * scale
    valid = np.ones((b, 1, sq, ktot), bool)
    if causal:
        rows = np.arange(ktot - sq, ktot)[:, None]
        valid &= (np.arange(ktot)[None, :] <= rows)[None, None]
    if key_padding is not None:
        valid = valid & np.asarray(key_padding, bool)[:, None, None, :]
    valid = np.broadcast_to(valid, s.shape)
    masked = np.where(valid, s, -np.inf)
    kth = -np.sort(-masked, axis=-1)[..., min(kk, ktot) - 1:min(kk, ktot)]
    keep = valid & (s >= kth)
    z = np.where(keep, s, -np.inf)
    mx = z.max(-1, keepdims=True)
    mx = np.where(np.isinf(mx), 0.0, mx)
    e = np.where(keep, np.exp(z - mx), 0.0)
    den = e.sum(-1, keepdims=True)
    p = e / np.maximum(den, 1e-300)
    return np.einsum("bhij,bhjd->bhid", p, vx), keep.sum(-1).astype(np.int32)

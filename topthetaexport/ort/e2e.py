"""End-to-end benchmark of three graphs of the same weights: prefill latency and per-token decode latency.

(a) the Top-θ model in the shared-buffer KV-cache form, (b) the dense export (concat form, as
``topthetaexport.export_onnx`` writes it), (c) the same model with every attention as
``com.microsoft.GroupQueryAttention`` on the shared buffers (``onnx.dense_gqa``). All three get last-token logits and
the greedy next-token output (``onnx.decoding``), the same session options and the same CUDA EP options, and run
through ``ort.device_generation`` (IOBinding, decode steps as ORT CUDA graphs where onnxruntime captures them).

Two halves, so that a GPU machine with little time and small uploads only runs:

* ``prepare_shape`` (any machine, CPU): a random-weight model of a named shape (``SHAPES``) is exported, rewritten,
  turned into the graphs and written *without weight data*: ``DIR/{toptheta,toptheta_measure,dense,dense_gqa}.onnx``
  reference ``weights.data``, which ``manifest.json`` describes (name, dtype, shape, offset, kind of every stripped
  initializer: ``normal`` with its std, ``ones``, ``zeros``). ``prepare_output`` does the same for a pipeline output
  folder (real weights and calibrated θ; ``weights.data`` is written, the dense export is re-exported from the model
  named in the folder's metadata).
* ``run_e2e`` (the device): writes ``weights.data`` from the manifest (a seeded torch generator per tensor, so the
  three graphs read the same values), sets θ by a search on the measured scores (random-weight shapes), times every
  (context, batch) and writes the rows (docs/benchmarks.md, "End to end").
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import TopThetaError
from ..onnx import names

__all__ = ["SHAPES", "fuse_prepared", "prepare_output", "prepare_shape", "render_markdown", "run_e2e"]

MANIFEST = "manifest.json"
WEIGHTS = "weights.data"
GRAPHS = {
    "toptheta": "toptheta.onnx",
    "toptheta_measure": "toptheta_measure.onnx",
    "dense": "dense.onnx",
    "dense_gqa": "dense_gqa.onnx",
}
STRIP_BYTES = 4096  # initializers at least this large go to weights.data (small constants stay in the graphs)
_ALIGN = 4096
_FLOAT_TYPES = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16"}
V_ROWS_LIMIT = 1 / 3  # the bound on the V rows read per decode step
V_ROWS_TARGET = 0.30  # what the θ search aims at (a margin below the bound)

# name -> (architecture, config keywords); head dims and GQA ratios of the models the issue names
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2.5-1.5b": (
        "qwen2",
        dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            head_dim=128,
            vocab_size=151936,
            rope_theta=1e6,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            use_sliding_window=False,
            initializer_range=0.02,
        ),
    ),
    "smollm2-135m": (
        "llama",
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            vocab_size=49152,
            rope_theta=1e5,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            initializer_range=0.02,
        ),
    ),
    "tiny": (  # the CPU test of the harness
        "llama",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=1000,  # the tests' tiny BPE tokenizer
            max_position_embeddings=512,
            tie_word_embeddings=False,
            initializer_range=0.02,
        ),
    ),
}


def _log(msg: str) -> None:
    print(msg, flush=True)


# -- prepare -------------------------------------------------------------------------------------------------------


def shape_config(shape: str):
    """The transformers config of a named shape (``SHAPES``)."""
    if shape not in SHAPES:
        raise TopThetaError(f"unknown shape '{shape}': use one of {', '.join(SHAPES)}")
    from transformers import LlamaConfig, Qwen2Config

    kind, kwargs = SHAPES[shape]
    cls = Qwen2Config if kind == "qwen2" else LlamaConfig
    return cls(bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs)


def build_random_model(shape: str, dtype: str = "float16", seed: int = 0):
    """A ``LoadedModel`` of ``shape`` with transformers' random init (N(0, 0.02) matrices, unit norm weights) in
    ``dtype``, built in that dtype (no float32 copy: 3 GB instead of 9 GB for the 1.5B shape)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models import load_model
    from ..onnx.exporter import TORCH_DTYPES

    if dtype not in TORCH_DTYPES:
        raise TopThetaError(f"unknown dtype '{dtype}': use one of {', '.join(TORCH_DTYPES)}")
    cfg = shape_config(shape)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=TORCH_DTYPES[dtype]).eval()
    loaded = load_model(model, dtype=TORCH_DTYPES[dtype])
    loaded.name = f"{shape}-random"
    return loaded


def _placeholder_thresholds(loaded, theta: float = 0.0):
    import torch

    from ..thresholds import Thresholds

    shape = (loaded.num_layers, loaded.num_heads, 1)
    meta = {
        "model": loaded.name,
        "model_type": loaded.model_type,
        "causal": True,
        "k": 0,
        "num_layers": loaded.num_layers,
        "num_heads": loaded.num_heads,
        "num_kv_heads": loaded.num_kv_heads,
        "head_dim": loaded.head_dim,
        "dense_layers": [],
        "calib_source": "placeholder (the e2e bench sets θ on the device)",
    }
    return Thresholds(torch.full(shape, float(theta)), torch.zeros(shape), meta)


def prepare_shape(
    shape: str,
    out_dir: str | Path,
    *,
    dtype: str = "float16",
    exports_dir: str | Path | None = None,
    fuse: bool = True,
    log: Callable = _log,
) -> Path:
    """Export a random-weight model of ``shape``, make the graphs, write them without weights; returns the manifest.

    ``fuse``: apply ``onnx.fusions.FuseForOrt`` to all four graphs alike (rotary caches as long as the model's
    positions; recorded in the manifest as ``fusions``).

    ``exports_dir``: keep the dense export and its rewrite there (with their weights) and reuse them when they are
    already there for this shape and dtype, so the graphs can be remade in minutes (the 1.5B export takes ~10 min
    on 2 cores)."""
    from ..onnx.exporter import export_onnx
    from ..onnx.rewriter import rewrite

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".e2e-prepare-", dir=out_dir) as tmp:
        where = Path(exports_dir) if exports_dir else Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        dense, tt, stamp = where / "dense.onnx", where / "toptheta.onnx", where / "e2e-export.json"
        info = json.loads(stamp.read_text()) if stamp.is_file() and dense.is_file() and tt.is_file() else None
        if info is not None and (info.get("shape"), info.get("dtype")) == (shape, dtype):
            log(f"reusing the exports in {where}")
        else:
            loaded = build_random_model(shape, dtype)
            info = _model_info(loaded, shape, dtype)
            log(
                f"built {loaded.name} ({info['parameters'] / 1e9:.2f} B parameters, {dtype}) in "
                f"{time.perf_counter() - t0:.0f} s"
            )
            export_onnx(loaded, dense)
            th = _placeholder_thresholds(loaded)
            del loaded
            log(f"exported in {time.perf_counter() - t0:.0f} s")
            rewrite(dense, th, tt)
            log(f"rewritten in {time.perf_counter() - t0:.0f} s")
            stamp.write_text(json.dumps(info))
        models = graph_set(dense, tt, theta_input=True, fuse_positions=_cache_rows(info["max_positions"], fuse))
        info["fusions"] = _fusions(models)
        info["theta"] = {"mode": "search", "target_v_rows": V_ROWS_TARGET, "limit_v_rows": V_ROWS_LIMIT}
        manifest = _write_graphs(models, out_dir, info, keep_data=False)
    log(f"wrote {out_dir} ({_dir_mb(out_dir):.1f} MB) in {time.perf_counter() - t0:.0f} s")
    return manifest


def prepare_output(
    out: str | Path,
    work_dir: str | Path,
    *,
    dense: str | Path | None = None,
    fuse: bool = True,
    log: Callable = _log,
) -> Path:
    """The three graphs of a pipeline output folder ``out`` (its model.onnx, its calibrated θ), with weights.

    (b) is ``dense`` when given, else re-exported from the model named in the folder's metadata in the graph's
    dtype (the weights are the same: the rewrite does not touch them). ``fuse``: as in ``prepare_shape`` (when the
    folder names the model's maximum position; a graph fused already stays as it is).
    """
    from ..models import load_model
    from ..onnx.exporter import export_onnx
    from ..onnx.rewriter import load_onnx
    from ..onnx.summary import graph_dtype

    out, work_dir = Path(out), Path(work_dir)
    tt = out / "model.onnx" if out.is_dir() else out
    if not tt.is_file():
        raise TopThetaError(f"{tt} does not exist: pass a folder written by 'topθ-export' (its model.onnx)")
    meta = dict(load_onnx(tt).metadata_props)
    dtype = graph_dtype(tt) or "float32"
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".e2e-prepare-", dir=work_dir) as tmp:
        if dense is None:
            name = meta.get(names.META_PREFIX + "model")
            if not name:
                raise TopThetaError(f"{tt} names no model in its metadata: pass the dense export with --dense")
            loaded = load_model(name)
            dense = Path(tmp) / "dense.onnx"
            export_onnx(loaded, dense, dtype=dtype)
            log(f"re-exported the dense model {name} ({dtype})")
        else:
            loaded = None
        max_positions = _max_positions(out, loaded)
        models = graph_set(Path(dense), tt, theta_input=False, fuse_positions=_cache_rows(max_positions, fuse))
        info = {
            "name": meta.get(names.META_PREFIX + "model", tt.parent.name),
            "shape": None,
            "dtype": dtype,
            "num_layers": int(meta.get(names.META_PREFIX + "num_layers", 0)),
            "num_heads": int(meta.get(names.META_PREFIX + "num_heads", 0)),
            "num_kv_heads": int(meta.get(names.META_PREFIX + "num_kv_heads", 0)),
            "head_dim": int(meta.get(names.META_PREFIX + "head_dim", 0)),
            "max_positions": max_positions,
            "fusions": _fusions(models),
            "theta": {"mode": "calibrated", "source": str(out)},
        }
        manifest = _write_graphs(models, work_dir, info, keep_data=True)
    return manifest


def fuse_prepared(graph_dir: str | Path, out_dir: str | Path | None = None, *, log: Callable = _log) -> Path:
    """``FuseForOrt`` on the four graphs of a folder ``prepare --shape`` wrote unfused (weights not needed: the
    fusions read no weight), written to ``out_dir`` (default: in place) with the rotary caches added to the
    manifest (kind ``rotary_cos``/``rotary_sin``, computed again by ``materialize``); returns the manifest."""
    import onnx_ir as ir

    from ..onnx.fusions import FuseForOrt, rotary_caches

    graph_dir = Path(graph_dir)
    out_dir = Path(out_dir) if out_dir else graph_dir
    path = graph_dir / MANIFEST
    if not path.is_file():
        raise TopThetaError(f"{graph_dir} has no {MANIFEST}: pass a folder written by 'bench/e2e.py prepare'")
    man = json.loads(path.read_text())
    if any((man.get("fusions") or {}).values()):
        raise TopThetaError(f"{graph_dir} is fused already (manifest 'fusions'): nothing to do")
    if any(e["kind"] == "data" for e in man["weights"]):
        raise TopThetaError(f"{graph_dir} carries its weights: make it again with 'bench/e2e.py prepare --from'")
    rows = _cache_rows(man.get("max_positions"), True)
    if rows is None:
        raise TopThetaError(f"{graph_dir}'s manifest has no max_positions: make it again with 'bench/e2e.py prepare'")
    models = {key: ir.load(graph_dir / fname) for key, fname in man["graphs"].items()}
    caches: dict[str, tuple[Any, np.ndarray]] = {}
    for model in models.values():
        FuseForOrt(rows)(model)
        for name, inv_freq in rotary_caches(model).items():
            caches.setdefault(name, (model.graph.initializers[name].const_value, inv_freq))
    offset = int(man["weights_bytes"])
    for name in sorted(caches):
        t, inv_freq = caches[name]
        kind = "rotary_" + name.rsplit(".", 1)[1].split("_")[0]
        entry: dict[str, Any] = {"name": name, "dtype": _FLOAT_TYPES[t.dtype.name], "shape": [int(d) for d in t.shape]}
        entry.update(nbytes=int(t.nbytes), offset=offset, gather_only=True, kind=kind, inv_freq=inv_freq.tolist())
        man["weights"].append(entry)
        offset += -(-entry["nbytes"] // _ALIGN) * _ALIGN
        for model in models.values():
            value = model.graph.initializers.get(name)
            if value is not None:
                value.const_value = ir.ExternalTensor(
                    WEIGHTS, entry["offset"], entry["nbytes"], t.dtype, shape=ir.Shape(entry["shape"]), name=name
                )
    man["weights_bytes"] = offset
    man["fusions"] = _fusions(models)
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, model in models.items():
        ir.save(model, out_dir / man["graphs"][key])
    (out_dir / MANIFEST).write_text(json.dumps(man, indent=1))
    log(f"fused {out_dir}: {man['fusions']['toptheta']}")
    return out_dir / MANIFEST


def _max_positions(out: Path, loaded) -> int | None:
    cfg = out / "config.json" if out.is_dir() else out.parent / "config.json"
    if cfg.is_file():
        value = json.loads(cfg.read_text()).get("max_position_embeddings")
        return int(value) if value else None
    return getattr(loaded, "max_positions", None) if loaded is not None else None


def _model_info(loaded, shape: str, dtype: str) -> dict[str, Any]:
    cfg = loaded.model.config
    return {
        "name": loaded.name,
        "shape": shape,
        "dtype": dtype,
        "parameters": int(sum(p.numel() for p in loaded.model.parameters())),
        "num_layers": loaded.num_layers,
        "num_heads": loaded.num_heads,
        "num_kv_heads": loaded.num_kv_heads,
        "head_dim": loaded.head_dim,
        "vocab": int(cfg.vocab_size),
        "max_positions": int(cfg.max_position_embeddings),
        "config": {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))},
    }


def _cache_rows(max_positions: int | None, fuse: bool) -> int | None:
    from ..onnx.fusions import rotary_cache_rows

    return rotary_cache_rows(max_positions) if fuse and max_positions else None


def _fusions(models: dict[str, Any]) -> dict[str, Any]:
    from ..onnx.fusions import fused

    return {key: fused(model) for key, model in models.items()}


def graph_set(
    dense_path: Path, toptheta_path: Path, *, theta_input: bool, fuse_positions: int | None = None
) -> dict[str, Any]:
    """The four onnx-ir models of the bench from a dense export and its Top-θ rewrite (concat or shared form).

    ``fuse_positions``: apply ``FuseForOrt`` with rotary caches of that many positions to every graph (None: the
    graphs stay unfused; a graph fused already is left as it is)."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from ..onnx.decoding import GreedyNextToken, LastTokenLogits, ThetaInput
    from ..onnx.dense_gqa import DenseGqa
    from ..onnx.kv_cache import ShareKvBuffer, kv_cache_form
    from ..onnx.rewriter import load_onnx
    from ..onnx.variants import ExposeAttentionIO, ExposeKept

    def shared():
        model = load_onnx(toptheta_path)
        if kv_cache_form(model.graph) == "concat":
            ShareKvBuffer()(model)
        return model

    def decoding(model):
        LastTokenLogits()(model)
        GreedyNextToken()(model)
        return model

    dense = decoding(load_onnx(dense_path))
    gqa = shared()
    DenseGqa()(gqa)
    toptheta = shared()
    measure = shared()
    ExposeKept()(measure)
    ExposeAttentionIO()(measure)  # only the queries stay: K is in the caller's buffers
    measure.graph.outputs[:] = [
        v for v in measure.graph.outputs if not (v.name or "").startswith(names.IO_PREFIX) or v.name.endswith(".q")
    ]
    RemoveUnusedNodesPass()(measure)
    if theta_input:
        ThetaInput()(toptheta)
        ThetaInput()(measure)
    models = {
        "toptheta": decoding(toptheta),
        "toptheta_measure": decoding(measure),
        "dense": dense,
        "dense_gqa": decoding(gqa),
    }
    if fuse_positions:
        from ..onnx.fusions import FuseForOrt, rotary_caches

        # A graph fused already (a pipeline output fused for CUDA) fixes the rotary caches' rows: the others get
        # the same initializers, which the graphs share in weights.data.
        rows = [
            int(m.graph.initializers[name].const_value.shape[0]) for m in models.values() for name in rotary_caches(m)
        ]
        for model in models.values():
            FuseForOrt(rows[0] if rows else int(fuse_positions))(model)
    return models


def _op_scale(model) -> float | None:
    from ..onnx.layout import head_dims
    from ..onnx.variants import op_nodes

    for _, node in op_nodes(model.graph):
        a = node.attributes.get("scale")
        if a is not None and float(a.value) != 0.0:
            return float(a.value)
        dims = head_dims(node)  # D from the cache: the query may be packed, [B, S, Hq·D]
        return 1.0 / math.sqrt(dims[2]) if dims is not None else None
    return None


def _write_graphs(models: dict[str, Any], out_dir: Path, info: dict[str, Any], *, keep_data: bool) -> Path:
    """Write the graphs with their large float initializers moved to ``weights.data`` (written only with
    ``keep_data``) and the manifest that describes them."""
    import onnx_ir as ir

    from ..onnx.fusions import rotary_caches

    entries: dict[str, dict[str, Any]] = {}
    tensors: dict[str, Any] = {}
    rotary: dict[str, np.ndarray] = {}
    for model in models.values():
        rotary.update(rotary_caches(model))
        for value in model.graph.initializers.values():
            t = value.const_value
            if t is None or t.dtype.name not in _FLOAT_TYPES or t.nbytes < STRIP_BYTES:
                continue
            shape = [int(d) for d in t.shape]
            seen = entries.get(value.name)
            if seen is None:
                entries[value.name] = {"name": value.name, "dtype": _FLOAT_TYPES[t.dtype.name], "shape": shape}
                entries[value.name]["nbytes"] = int(t.nbytes)
                tensors[value.name] = t
            elif (seen["dtype"], seen["shape"]) != (_FLOAT_TYPES[t.dtype.name], shape):
                raise TopThetaError(f"initializer {value.name} differs between the bench graphs: re-run prepare")
    gather_only = _gather_only(models, set(entries))
    offset = 0
    for name in sorted(entries):
        e = entries[name]
        e["offset"], offset = offset, offset + -(-e["nbytes"] // _ALIGN) * _ALIGN
        e["gather_only"] = name in gather_only
    weights_path = out_dir / WEIGHTS
    with open(weights_path, "wb") if keep_data else _nothing() as f:
        for name in sorted(entries):
            array = tensors[name].numpy()
            e = entries[name]
            if keep_data:
                f.seek(e["offset"])
                f.write(np.ascontiguousarray(array).tobytes())
                e["kind"] = "data"
            elif name in rotary:  # cos/sin of position · inv_freq: computed again, not drawn at random
                e.update(kind="rotary_" + name.rsplit(".", 1)[1].split("_")[0], inv_freq=rotary[name].tolist())
            else:
                e.update(_kind(array))
    for gname, model in models.items():
        for value in model.graph.initializers.values():
            found = entries.get(value.name or "")
            if found is None or value.const_value is None or value.const_value.nbytes < STRIP_BYTES:
                if isinstance(value.const_value, ir.ExternalTensor):  # small, but in the export's data file: inline
                    t = value.const_value
                    value.const_value = ir.Tensor(t.numpy(), dtype=t.dtype, name=value.name)
                continue
            e = found
            value.const_value = ir.ExternalTensor(
                WEIGHTS,
                e["offset"],
                e["nbytes"],
                value.const_value.dtype,
                shape=ir.Shape(e["shape"]),
                name=value.name,
                base_dir=str(out_dir),
            )
        for node in model.graph:  # torch's name scopes and stack traces: 80 % of the file, not needed to run
            for key in [k for k in node.metadata_props if not k.startswith(names.META_PREFIX)]:
                del node.metadata_props[key]
        ir.save(model, out_dir / GRAPHS[gname])
    scale = _op_scale(models["toptheta"])
    manifest = {
        **info,
        "scale": scale,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "graphs": GRAPHS,
        "weights_file": WEIGHTS,
        "weights_bytes": offset,
        "streamed_weight_bytes": int(sum(e["nbytes"] for e in entries.values() if not e["gather_only"])),
        "weights": [entries[n] for n in sorted(entries)],
    }
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=1))
    return path


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _kind(array: np.ndarray) -> dict[str, Any]:
    a = array.astype(np.float32)
    if np.all(a == 1.0):
        return {"kind": "ones"}
    if np.all(a == 0.0):
        return {"kind": "zeros"}
    return {"kind": "normal", "std": round(float(a.std()), 5), "mean": round(float(a.mean()), 6)}


def _gather_only(models: dict[str, Any], wanted: set[str]) -> set[str]:
    """Initializers read only row by row: the table of a Gather (the embedding: a decode step reads B of its rows)
    or the cos/sin cache of a RotaryEmbedding (B x S rows)."""
    out = set(wanted)

    def by_rows(node, index: int) -> bool:
        return (node.op_type == "Gather" and index == 0) or (node.op_type == "RotaryEmbedding" and index in (2, 3))

    for model in models.values():
        for value in model.graph.initializers.values():
            if value.name in out and not all(by_rows(node, index) for node, index in value.uses()):
                out.discard(value.name)
    return out


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("torch", "transformers", "onnx", "onnx_ir", "onnxscript", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing package is just not listed
            pass
    return out


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 2**20


# -- weights on the run machine -------------------------------------------------------------------------------------


def materialize(graph_dir: Path, work_dir: Path, *, device: str, seed: int = 1234, log: Callable = _log) -> dict:
    """Copy the graphs to ``work_dir`` and write ``weights.data`` there: the stored one (``kind: data``) or values
    generated from the manifest (one seeded generator per tensor, on ``device``). Returns the manifest."""
    import torch

    manifest = json.loads((graph_dir / MANIFEST).read_text())
    work_dir.mkdir(parents=True, exist_ok=True)
    for fname in manifest["graphs"].values():
        shutil.copyfile(graph_dir / fname, work_dir / fname)
    target = work_dir / WEIGHTS
    stored = graph_dir / WEIGHTS
    if any(e["kind"] == "data" for e in manifest["weights"]):
        if not stored.is_file():
            raise TopThetaError(f"{graph_dir} has weights of kind 'data' but no {WEIGHTS}: carry it with the graphs")
        if stored.resolve() != target.resolve():
            shutil.copyfile(stored, target)
        return manifest
    t0 = time.perf_counter()
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    with open(target, "wb") as f:
        f.truncate(int(manifest["weights_bytes"]))
        for i, e in enumerate(manifest["weights"]):
            dt = dtypes[e["dtype"]]
            if e["kind"] in ("rotary_cos", "rotary_sin"):
                from ..onnx.fusions import cos_sin_cache

                table = cos_sin_cache(np.array(e["inv_freq"], np.float32), int(e["shape"][0]))[
                    e["kind"] == "rotary_sin"
                ]
                t = torch.from_numpy(table).to(dev).to(dt)
            elif e["kind"] == "ones":
                t = torch.ones(e["shape"], dtype=dt, device=dev)
            elif e["kind"] == "zeros":
                t = torch.zeros(e["shape"], dtype=dt, device=dev)
            else:
                g = torch.Generator(device=dev).manual_seed(seed + i)
                t = torch.randn(e["shape"], generator=g, device=dev, dtype=torch.float32)
                t = t.mul_(float(e["std"])).add_(float(e.get("mean", 0.0))).to(dt)
            raw = t.contiguous().view(torch.uint8).cpu().numpy()
            f.seek(int(e["offset"]))
            f.write(raw.tobytes())
    log(
        f"{manifest['name']}: wrote {manifest['weights_bytes'] / 2**30:.2f} GiB of weights in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return manifest


# -- torch-backed buffers (device memory torch can read: the θ search computes scores from the cache) ---------------


class TorchBuffer:
    _NP: dict[str, Any] = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    _NP.update({"tensor(int32)": np.int32, "tensor(bool)": np.bool_})

    def __init__(self, tensor, ort_type: str):
        self.tensor, self.ort_type = tensor, ort_type
        self.shape = tuple(tensor.shape)
        self.device_type = "cuda" if tensor.is_cuda else "cpu"

    def _element(self):
        return self._NP.get(self.ort_type, 16)  # bfloat16: the ONNX type number

    def bind_input(self, binding: Any, name: str) -> None:
        binding.bind_input(name, self.device_type, 0, self._element(), list(self.shape), self.tensor.data_ptr())

    def bind_output(self, binding: Any, name: str) -> None:
        binding.bind_output(name, self.device_type, 0, self._element(), list(self.shape), self.tensor.data_ptr())

    def write(self, array: np.ndarray) -> None:
        import torch

        self.tensor.copy_(torch.from_numpy(np.ascontiguousarray(array)).reshape(self.shape))

    def read(self) -> np.ndarray:
        return self.tensor.float().cpu().numpy() if self.ort_type == "tensor(bfloat16)" else self.tensor.cpu().numpy()


class TorchBuffers:
    _TORCH = {
        "tensor(float)": "float32",
        "tensor(float16)": "float16",
        "tensor(bfloat16)": "bfloat16",
        "tensor(int64)": "int64",
        "tensor(int32)": "int32",
        "tensor(bool)": "bool",
    }

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.device = torch.device("cuda" if device == "cuda" else "cpu")

    def empty(self, shape: Sequence[int], ort_type: str) -> TorchBuffer:
        dt = getattr(self.torch, self._TORCH[ort_type])
        return TorchBuffer(self.torch.zeros(list(shape), dtype=dt, device=self.device), ort_type)

    def from_numpy(self, array: np.ndarray) -> TorchBuffer:
        array = np.ascontiguousarray(array)
        ort_type = {np.dtype(v): k for k, v in TorchBuffer._NP.items()}[array.dtype]
        return TorchBuffer(self.torch.from_numpy(array).to(self.device), ort_type)


# -- timing ---------------------------------------------------------------------------------------------------------


class _Timer:
    """Run hook: CUDA events on the session's stream around each Run (GPU ms) and the host clock (wall ms)."""

    def __init__(self, stream):
        self.stream, self.gpu, self.wall = stream, [], []

    def __call__(self, run: Callable[[], None]) -> None:
        if self.stream is None:
            t = time.perf_counter()
            run()
            self.wall.append(1e3 * (time.perf_counter() - t))
            self.gpu.append(self.wall[-1])
            return
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        t = time.perf_counter()
        run()
        self.wall.append(1e3 * (time.perf_counter() - t))
        end.record(self.stream)
        end.synchronize()
        self.gpu.append(start.elapsed_time(end))


def kernel_intervals(prof, *, copies: bool = False) -> list[tuple[str, int, int]]:
    """(name, start_ns, end_ns) of every GPU kernel in a torch.profiler run (memcpy/memset too with ``copies``)."""
    import torch

    out = []
    for e in prof.profiler.kineto_results.events():
        if e.device_type() != torch.autograd.DeviceType.CUDA:
            continue
        if not copies and e.name().startswith(("Memcpy", "Memset")):
            continue
        start = e.start_ns() if hasattr(e, "start_ns") else e.start_us() * 1000
        dur = e.duration_ns() if hasattr(e, "duration_ns") else e.duration_us() * 1000
        out.append((e.name(), start, start + dur))
    return out


def _profiled(fn: Callable[[], Any], calls: int, cuda: bool) -> tuple[float | None, dict[str, float]]:
    """(GPU busy ms per call: the union of kernel intervals, {kernel: µs per call}) read with CUPTI (torch.profiler)."""
    if not cuda:
        for _ in range(calls):
            fn()
        return None, {}
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    iv = sorted(kernel_intervals(prof), key=lambda x: x[1])
    if not iv:
        return None, {}
    busy, (cur_s, cur_e) = 0, iv[0][1:]
    kernels: dict[str, float] = {}
    for name, s0, e0 in iv:
        kernels[name] = kernels.get(name, 0.0) + (e0 - s0) / 1e3 / calls
        if s0 > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s0, e0
        else:
            cur_e = max(cur_e, e0)
    busy += cur_e - cur_s
    return busy / 1e6 / calls, kernels


def timeline(fn: Callable[[], Any], cuda: bool) -> dict[str, Any] | None:
    """What the GPU did in one call of ``fn``: every kernel, memcpy and memset (short name, start and length in µs
    from the first), and the gaps between them, largest first with the activity before each (``--trace``)."""
    if not cuda:
        return None
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    iv = sorted(kernel_intervals(prof, copies=True), key=lambda x: x[1])
    if not iv:
        return None
    t0 = iv[0][1]
    events = [[short_kernel(n), round((s - t0) / 1e3, 2), round((e - s) / 1e3, 2)] for n, s, e in iv]
    gaps: list[tuple[float, str, str]] = []
    end = iv[0][2]
    for (n0, _, _), (n1, s1, e1) in zip(iv, iv[1:]):
        if s1 > end:
            gaps.append((round((s1 - end) / 1e3, 2), short_kernel(n0), short_kernel(n1)))
        end = max(end, e1)
    gaps.sort(key=lambda g: -g[0])
    idle = round(sum(g[0] for g in gaps), 1)
    return {"span_us": round((end - t0) / 1e3, 1), "idle_us": idle, "events": events, "gaps": gaps[:40]}


def short_kernel(name: str) -> str:
    """``void toptheta::(anonymous namespace)::DecodeKernel<...>(...)`` -> ``toptheta::DecodeKernel``."""
    if name.startswith(("Memcpy", "Memset")):
        return name.split("(")[0].strip()
    base = name.replace("(anonymous namespace)::", "").split("<")[0].split("(")[0].strip()
    base = base.split()[-1] if base.split() else base
    parts = base.split("::")
    return "::".join([parts[0], parts[-1]]) if len(parts) > 1 else base


def _attention_kernels(kernels: dict[str, float]) -> list[str]:
    return sorted({short_kernel(n) for n in kernels if "toptheta" in n})


def _top_kernels(kernels: dict[str, float], top: int = 4) -> list[str]:
    items = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return [f"{short_kernel(n)} {us:.0f}us" for n, us in items]


def _get(res: dict | None, key: str) -> Any:
    return res[key] if res else None


def _timings(a: dict, b: dict | None, c: dict | None, **extra: Any) -> dict:
    """The timing keys of a result row from the measurements of (a) Top-θ, (b) dense and (c) GQA (None: failed)."""
    return dict(
        toptheta_ms=a["gpu_ms"],
        dense_ms=_get(b, "gpu_ms"),
        dense_gqa_ms=_get(c, "gpu_ms"),
        toptheta_wall_ms=a["wall_ms"],
        **extra,
        kernels=_attention_kernels(a["kernels"]),
        dense_wall_ms=_get(b, "wall_ms"),
        dense_gqa_wall_ms=_get(c, "wall_ms"),
        toptheta_busy_ms=a["busy_ms"],
        dense_busy_ms=_get(b, "busy_ms"),
        dense_gqa_busy_ms=_get(c, "busy_ms"),
        dense_gqa_kernels=_top_kernels(c["kernels"]) if c else [],
        toptheta_top_kernels=_top_kernels(a["kernels"], 6),
        generic_kernel=any("GenericKernel" in n for n in a["kernels"]),
        **_timelines(a, b, c),
    )


def _timelines(a: dict, b: dict | None, c: dict | None) -> dict[str, Any]:
    """``timeline`` {graph: one call's GPU activities} where ``--trace`` recorded them."""
    got = {k: r["timeline"] for k, r in (("toptheta", a), ("dense", b), ("dense_gqa", c)) if r and r.get("timeline")}
    return {"timeline": got} if got else {}


def _median(xs: list[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


# -- the run --------------------------------------------------------------------------------------------------------


class _Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), float(seconds)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def run_e2e(
    graph_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    contexts: Sequence[int] = (2048, 8192, 16384, 32768),
    batches: Sequence[int] = (1, 8, 16),
    device: str = "cuda",
    decode_steps: int = 8,
    work_dir: str | Path | None = None,
    library: str | Path | None = None,
    max_dense_scores_gb: float = 20.0,
    budget_s: float = 420.0,
    date: str | None = None,
    trace: bool = False,
    log: Callable = _log,
) -> dict[str, Any]:
    """Time every (context, batch) of every prepared graph folder; write ``e2e-<device>-<date>.{json,md}``.
    ``trace``: each decode row also keeps one call's GPU timeline per graph (``timeline``)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise TopThetaError("device cuda asked for but torch sees no GPU: run on the GPU machine or pass --device cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="e2e-work-", dir=_fast_tmp()))
    budget = _Budget(budget_s)
    stream = torch.cuda.Stream() if device == "cuda" else None
    info = _run_info(device, torch)
    rows: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    ctx = torch.cuda.stream(stream) if stream is not None else _nothing()
    with ctx:
        for gdir in graph_dirs:
            gdir = Path(gdir)
            bench = _ModelBench(gdir, work / gdir.name, device, stream, library, decode_steps, max_dense_scores_gb)
            bench.trace = trace
            try:
                models.append(bench.info)
                rows += bench.run(contexts, batches, budget, log)
            finally:
                bench.close()
    info["seconds"] = round(time.perf_counter() - budget.t0, 1)
    result = {"info": info, "models": models, "rows": rows}
    tag = "h200" if "H200" in info.get("device", "") else ("cpu" if device == "cpu" else "gpu")
    stem = f"e2e-{tag}-{date or datetime.date.today().isoformat()}"
    (out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    (out_dir / f"{stem}-info.json").write_text(json.dumps({"info": info, "models": models}, indent=1))
    (out_dir / f"{stem}.md").write_text(render_markdown(rows, info, models))
    paths = [str(out_dir / f"{stem}{s}") for s in (".json", "-info.json", ".md")]
    result["paths"] = paths
    log(f"wrote {', '.join(paths)} in {info['seconds']} s")
    return result


def _fast_tmp() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > 8 * 2**30 else None


def _run_info(device: str, torch) -> dict[str, Any]:
    import onnxruntime as ort

    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "device": "cpu",
    }
    if device == "cuda":
        prop = torch.cuda.get_device_properties(0)
        info.update(device=prop.name, sms=prop.multi_processor_count, cuda=torch.version.cuda)
    return info


class _ModelBench:
    """Sessions and measurements of one prepared model (one graph folder)."""

    def __init__(self, gdir: Path, work: Path, device: str, stream, library, steps: int, max_scores_gb: float):
        import torch

        from .device_generation import DeviceSession

        self.torch, self.device, self.stream, self.steps = torch, device, stream, int(steps)
        self.cuda = device == "cuda"
        self.max_scores_gb = float(max_scores_gb)
        self.work = work
        t0 = time.perf_counter()
        self.man = materialize(gdir, work, device=device)
        self.buffers = TorchBuffers(device)
        self.search = self.man.get("theta", {}).get("mode") == "search"
        self.sessions: dict[str, Any] = {}
        opts = {"arena_extend_strategy": "kSameAsRequested"}
        stream_ptr = stream.cuda_stream if stream is not None else None
        for key in ("toptheta", "toptheta_measure", "dense", "dense_gqa"):
            self.sessions[key] = DeviceSession(
                work / self.man["graphs"][key],
                device=device,
                cuda_graph=True,
                stream=stream_ptr,
                library=library,
                prepare=False,
                provider_options=opts,
            )
        sig = self.sessions["toptheta"].signature
        self.heads, self.kv_heads = int(self.man["num_heads"]), int(self.man["num_kv_heads"])
        self.head_dim, self.layers = int(self.man["head_dim"]), int(self.man["num_layers"])
        self.elem = 4 if sig.cache_type == "tensor(float)" else 2
        self.scale = float(self.man.get("scale") or 1.0 / math.sqrt(self.head_dim))
        self.theta_rows = 1
        theta_in = next((i for i in self.sessions["toptheta"].sess.get_inputs() if i.name == names.THETA_INPUT), None)
        if theta_in is not None and isinstance(theta_in.shape[1], int):
            self.theta_rows = int(theta_in.shape[1])
        self.theta_buf = (
            self.buffers.from_numpy(np.full((self.heads, self.theta_rows), -np.inf, np.float32))
            if self.search
            else None
        )
        self.info = {
            "name": self.man["name"],
            "shape": self.man.get("shape"),
            "dtype": self.man["dtype"],
            "parameters": self.man.get("parameters"),
            "streamed_weight_bytes": self.man["streamed_weight_bytes"],
            "sessions_seconds": round(time.perf_counter() - t0, 1),
            "providers": {k: s.providers for k, s in self.sessions.items()},
            "cuda_graph": {k: s.cuda_graph for k, s in self.sessions.items()},
            "notes": {k: s.note for k, s in self.sessions.items() if s.note},
            "theta": dict(self.man.get("theta", {})),
            "theta_by_context": {},
            "skipped": [],
        }
        self.rng = np.random.default_rng(0)
        self._table: list[np.ndarray] | None = None
        self.trace = False

    def close(self) -> None:
        self.sessions.clear()
        if self.cuda:
            self.torch.cuda.empty_cache()
        shutil.rmtree(self.work, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------------------------------

    def _extra(self, key: str) -> dict[str, Any]:
        return {names.THETA_INPUT: self.theta_buf} if self.search and key.startswith("toptheta") else {}

    def _gen(self, key: str, batch: int, length: int, share=None):
        return self.sessions[key].generator(
            batch, length, buffers=self.buffers, extra_inputs=self._extra(key), share=share
        )

    def _ids(self, batch: int, length: int) -> np.ndarray:
        vocab = int(self.man.get("vocab") or self.sessions["toptheta"].signature.vocab or 100)
        return self.rng.integers(3, vocab, (batch, length), dtype=np.int64)

    def _set_theta(self, theta: float) -> None:
        if self.theta_buf is not None:
            self.theta_buf.write(np.full((self.heads, self.theta_rows), theta, np.float32))

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    # -- measurements ------------------------------------------------------------------------------------------------

    def _scores(self, step, cache, position: int) -> list[Any]:
        """Per layer: fp32 scores [B, Hq, position + 1] of the measured step's queries against the cache's keys."""
        torch = self.torch
        g = self.heads // self.kv_heads
        out = []
        for layer in range(self.layers):
            q = step.extras[names.io_name(layer, "q")].numpy()  # [B, Hq, 1, D]
            qt = torch.from_numpy(q.astype(np.float32)).to(cache[2 * layer].tensor.device)
            b = qt.shape[0]
            k = cache[2 * layer].tensor[:, :, : position + 1].float()  # [B, Hkv, K, D]
            s = torch.einsum("bhgd,bhkd->bhgk", qt.view(b, self.kv_heads, g, -1), k) * self.scale
            out.append(s.reshape(b, self.heads, -1))
        return out

    def _thresholds(self, theta: float | None, position: int) -> list[Any]:
        """θ per layer as a [Hq, 1] tensor: ``theta`` everywhere, or (calibrated θ) the row of ``position``."""
        torch = self.torch
        if theta is not None:
            return [torch.full((self.heads, 1), float(theta)) for _ in range(self.layers)]
        rows = [t[:, min(position, t.shape[1] - 1)] for t in self._theta_table()]
        return [torch.from_numpy(np.ascontiguousarray(r, np.float32))[:, None] for r in rows]

    def _theta_table(self) -> list[np.ndarray]:
        """The calibrated θ [Hq, R] of every layer, read from the measure graph (weights are not loaded)."""
        if self._table is None:
            import onnx_ir as ir

            model = ir.load(self.work / self.man["graphs"]["toptheta_measure"])
            inits = model.graph.initializers
            self._table = [
                np.asarray(inits[names.theta_name(layer)].const_value.numpy()) for layer in range(self.layers)
            ]
        return self._table

    def _union(self, scores: list[Any], theta: float | list[Any]) -> float:
        """Mean over layers, batch rows and kv heads of the fraction of keys some query head of the group keeps."""
        g = self.heads // self.kv_heads
        ths = theta if isinstance(theta, list) else [theta] * len(scores)
        fr = []
        for s, th in zip(scores, ths):
            th = th.to(s.device) if hasattr(th, "to") else th
            fr.append(float((s >= th).view(s.shape[0], self.kv_heads, g, -1).any(2).float().mean()))
        return float(np.mean(fr))

    def _bisect(self, scores: list[Any], target: float) -> float:
        lo = min(float(s.min()) for s in scores)
        hi = max(float(s.max()) for s in scores)
        for _ in range(40):
            mid = (lo + hi) / 2
            if self._union(scores, mid) > target:
                lo = mid
            else:
                hi = mid
        return hi

    def _measure(self, gen_a, tokens: np.ndarray, theta: float | None, position: int) -> dict[str, Any]:
        """One decode step of the measure graph on gen_a's buffers: V rows read (KV-group union of the kept keys,
        from the op's own Q and the cache's K), the per-head kept fraction (the op's kept output) and how many
        (layer, row, head) counts the recomputed keep decisions get wrong (fp32 ties at θ)."""
        gm = self._gen("toptheta_measure", gen_a.batch, gen_a.max_length, share=gen_a)
        gm.position = position
        step = gm.decode(tokens, advance=False)
        scores = self._scores(step, gen_a.cache, position)
        keys = position + 1
        kept = np.stack([step.extras[names.kept_name(layer)].numpy()[:, :, 0] for layer in range(self.layers)])
        ths = self._thresholds(theta, position)
        mine = np.stack([(s >= th.to(s.device)[None]).sum(-1).cpu().numpy() for s, th in zip(scores, ths)])
        return {
            "kept_fraction": float(kept.mean() / keys),
            "v_rows_fraction": self._union(scores, ths),
            "kept_rows_differing": int((mine != kept).sum()),
            "_scores": scores,
        }

    def _search_theta(self, gen_a, ids: np.ndarray, position: int, log: Callable) -> tuple[float, dict[str, Any]]:
        """θ (one value for every layer, head and row) whose measured KV-group union of kept keys is at most
        V_ROWS_LIMIT of the rows of a decode step at ``position``: bisection on the step's scores aiming at
        V_ROWS_TARGET, re-measured after a prefill with the new θ (θ changes the cache), at most 4 rounds."""
        theta, history = -math.inf, []
        self._set_theta(theta)
        first = gen_a.prefill(ids)
        dense_logits = gen_a.logits.read().astype(np.float32).copy() if gen_a.logits is not None else None
        tokens = first.tokens
        for round_ in range(5):
            m = self._measure(gen_a, tokens, theta, position)
            history.append(
                {"theta": theta if math.isfinite(theta) else str(theta), "v_rows_fraction": m["v_rows_fraction"]}
            )
            if (math.isfinite(theta) and m["v_rows_fraction"] <= V_ROWS_LIMIT) or round_ == 4:
                break
            theta = self._bisect(m["_scores"], V_ROWS_TARGET)
            self._set_theta(theta)
            tokens = gen_a.prefill(ids).tokens
        log(
            f"  θ = {theta:.4f} at context {position}: V rows {history[-1]['v_rows_fraction']:.3f} "
            f"({len(history)} measurements)"
        )
        return theta, {"theta": theta, "rounds": history, "dense_logits": dense_logits, "tokens": tokens}

    def _time_prefill(self, gen, ids: np.ndarray) -> dict[str, Any]:
        timer = _Timer(self.stream)
        t = time.perf_counter()
        busy, kernels = _profiled(lambda: gen.prefill(ids), 1, self.cuda)  # warm-up, profiled
        first_s = time.perf_counter() - t
        reps = 1 if first_s > 1.5 else 2 if first_s > 0.3 else 3
        gen.run_hook = timer
        try:
            for _ in range(reps):
                out = gen.prefill(ids)
        finally:
            gen.run_hook = None
        return {
            "gpu_ms": _median(timer.gpu),
            "wall_ms": _median(timer.wall),
            "busy_ms": busy,
            "kernels": kernels,
            "tokens": out.tokens,
        }

    def _time_decode(self, gen, tokens: np.ndarray) -> dict[str, Any]:
        for _ in range(2):  # the first one captures the CUDA graph
            gen.decode(tokens, advance=False)
        busy, kernels = _profiled(lambda: gen.decode(tokens, advance=False), 3, self.cuda)
        trace = timeline(lambda: gen.decode(tokens, advance=False), self.cuda) if self.trace else None
        timer = self._timed_steps(gen, tokens)
        return {
            "gpu_ms": _median(timer.gpu),
            "wall_ms": _median(timer.wall),
            "busy_ms": busy,
            "kernels": kernels,
            "cuda_graph": gen.graph_id is not None,
            "timeline": trace,
            "_gpu": timer.gpu,
            "_wall": timer.wall,
        }

    def _timed_steps(self, gen, tokens: np.ndarray) -> _Timer:
        """``self.steps`` decode steps at the same position, each timed (GPU events and host clock)."""
        timer = _Timer(self.stream)
        gen.run_hook = timer
        try:
            for _ in range(self.steps):
                gen.decode(tokens, advance=False)
        finally:
            gen.run_hook = None
        return timer

    def _time_again(self, first: dict[str, Any] | None, gen, tokens: np.ndarray) -> dict[str, Any] | None:
        """``first`` with a second round of timed steps pooled in (its medians over both rounds): (a) and (c) are
        timed a, c, a, c, so that a drift of the clocks between the rounds falls on both graphs alike."""
        if first is None:
            return None
        timer = self._timed_steps(gen, tokens)
        gpu, wall = first["_gpu"] + timer.gpu, first["_wall"] + timer.wall
        return {**first, "gpu_ms": _median(gpu), "wall_ms": _median(wall), "_gpu": gpu, "_wall": wall}

    def _scores_gb(self, batch: int, context: int) -> float:
        """Bytes of the dense export's S x S attention scores of one layer (plus its bool mask), in GB."""
        return batch * context * context * (self.heads * self.elem + 1) / 1e9

    def _bytes(self, batch: int, keys: int, v_rows: float | None) -> tuple[float, float | None]:
        w = float(self.man["streamed_weight_bytes"])
        k = self.layers * batch * self.kv_heads * keys * self.head_dim * self.elem
        dense = w + 2 * k
        return dense, (w + k * (1 + v_rows)) if v_rows is not None else None

    # -- the grid ----------------------------------------------------------------------------------------------------

    def run(self, contexts: Sequence[int], batches: Sequence[int], budget: _Budget, log: Callable) -> list[dict]:
        rows: list[dict[str, Any]] = []
        max_pos = self.man.get("max_positions")
        ctxs = sorted(int(c) for c in contexts)
        for c in [c for c in ctxs if max_pos and c > max_pos]:
            self.info["skipped"].append(f"context {c}: beyond the model's {max_pos} positions")
        ctxs = [c for c in ctxs if not max_pos or c <= max_pos]
        later: list[tuple[int, int]] = []
        for c in ctxs:
            if budget.left() < 0:
                self.info["skipped"].append(f"context {c}: time budget spent")
                continue
            try:
                rows += self._context(c, sorted(int(b) for b in batches), log)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: the other contexts stay
                self.info["skipped"].append(f"context {c}: {e}")
                log(f"  context {c} failed: {e}")
            later += [(b, c) for b in batches if b > 1]
            if self.cuda:
                self.torch.cuda.empty_cache()
        for b, c in sorted(later, key=lambda bc: bc[0] * bc[1]):  # prefill at batch > 1: cheapest first
            if budget.left() < 0:
                self.info["skipped"].append(f"prefill {b} x {c}: time budget spent")
                continue
            try:
                rows.append(self._prefill_row(b, c, log))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: the other rows stay
                self.info["skipped"].append(f"prefill {b} x {c}: {e}")
                log(f"  prefill {b} x {c} failed: {e}")
            if self.cuda:
                self.torch.cuda.empty_cache()
        return rows

    def _row(self, c: int, b: int, phase: str) -> dict[str, Any]:
        return {"model": self.man["name"], "dtype": self.man["dtype"], "context": c, "batch": b, "phase": phase}

    def _guard(self, errors: dict[str, str], key: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, or None with the one-line reason in ``errors[key]`` (one graph failing keeps the others' rows)."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - onnxruntime and CUDA errors of one graph are recorded, not fatal
            errors[key] = " ".join(str(e).split())[:300] or type(e).__name__
            if self.cuda:
                self.torch.cuda.empty_cache()
            return None

    def _context(self, c: int, batches: list[int], log: Callable) -> list[dict[str, Any]]:
        """θ at context c, the decode rows of every batch (caches replicated from one batch-1 prefill), the batch-1
        prefill row."""
        length = c + 2
        log(f"{self.man['name']}: context {c}")
        ga = self._gen("toptheta", 1, length)
        ids = self._ids(1, c)
        if self.search:
            theta, search = self._search_theta(ga, ids, c, log)
            self.info["theta_by_context"][str(c)] = {"theta": theta, "rounds": search["rounds"]}
        else:
            theta, search = None, {"tokens": ga.prefill(ids).tokens, "dense_logits": None}
        pre_a = self._time_prefill(ga, ids)
        rows = []
        for b in batches:
            errors: dict[str, str] = {}
            decode = functools.partial(self._decode_row, ga, b, c, pre_a["tokens"], theta, log)
            row = self._guard(errors, "toptheta", decode)
            if row is None:
                self.info["skipped"].append(f"decode {b} x {c}: {errors['toptheta']}")
                log(f"  decode {b} x {c} failed: {errors['toptheta']}")
            else:
                rows.append(row)
        errors = {}
        gc = self._gen("dense_gqa", 1, length)
        pre_c = self._guard(errors, "dense_gqa", lambda: self._time_prefill(gc, ids))
        if pre_c is not None and search.get("dense_logits") is not None and gc.logits is not None:
            self.info.setdefault("dense_parity", {})[str(c)] = float(
                np.abs(gc.logits.read().astype(np.float32) - search["dense_logits"]).max()
            )
        gc = None  # frees its buffers
        pre_b = self._dense_prefill(errors, 1, c, ids, length)
        rows.insert(0, self._prefill_fields(self._row(c, 1, "prefill"), pre_a, pre_b, pre_c, errors, 1, c))
        return rows

    def _dense_prefill(self, errors: dict[str, str], b: int, c: int, ids: np.ndarray, length: int) -> Any:
        if self._scores_gb(b, c) > self.max_scores_gb:
            errors["dense"] = (
                f"skipped: the dense export's S x S scores need {self._scores_gb(b, c):.0f} GB > "
                f"{self.max_scores_gb:.0f} GB"
            )
            return None
        gb = self._gen("dense", b, length)
        return self._guard(errors, "dense", lambda: self._time_prefill(gb, ids))

    def _prefill_fields(self, row, pre_a, pre_b, pre_c, errors, b, c) -> dict[str, Any]:
        row.update(_timings(pre_a, pre_b, pre_c, v_rows_fraction=None, ceiling=None))
        if errors:
            row["errors"] = dict(errors)
        _speedups(row)
        return row

    def _decode_row(self, ga1, b: int, c: int, tokens1: np.ndarray, theta: float | None, log: Callable) -> dict:
        length = ga1.max_length
        errors: dict[str, str] = {}
        ga = self._gen("toptheta", b, length)
        for dst, src in zip(ga.cache, ga1.cache):
            dst.tensor.copy_(src.tensor.expand(b, *src.tensor.shape[1:]))
        ga.start_at(c)
        tokens = np.repeat(tokens1, b)
        dec_a = self._time_decode(ga, tokens)
        m = self._guard(errors, "toptheta_measure", lambda: self._measure(ga, tokens, theta, c)) or {}
        gc = self._gen("dense_gqa", b, length, share=ga)
        gc.position = c
        dec_c = self._guard(errors, "dense_gqa", lambda: self._time_decode(gc, tokens))
        dec_a = self._time_again(dec_a, ga, tokens) or dec_a
        dec_c = self._guard(errors, "dense_gqa", lambda: self._time_again(dec_c, gc, tokens)) or dec_c
        gc = None  # frees its buffers

        def dense():
            gb = self._gen("dense", b, length)
            past = [self.buffers.empty([b, h, c, d], ga.sig.cache_type) for h, d in gb.sig.kv_shapes]
            for dst, src in zip(past, ga.cache):
                dst.tensor.copy_(src.tensor[:, :, :c])
            gb.set_past(past, c)
            return self._time_decode(gb, tokens)

        dec_b = self._guard(errors, "dense", dense)
        ga = None
        v_rows = m.get("v_rows_fraction")
        dense_bytes, tt_bytes = self._bytes(b, c + 1, v_rows)
        ceiling = dense_bytes / tt_bytes if tt_bytes else None
        row = self._row(c, b, "decode")
        row.update(_timings(dec_a, dec_b, dec_c, v_rows_fraction=v_rows, ceiling=ceiling))
        row.update(
            kept_fraction=m.get("kept_fraction"),
            kept_rows_differing=m.get("kept_rows_differing"),
            theta=theta,
            dense_bytes=dense_bytes,
            toptheta_bytes=tt_bytes,
            cuda_graph={
                "toptheta": dec_a["cuda_graph"],
                "dense": _get(dec_b, "cuda_graph"),
                "dense_gqa": _get(dec_c, "cuda_graph"),
            },
        )
        if errors:
            row["errors"] = errors
        _speedups(row)
        log(
            f"  decode {b} x {c}: Top-θ {_fmt(row['toptheta_ms'])} ms, dense {_fmt(row['dense_ms'])}, "
            f"GQA {_fmt(row['dense_gqa_ms'])}; V rows {_fmt(v_rows)}, ceiling {_fmt(row['ceiling'])}"
            + (f"; errors {errors}" if errors else "")
        )
        return row

    def _prefill_row(self, b: int, c: int, log: Callable) -> dict[str, Any]:
        length = c + 2
        if self.search:
            self._set_theta(float(self.info["theta_by_context"][str(c)]["theta"]))
        ids = self._ids(b, c)
        errors: dict[str, str] = {}
        ga = self._gen("toptheta", b, length)
        pre_a = self._time_prefill(ga, ids)
        ga = None
        gc = self._gen("dense_gqa", b, length)
        pre_c = self._guard(errors, "dense_gqa", lambda: self._time_prefill(gc, ids))
        gc = None  # frees its buffers
        pre_b = self._dense_prefill(errors, b, c, ids, length)
        row = self._prefill_fields(self._row(c, b, "prefill"), pre_a, pre_b, pre_c, errors, b, c)
        log(
            f"  prefill {b} x {c}: Top-θ {_fmt(row['toptheta_ms'])} ms, dense {_fmt(row['dense_ms'])}, "
            f"GQA {_fmt(row['dense_gqa_ms'])}" + (f"; {errors}" if errors else "")
        )
        return row


def _speedups(row: dict[str, Any]) -> None:
    """dense time / Top-θ time against (c) and (b), and against (c) as a fraction of the bytes ceiling."""
    if row["dense_gqa_ms"] and row["toptheta_ms"]:
        row["speedup_vs_gqa"] = row["dense_gqa_ms"] / row["toptheta_ms"]
        if row.get("ceiling"):
            row["ceiling_fraction_vs_gqa"] = row["speedup_vs_gqa"] / row["ceiling"]
    if row["dense_ms"] and row["toptheta_ms"]:
        row["speedup_vs_dense"] = row["dense_ms"] / row["toptheta_ms"]


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def render_markdown(rows: list[dict[str, Any]], info: dict[str, Any], models: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (GPU ms by CUDA events; speed-ups = dense time / Top-θ time)."""
    head = (
        f"Device: {info.get('device')} ({info.get('sms', '-')} SMs), {info.get('date')}; onnxruntime "
        f"{info.get('onnxruntime')}, torch {info.get('torch')}, CUDA {info.get('cuda', '-')}; "
        f"{info.get('seconds', '-')} s"
    )
    lines = [head, ""]
    for m in models:
        lines.append(
            f"* {m['name']} ({m['dtype']}): CUDA graphs {m['cuda_graph']}; θ {m['theta'].get('mode')}; "
            + "; ".join(f"{k}: {v}" for k, v in m.get("notes", {}).items())
            + ("; skipped: " + "; ".join(m["skipped"]) if m.get("skipped") else "")
        )
    lines += [
        "",
        "| model | ctx | B | phase | Top-θ ms | dense ms | GQA ms | Top-θ wall ms | V rows | ceiling | vs GQA | "
        "vs dense | Top-θ kernels |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["model"], r["phase"] != "decode", r["context"], r["batch"])):
        lines.append(
            f"| {r['model']} | {r['context']} | {r['batch']} | {r['phase']} | {_fmt(r['toptheta_ms'])} | "
            f"{_fmt(r['dense_ms'])} | {_fmt(r['dense_gqa_ms'])} | {_fmt(r['toptheta_wall_ms'])} | "
            f"{_fmt(r['v_rows_fraction'])} | {_fmt(r['ceiling'])} | {_fmt(r.get('speedup_vs_gqa'))} | "
            f"{_fmt(r.get('speedup_vs_dense'))} | {', '.join(r['kernels']) or '-'} |"
        )
    return "\n".join(lines) + "\n"

"""Nodes per decoder layer of the end-to-end bench's graphs (Top-θ, dense export, GroupQueryAttention twin), unfused
and fused (topthetaexport.onnx.fusions.FuseForOrt), as written and after onnxruntime's own session optimizer.

A shape of ``topthetaexport.ort.e2e.SHAPES`` (default qwen2.5-1.5b: 12/2 heads, head dim 128, hidden 1536) is
exported with random weights twice, with 2 and 3 layers and a small MLP and vocabulary (node counts do not depend on
those sizes); a layer's nodes are the difference of the two graphs, what is left is the per-step part outside the
layers. onnxruntime's optimizer runs on the CPU EP here (ORT_ENABLE_ALL, as the bench's sessions): on CUDA it fuses
the same way, but the CPU EP adds Casts around float16 nodes it has no float16 kernel for, so Casts are counted
apart.

    python bench/node_counts.py --out bench/results/node-counts-qwen2.5-1.5b-fp16.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

try:
    import topthetaexport  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRAPHS = ("toptheta", "dense", "dense_gqa")


def _op(node) -> str:
    domain = getattr(node, "domain", "")
    return (domain + "::" if domain not in ("", "ai.onnx") else "") + node.op_type


def _export(shape: str, layers: int, dtype: str, where: Path) -> tuple[Path, Path, int]:
    import torch
    from transformers import AutoModelForCausalLM

    from topthetaexport.models import load_model
    from topthetaexport.onnx.exporter import TORCH_DTYPES, export_onnx
    from topthetaexport.onnx.rewriter import rewrite
    from topthetaexport.ort import e2e

    cfg = e2e.shape_config(shape)
    cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size = layers, 256, 1000
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=TORCH_DTYPES[dtype]).eval()
    loaded = load_model(model, dtype=TORCH_DTYPES[dtype])
    loaded.name = f"{shape}-{layers}"
    dense = export_onnx(loaded, where / "dense.onnx")
    rewrite(dense, e2e._placeholder_thresholds(loaded), where / "toptheta.onnx")
    return dense, where / "toptheta.onnx", int(cfg.max_position_embeddings)


def _counts(dense: Path, tt: Path, positions: int, where: Path, library: str | None) -> dict[str, Counter]:
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    from topthetaexport.ort import e2e
    from topthetaexport.ort.library import session_options

    out: dict[str, Counter] = {}
    for fuse in (False, True):
        models = e2e.graph_set(dense, tt, theta_input=True, fuse_positions=positions if fuse else None)
        for key in GRAPHS:
            tag = f"{key}{'+fused' if fuse else ''}"
            out[tag] = Counter(_op(n) for n in models[key].graph)
            path = where / f"{tag}.onnx"
            ir.save(models[key], path)
            so = session_options(library=library)
            so.optimized_model_filepath = str(where / f"{tag}.ort.onnx")
            ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            g = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
            out[tag + " ort"] = Counter(_op(n) for n in g.node)
    return out


def _fmt(c: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-1.5b")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--library", help="libtoptheta_ops.so (default: TOPTHETA_OPS_LIBRARY or the installed one)")
    ap.add_argument("--out", help="write the Markdown table here too")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="node-counts-") as tmp:
        counts = {}
        for layers in (2, 3):
            where = Path(tmp) / str(layers)
            where.mkdir()
            dense, tt, positions = _export(args.shape, layers, args.dtype, where)
            counts[layers] = _counts(dense, tt, positions, where, args.library)
    lines = [
        f"Nodes per layer, {args.shape}-shaped {args.dtype} decoder (bench/node_counts.py); 'ort' = after "
        "onnxruntime's optimizer (CPU EP, ORT_ENABLE_ALL), Casts counted apart (the CPU EP's float16 fallbacks)",
        "",
        "| graph | per layer | per layer, no Casts | outside the layers | per layer: nodes |",
        "|---|---|---|---|---|",
    ]
    for tag in counts[2]:
        per = counts[3][tag] - counts[2][tag]
        rest = counts[2][tag] - per - per
        casts = per.get("Cast", 0)
        lines.append(
            f"| {tag} | {sum(per.values())} | {sum(per.values()) - casts} | {sum(rest.values())} | {_fmt(per)} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

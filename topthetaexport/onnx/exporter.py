"""Dense ONNX export of a Hugging Face model (torch.onnx dynamo exporter, opset 23).

Every attention block comes out as one ONNX ``Attention`` node (the model runs with
``attn_implementation="sdpa"`` during export); ``topthetaexport.rewrite`` later replaces those nodes.
Graph inputs/outputs are described in docs/graph.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .._errors import TopThetaError
from .._io import atomic_path
from ..progress import Progress, emitter
from . import names as _names
from .names import META_PREFIX

__all__ = ["EXTERNAL_DATA_THRESHOLD", "META_PREFIX", "export_onnx", "input_names", "output_names"]

EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of parameters above which weights go to model.onnx.data
_SAMPLE_BATCH, _SAMPLE_SEQ, _SAMPLE_PAST = 2, 5, 3
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# -- graph signature ---------------------------------------------------------------------------------


def input_names(num_layers: int, *, lm: bool, with_cache: bool) -> list[str]:
    names = [_names.INPUT_IDS, _names.ATTENTION_MASK]
    if lm and with_cache:
        names += [_names.past_name(i, kv) for i in range(num_layers) for kv in _names.KV_KINDS]
    return names


def output_names(num_layers: int, *, lm: bool, with_cache: bool) -> list[str]:
    if not lm:
        return [_names.LAST_HIDDEN_STATE]
    names = [_names.LOGITS]
    if with_cache:
        names += [_names.present_name(i, kv) for i in range(num_layers) for kv in _names.KV_KINDS]
    return names


# -- wrappers that give the model a flat tensor signature --------------------------------------------


def _positions(input_ids, past_len):
    """position_ids ``past_len .. past_len+S-1`` for every row (HF's default), materialised per batch row.

    onnxruntime's RotaryEmbedding wants cos/sin caches with the batch size of its input, so the positions
    must not be a broadcast [1, S] tensor.
    """
    b, s = input_ids.shape
    return (torch.arange(s, device=input_ids.device) + past_len).unsqueeze(0).expand(b, s)


class _DecoderWithCache(torch.nn.Module):
    """(input_ids, attention_mask, (k0, v0, k1, v1, ...)) -> (logits, present k0, v0, ...)."""

    def __init__(self, model: torch.nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=_positions(input_ids, past[0].shape[2]),
            use_cache=True,
        )
        flat = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


class _DecoderNoCache(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, position_ids=_positions(input_ids, 0)
        ).logits


class _Encoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _sample_inputs(loaded, lm: bool, with_cache: bool, batch_dynamic: bool = True):
    """Example tensors and ``dynamic_shapes`` for torch.export."""
    from torch.export import Dim

    vocab = int(getattr(loaded.model.config, "vocab_size", 2) or 2)
    g = torch.Generator().manual_seed(0)
    b, s, p = (_SAMPLE_BATCH if batch_dynamic else 1), _SAMPLE_SEQ, (_SAMPLE_PAST if with_cache else 0)
    ids = torch.randint(0, vocab, (b, s), generator=g, dtype=torch.long)
    mask = torch.ones(b, p + s, dtype=torch.long)
    batch, seq = Dim("batch"), Dim("sequence")
    if not (lm and with_cache):
        return (ids, mask), {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    past_len, total = Dim("past_sequence"), Dim("total_sequence")
    shape = (b, loaded.num_kv_heads, p, loaded.head_dim)
    dtype = next(loaded.model.parameters()).dtype
    past = tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(2 * loaded.num_layers))
    dyn = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "past": tuple({0: batch, 2: past_len} for _ in past),
    }
    return (ids, mask, past), dyn


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's warnings and log chatter for the duration."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)


def _export_attention(loaded) -> str:
    """The attention implementation the export traces: sdpa (one ONNX Attention node per block), or for
    models whose scores sdpa cannot compute (Gemma 2's softcap) the one of onnx/softcap.py."""
    if loaded.architecture.attn_implementation == "sdpa":
        return "sdpa"
    from .softcap import SOFTCAP_IMPL, register

    register()
    return SOFTCAP_IMPL


@contextlib.contextmanager
def _attention_impl(model: Any, impl: str) -> Iterator[None]:
    """Run ``model`` with ``attn_implementation=impl`` for the duration (restored afterwards)."""
    cfg = model.config
    before = getattr(cfg, "_attn_implementation", None)
    if before != impl:
        model.set_attn_implementation(impl)
    try:
        yield
    finally:
        if before is not None and before != impl:
            model.set_attn_implementation(before)


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _model_metadata(loaded, lm: bool, with_cache: bool) -> dict[str, str]:
    from .. import __version__

    cfg = loaded.model.config
    window = loaded.architecture.sliding_window(cfg)
    meta = {
        "version": __version__,
        "model": loaded.name,
        "model_type": loaded.model_type,
        "causal": int(bool(loaded.causal)),
        "is_lm": int(lm),
        "with_cache": int(with_cache),
        "num_layers": loaded.num_layers,
        "num_heads": loaded.num_heads,
        "num_kv_heads": loaded.num_kv_heads,
        "head_dim": loaded.head_dim,
        "sliding_window": int(window or 0),
    }
    return {META_PREFIX + k: str(v) for k, v in meta.items()}


# -- the export --------------------------------------------------------------------------------------


def export_onnx(
    loaded,
    out_path,
    *,
    with_cache: bool | None = None,
    opset: int = 23,
    batch_dynamic: bool = True,
    dtype: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Export ``loaded`` (a ``LoadedModel``) densely to ``out_path`` and return the path.

    Decoder LMs get a KV-cache signature (``with_cache`` defaults to True); encoders get
    ``input_ids``/``attention_mask`` -> ``last_hidden_state``. Weights go to ``<name>.data`` when the model
    is larger than 1 GB. The file is written atomically and checked with ``onnx.checker``.
    ``dtype`` ('float32', 'float16', 'bfloat16'; None = the model's own) is the dtype of the weights, the
    KV cache and the outputs of the graph: a model in another dtype is exported from a cast copy (the
    caller's model is left as it is, e.g. float32 for calibration and validation).
    """
    from ..models import load_model
    from ..options import DTYPES

    if dtype is not None and dtype not in TORCH_DTYPES:
        raise TopThetaError(f"unknown export dtype {dtype!r}: use one of {', '.join(DTYPES[1:])}")
    loaded = load_model(loaded)
    if dtype is not None and next(loaded.model.parameters()).dtype != TORCH_DTYPES[dtype]:
        loaded = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).to(TORCH_DTYPES[dtype]))
    prog = emitter(progress, "export")
    out_path = Path(out_path)
    if out_path.is_dir() or out_path.suffix != ".onnx":
        raise TopThetaError(
            f"ONNX output path {out_path} must be a file ending in .onnx: pass e.g. "
            f"{out_path / 'model.onnx' if out_path.is_dir() else out_path.with_suffix('.onnx')}"
        )
    if opset < 23:
        raise TopThetaError(f"opset {opset} has no Attention operator: use opset 23 or newer")
    lm = bool(loaded.causal and loaded.is_lm)
    if with_cache is None:
        with_cache = lm
    if with_cache and not lm:
        raise TopThetaError(
            f"{loaded.name} is not a causal language model, so it has no KV cache to export: "
            "export it with with_cache=False"
        )
    model = loaded.model.eval()
    wrapper: torch.nn.Module
    if lm:
        wrapper = _DecoderWithCache(model, loaded.num_layers) if with_cache else _DecoderNoCache(model)
    else:
        wrapper = _Encoder(model)
    wrapper.eval()
    args, dyn = _sample_inputs(loaded, lm, with_cache, batch_dynamic)
    if not batch_dynamic:
        dyn = _fix_batch(dyn)
    names_in = input_names(loaded.num_layers, lm=lm, with_cache=with_cache)
    names_out = output_names(loaded.num_layers, lm=lm, with_cache=with_cache)
    external = _param_bytes(model) > EXTERNAL_DATA_THRESHOLD

    prog(f"exporting {loaded.name} to ONNX (opset {opset})", 0.0)
    t0 = time.perf_counter()
    program = _run_exporter(wrapper, args, dyn, opset, names_in, names_out, loaded.name, _export_attention(loaded))
    prog(f"traced in {time.perf_counter() - t0:.0f} s; optimizing the graph", 0.7)
    with _quiet():
        optimize_graph(program.model)
    prog(f"optimized in {time.perf_counter() - t0:.0f} s; saving", 0.85)
    program.model.metadata_props.update(_model_metadata(loaded, lm, with_cache))
    write_onnx(program.model, out_path, external)
    prog(f"exported {out_path} in {time.perf_counter() - t0:.0f} s", 1.0)
    return out_path


def _cleanup_rules():
    """Cheap local rewrites of onnxscript's default set (its slice-splitting rule is quadratic: skipped)."""
    from onnxscript.rewriter.rules import common as r

    return [
        r.add_0_rule,
        r.sub_0_rule,
        r.mul_by_1_rule,
        r.div_by_1_rule,
        r.dropout_inference_rule,
        r.dropout_zero_rule,
        r.no_op_cast_rule,
        r.no_op_expand_rule,
        r.no_op_transpose_rule,
        r.cast_cast_rule,
        r.reshape_reshape_rule,
        r.unsqueeze_unsqueeze_rule,
        r.squeeze_reshape_1d_rule,
        r.transpose_transpose_rule,
        r.collapse_slice_rule,
        r.collapse_slice2_rule,
        r.materialize_reshape_shape_rule,
        r.cast_constant_of_shape_rule,
    ]


def optimize_graph(model) -> None:
    """Constant folding, local clean-ups, ONNX fusions (RMSNormalization, RotaryEmbedding, ...), CSE; in place.

    Replaces the exporter's own ``optimize=True``, which spends minutes on 30-layer models in one rule.
    """
    from onnx_ir.passes import common
    from onnxscript import optimizer, rewriter
    from onnxscript.rewriter import onnx_fusions, pattern

    from .fusions import RmsNormInputCast

    rules = _cleanup_rules()
    for _ in range(2):
        optimizer.fold_constants(model)
        rewriter.rewrite(model, pattern_rewrite_rules=rules)
    onnx_fusions.fuse(model)
    # a norm scaled in float32 fuses with its float16/bfloat16 input uncast, which neither onnx nor onnxruntime take
    pattern.RewriteRuleSet([RmsNormInputCast.rule()]).apply_to_model(model)
    for p in (
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.RemoveUnusedOpsetsPass(),
    ):
        p(model)


def _fix_batch(dyn):
    def fix(d):
        if isinstance(d, tuple):
            return tuple(fix(x) for x in d)
        return {k: v for k, v in d.items() if k != 0}

    return {k: fix(v) for k, v in dyn.items()}


def _run_exporter(wrapper, args, dyn, opset, names_in, names_out, name, impl: str = "sdpa"):
    table = None
    if impl != "sdpa":
        from .softcap import translation_table

        table = translation_table()
    with _quiet(), _attention_impl(wrapper.model, impl), torch.no_grad():
        try:
            return torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=dyn,
                input_names=names_in,
                output_names=names_out,
                verbose=False,
                report=False,
                optimize=False,
                custom_translation_table=table,
            )
        except TopThetaError:
            raise
        except Exception as e:  # noqa: BLE001 - any export failure becomes the one-line error
            raise TopThetaError(
                f"torch.onnx.export failed for {name} ({type(e).__name__}: {_first_line(e)}): "
                f"check that the model runs in PyTorch with attn_implementation='{impl}'"
            ) from None


def write_onnx(model, out_path: Path, external: bool, check: bool = True) -> Path:
    """Save an ``onnx_ir.Model`` atomically (``<name>.data`` holds the weights when ``external``), then check it
    (``check=False``: no onnx.checker, for graphs with onnxruntime-only ops the checker does not know).

    The files are written in a temporary directory under their final names, so the external-data reference
    stays right; the data file is moved into place first and the ``.onnx`` last.
    """
    import onnx_ir as ir

    out_path = Path(out_path)
    data_name = out_path.name + ".data"
    with atomic_path(out_path) as tmp:
        if external:
            ir.save(model, tmp, external_data=data_name)
        else:
            ir.save(model, tmp)
        if check:
            check_onnx(tmp, external)
        if external:
            os.replace(tmp.with_name(data_name), out_path.with_name(data_name))
        else:
            out_path.with_name(data_name).unlink(missing_ok=True)  # stale weights of an earlier export
    return out_path


def check_onnx(path: Path, external: bool) -> None:
    """onnx.checker: full check for single files, path-based check with external data."""
    import onnx

    try:
        if external:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    except Exception as e:  # noqa: BLE001 - any checker failure becomes the one-line error
        raise TopThetaError(
            f"the exported ONNX model failed onnx.checker ({_first_line(e)}): this is a bug, "
            "please report it with the model config"
        ) from None

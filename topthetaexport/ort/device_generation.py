"""Greedy generation with the inputs, the outputs and the KV cache on the device (onnxruntime IOBinding).

``DeviceSession`` opens a model (Top-θ, dense export or its GroupQueryAttention twin) for device-resident decoding:
the graph gets last-token logits and a greedy ``toptheta.next_token`` output (``onnx.decoding``), the CUDA EP gets
``enable_cuda_graph`` (and, optionally, the caller's stream as ``user_compute_stream``). ``DeviceGenerator`` holds
one batch's buffers and runs prefill and decode steps:

* shared-buffer form (``past_sequence_length`` input, docs/graph.md): one buffer ``[B, Hkv, M, D]`` per layer and
  kind, bound as ``past_key_values.{i}.*`` and as ``present.{i}.*``, written in place by the attention op; the mask
  ``[B, M]`` is written once per prompt (1 on the prompt's real tokens and on every slot after it: slots past the
  valid length are not read), the one-token input and ``past_sequence_length`` are updated in place each step
  (``OrtValue.update_inplace``). A graph with the shadow K pair (``onnx.kv_cache.AddShadowK``) gets its buffers the
  same way, zero-filled once, bound as ``past_shadow.{i}.*`` and ``present_shadow.{i}.*``. Decode steps run as an ORT
  CUDA graph (run config ``gpu_graph_id``: -1 for the prefill, one fixed id per generator for decode); when
  onnxruntime refuses to capture the graph the session is opened without CUDA graphs and ``DeviceSession.note`` says
  why.
* concat form (the export as is): past and present are device OrtValues handed from one step to the next (no copy to
  the host); the cache still grows by a Concat each step, and the shapes change, so there is no CUDA graph.

Batch > 1 takes left-padded prompts (``attention_mask`` ``[B, S]``, 0 on the padding). The same code runs on the CPU
(``device="cpu"``: OrtValues in host memory, no CUDA graphs), where the tests check it against ``OnnxModel``.
Timing (``GenerationResult``): prefill ms and decode ms/step and tokens/s, host wall clock around each
``run_with_iobinding`` (which returns after the device finished) plus the read-back of the B next tokens.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .._errors import TopThetaError
from ..onnx import names
from . import library as runtime

__all__ = [
    "DeviceGenerator",
    "DeviceSession",
    "GenerationResult",
    "OrtBuffers",
    "generate",
    "left_pad",
]

GPU_GRAPH_ID = "gpu_graph_id"  # onnxruntime run config key: which captured CUDA graph a Run uses (-1: none)
_ORT_TYPES = {
    "tensor(float)": (np.float32, 1),
    "tensor(float16)": (np.float16, 10),
    "tensor(bfloat16)": (None, 16),
    "tensor(int64)": (np.int64, 7),
    "tensor(int32)": (np.int32, 6),
    "tensor(bool)": (np.bool_, 9),
    "tensor(uint8)": (np.uint8, 2),
}


# -- buffers ---------------------------------------------------------------------------------------------------


class Buffer(Protocol):
    """Device memory a generator binds: an OrtValue here, a torch tensor in bench/e2e.py."""

    shape: tuple[int, ...]

    def bind_input(self, binding: Any, name: str) -> None: ...
    def bind_output(self, binding: Any, name: str) -> None: ...
    def write(self, array: np.ndarray) -> None: ...
    def read(self) -> np.ndarray: ...


class OrtValueBuffer:
    def __init__(self, value: Any, shape: Sequence[int]):
        self.value, self.shape = value, tuple(int(s) for s in shape)

    def bind_input(self, binding: Any, name: str) -> None:
        binding.bind_ortvalue_input(name, self.value)

    def bind_output(self, binding: Any, name: str) -> None:
        binding.bind_ortvalue_output(name, self.value)

    def write(self, array: np.ndarray) -> None:
        self.value.update_inplace(np.ascontiguousarray(array))

    def read(self) -> np.ndarray:
        return self.value.numpy()


class OrtBuffers:
    """Buffers as onnxruntime OrtValues on ``device`` ('cuda' or 'cpu')."""

    def __init__(self, device: str):
        self.device = device

    def empty(self, shape: Sequence[int], ort_type: str) -> OrtValueBuffer:
        import onnxruntime as ort

        np_type, onnx_type = _ORT_TYPES[ort_type]
        if self.device == "cpu" and np_type is not None:  # zeroed host memory (the OrtValue keeps the array alive)
            return OrtValueBuffer(ort.OrtValue.ortvalue_from_numpy(np.zeros(list(shape), np_type)), shape)
        element: Any = np_type if np_type is not None else onnx_type
        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), element, self.device, 0)  # not zeroed
        return OrtValueBuffer(value, shape)

    def from_numpy(self, array: np.ndarray) -> OrtValueBuffer:
        import onnxruntime as ort

        array = np.ascontiguousarray(array)
        return OrtValueBuffer(ort.OrtValue.ortvalue_from_numpy(array, self.device, 0), array.shape)


# -- the session -------------------------------------------------------------------------------------------------


@dataclass
class _Signature:
    form: str  # "shared" | "concat"
    past: list[str]  # past_key_values.{i}.key/value in layer order
    present: list[str]
    cache_type: str  # ORT type string of the cache
    kv_shapes: list[tuple[int, int]]  # (heads, head size) per past input
    vocab: int | None
    extra_inputs: list[str]  # inputs the generator does not feed itself
    extra_outputs: list[str]  # outputs it does not bind to its own buffers (kept counts, exposed attention io)
    has_next_token: bool
    # shadow K pair of the shared cache (onnx.kv_cache.AddShadowK): past_shadow.{i}.key/range, present_shadow.*, and
    # the index in ``past`` of layer i's key (whose heads and head size give the buffers' shapes)
    shadow_past: list[str] = field(default_factory=list)
    shadow_present: list[str] = field(default_factory=list)
    shadow_key_of: list[int] = field(default_factory=list)


class DeviceSession:
    """An onnxruntime session prepared for device-resident greedy decoding (module docstring).

    ``model``: an .onnx file or an output folder. ``device``: 'auto', 'cuda' or 'cpu'. ``cuda_graph``: capture decode
    steps in ORT CUDA graphs (CUDA only; refused graphs fall back, see ``note``). ``stream``: a CUDA stream handle
    (int) the session runs on (``user_compute_stream``), e.g. ``torch.cuda.Stream().cuda_stream``. ``prepare``: add
    last-token logits and the greedy next-token output when the graph lacks them (saved beside the model while the
    session opens). ``with_kept``: expose the op's kept counts (``toptheta.kept.{l}``; no CUDA graph then).
    ``provider_options``: more CUDA EP options (e.g. ``arena_extend_strategy``).
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        device: str = "auto",
        cuda_graph: bool = True,
        stream: int | None = None,
        threads: int | None = None,
        library: str | os.PathLike | None = None,
        prepare: bool = True,
        with_kept: bool = False,
        log_severity: int = 3,
        provider_options: dict[str, str] | None = None,
    ):
        path = Path(model)
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_file():
            raise TopThetaError(f"ONNX model {path} does not exist: run 'topθ-export export' first")
        self.path = path
        if device not in ("auto", "cpu", "cuda"):
            raise TopThetaError(f"unknown device '{device}': use auto, cpu or cuda")
        providers = runtime.providers_for(device)  # warns when 'cuda' falls back to the CPU
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
        self.note = ""
        load_path = self._prepared(path, with_kept) if prepare or with_kept else path
        try:
            self.sess, self.cuda_graph = self._open(
                load_path, cuda_graph, stream, threads, library, log_severity, provider_options or {}
            )
        finally:
            if load_path != path:
                load_path.unlink(missing_ok=True)
        self.providers = self.sess.get_providers()
        self.signature = self._signature()
        self._graph_ids = 0
        from ..onnx.fusions import ROTARY_ROWS_META

        rows = self.sess.get_modelmeta().custom_metadata_map.get(ROTARY_ROWS_META)
        self.max_positions = int(rows) if rows else None  # the fused rotary caches' rows, if any

    # -- opening -------------------------------------------------------------------------------------------------

    @staticmethod
    def _prepared(path: Path, with_kept: bool) -> Path:
        """The model with LastTokenLogits + GreedyNextToken (+ ExposeKept), saved beside it; ``path`` if unchanged."""
        import onnx_ir as ir

        from ..onnx.decoding import GreedyNextToken, LastTokenLogits
        from ..onnx.rewriter import load_onnx
        from ..onnx.variants import ExposeKept, op_nodes

        model = load_onnx(path)
        changed = LastTokenLogits()(model).modified
        changed |= GreedyNextToken()(model).modified
        if with_kept:
            if not op_nodes(model.graph):
                raise TopThetaError(f"{path} has no TopThetaAttention node, so it has no kept counts: drop with_kept")
            changed |= ExposeKept()(model).modified
        if not changed:
            return path
        fd, tmp = tempfile.mkstemp(prefix=".device-", suffix=".onnx", dir=path.parent)
        os.close(fd)
        try:
            ir.save(model, tmp)  # external weights keep their relative location
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def _open(self, path: Path, cuda_graph: bool, stream, threads, library, log_severity, extra) -> tuple[Any, bool]:
        import onnxruntime as ort

        lib = Path(library) if library else runtime.library_for(self.path)
        want_graph = bool(cuda_graph) and self.device == "cuda"

        def options():
            so = runtime.session_options(threads, lib)
            so.log_severity_level = int(log_severity)
            return so

        def providers(graph: bool) -> list:
            if self.device != "cuda":
                return ["CPUExecutionProvider"]
            cuda = {
                "device_id": "0",
                **{k: str(v) for k, v in extra.items()},
                "enable_cuda_graph": "1" if graph else "0",
            }
            if stream:
                cuda["user_compute_stream"] = str(int(stream))
            return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]

        try:
            return ort.InferenceSession(str(path), sess_options=options(), providers=providers(want_graph)), want_graph
        except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument types
            first = _first_line(e)
            if not (want_graph and "graph capture" in first.lower()):
                raise TopThetaError(
                    f"onnxruntime cannot load {self.path}: {first} (is it a complete ONNX file? re-export it)"
                ) from None
            self.note = f"CUDA graphs refused by onnxruntime ({first}); decode runs without them"
        try:
            return ort.InferenceSession(str(path), sess_options=options(), providers=providers(False)), False
        except Exception as e:
            raise TopThetaError(
                f"onnxruntime cannot load {self.path}: {_first_line(e)} (is it a complete ONNX file? re-export it)"
            ) from None

    def _signature(self) -> _Signature:
        ins = {i.name: i for i in self.sess.get_inputs()}
        outs = {o.name: o for o in self.sess.get_outputs()}
        past = sorted(
            (n for n in ins if names.PAST_RE.match(n)),
            key=lambda n: (int(names.PAST_RE.match(n).group(1)), names.PAST_RE.match(n).group(2) != "key"),  # type: ignore[union-attr]
        )
        if not past or names.LOGITS not in outs or names.INPUT_IDS not in ins:
            raise TopThetaError(
                f"{self.path} is not a decoder exported with the KV cache (input_ids, past_key_values.*, logits): "
                "export a decoder language model with the cache (the default)"
            )
        present = [names.PRESENT_PREFIX + n[len(names.PAST_PREFIX) :] for n in past]
        missing = [n for n in present if n not in outs]
        if missing:
            raise TopThetaError(f"{self.path} has no output {missing[0]} for its cache: re-export the model")
        form = "shared" if names.PAST_SEQUENCE_LENGTH in ins else "concat"
        kv_shapes = []
        for n in past:
            shape = ins[n].shape
            if len(shape) != 4 or not all(isinstance(s, int) for s in (shape[1], shape[3])):
                raise TopThetaError(f"{n} of {self.path} is not [batch, heads, length, head size] with static heads")
            kv_shapes.append((int(shape[1]), int(shape[3])))
        logits_shape = outs[names.LOGITS].shape
        vocab = logits_shape[-1] if logits_shape and isinstance(logits_shape[-1], int) else None
        shadow_past = sorted(
            (n for n in ins if names.PAST_SHADOW_RE.match(n)),
            key=lambda n: (int(names.PAST_SHADOW_RE.match(n).group(1)), n),  # type: ignore[union-attr]
        )
        shadow_present = [names.PRESENT_SHADOW_PREFIX + n[len(names.PAST_SHADOW_PREFIX) :] for n in shadow_past]
        if shadow_past and form != "shared":
            raise TopThetaError(f"{self.path} has shadow K inputs without the shared-buffer cache: re-export it")
        missing = [n for n in shadow_present if n not in outs]
        if missing:
            raise TopThetaError(f"{self.path} has no output {missing[0]} for its shadow K: re-export the model")
        shadow_key_of = []
        for n in shadow_past:
            key = names.past_name(int(names.PAST_SHADOW_RE.match(n).group(1)), "key")  # type: ignore[union-attr]
            if key not in past:
                raise TopThetaError(f"{self.path} has {n} but no {key}: re-export the model")
            shadow_key_of.append(past.index(key))
        own_in = {names.INPUT_IDS, names.ATTENTION_MASK, names.PAST_SEQUENCE_LENGTH, *past, *shadow_past}
        own_out = {names.LOGITS, names.NEXT_TOKEN, *present, *shadow_present}
        return _Signature(
            form=form,
            past=past,
            present=present,
            cache_type=ins[past[0]].type,
            kv_shapes=kv_shapes,
            vocab=vocab,
            extra_inputs=[n for n in ins if n not in own_in],
            extra_outputs=[n for n in outs if n not in own_out],
            has_next_token=names.NEXT_TOKEN in outs,
            shadow_past=shadow_past,
            shadow_present=shadow_present,
            shadow_key_of=shadow_key_of,
        )

    # -- generators ------------------------------------------------------------------------------------------------

    @property
    def form(self) -> str:
        return self.signature.form

    def new_graph_id(self) -> int:
        self._graph_ids += 1
        return self._graph_ids

    def generator(
        self,
        batch_size: int,
        max_length: int,
        *,
        buffers: Any = None,
        extra_inputs: dict[str, Any] | None = None,
        share: DeviceGenerator | None = None,
    ) -> DeviceGenerator:
        """A generator for ``batch_size`` rows of at most ``max_length`` tokens (prompt + new); see DeviceGenerator."""
        return DeviceGenerator(
            self, batch_size, max_length, buffers=buffers, extra_inputs=extra_inputs or {}, share=share
        )


def _call(run: Callable[[], None]) -> None:
    run()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line.replace("[ONNXRuntimeError] : ", "")[:300]


# -- one batch ----------------------------------------------------------------------------------------------------


@dataclass
class StepTiming:
    run_ms: float  # run_with_iobinding (returns when the device is done)
    step_ms: float  # the above + writing the inputs and reading back the next tokens


@dataclass
class StepOutput:
    tokens: np.ndarray  # int64 [B]: greedy next token of every row
    timing: StepTiming
    extras: dict[str, Any] = field(default_factory=dict)  # name -> OrtValue of the extra outputs (kept counts, ...)


class DeviceGenerator:
    """Buffers and bindings of one batch (``batch_size`` rows, ``max_length`` = capacity M of the shared buffers).

    ``prefill(ids, mask)`` starts a sequence (position 0), ``decode(tokens)`` runs one step at the current position
    (``advance=False`` keeps the position: the step is repeated at the same context, for benchmarks), ``generate``
    runs a whole greedy generation. ``buffers``: what allocates device memory (default ``OrtBuffers``; bench/e2e.py
    passes torch tensors). ``extra_inputs``: arrays (or buffers) for the graph's other inputs, e.g. ``toptheta.theta``;
    ``set_input`` updates one in place. ``share``: a shared-form generator of another session of the same model (e.g.
    its GroupQueryAttention twin) whose cache, mask and step buffers this one uses, from its position. ``run_hook``:
    when set, called with each Run (a no-argument callable) instead of calling it, e.g. to time it.
    """

    def __init__(
        self,
        session: DeviceSession,
        batch_size: int,
        max_length: int,
        *,
        buffers: Any = None,
        extra_inputs: dict[str, Any],
        share: DeviceGenerator | None = None,
    ):
        sig = session.signature
        if batch_size < 1 or max_length < 2:
            raise TopThetaError(
                f"batch size {batch_size} / max length {max_length}: both must be positive (length ≥ 2)"
            )
        missing = [n for n in sig.extra_inputs if n not in extra_inputs]
        if missing:
            raise TopThetaError(f"{session.path} has inputs {missing} the generator does not feed: pass extra_inputs")
        if session.max_positions is not None and max_length > session.max_positions:
            raise TopThetaError(
                f"max length {max_length} is past the {session.max_positions} positions of {session.path.name}'s "
                "rotary caches: open the generator with a smaller max_length, or rewrite with a larger --max-context"
            )
        self.session, self.sig = session, sig
        self.sess = session.sess
        self.batch, self.max_length = int(batch_size), int(max_length)
        self.buffers = buffers if buffers is not None else OrtBuffers(session.device)
        self.device_type = "cuda" if session.device == "cuda" else "cpu"
        self.extra_inputs = {n: self._as_buffer(v) for n, v in extra_inputs.items()}
        b, m = self.batch, self.max_length
        self.position = 0
        self.mask_host = np.zeros((b, 0), np.int64)
        self.next = self.buffers.empty([b, 1], "tensor(int64)") if sig.has_next_token else None
        self.logits = self.buffers.empty([b, 1, sig.vocab], sig.cache_type) if sig.vocab else None
        self.cache: list[Any] = []
        self.shadow: list[Any] = []  # the shadow K pair's buffers, in sig.shadow_past order
        self.mask: Any = None
        self.past_len: Any = None
        self.step_ids: Any = None
        if sig.form == "shared" and share is not None:
            if (
                share.sig.form != "shared"
                or (share.batch, share.max_length) != (b, m)
                or [tuple(c.shape) for c in share.cache] != [self._kv_shape(i) for i in range(len(sig.past))]
                or share.sig.shadow_past != sig.shadow_past
            ):
                raise TopThetaError(
                    "the generator to share buffers with has another cache shape (form, batch, length, heads, shadow "
                    "K): share only between graphs of one model at the same batch and length"
                )
            self.cache, self.mask, self.past_len, self.step_ids = (
                share.cache,
                share.mask,
                share.past_len,
                share.step_ids,
            )
            self.position, self.mask_host = share.position, share.mask_host
            self.shadow = share.shadow
        elif sig.form == "shared":
            self.cache = [self.buffers.empty(self._kv_shape(i), sig.cache_type) for i in range(len(sig.past))]
            self.shadow = [self._zeros(*self._shadow_shape(n, i)) for n, i in zip(sig.shadow_past, sig.shadow_key_of)]
            self.mask = self.buffers.empty([b, m], "tensor(int64)")
            self.past_len = self.buffers.empty([b], "tensor(int32)")
            self.step_ids = self.buffers.empty([b, 1], "tensor(int64)")
        elif share is not None:
            raise TopThetaError("only shared-form generators share buffers: this model has the concat-form cache")
        self.run_hook: Callable[[Callable[[], None]], None] | None = None
        self.graph_id: int | None = None
        fixed_outputs = self.next is not None and self.logits is not None and not sig.extra_outputs
        if session.cuda_graph and sig.form == "shared" and fixed_outputs:  # a captured graph needs fixed addresses
            self.graph_id = session.new_graph_id()
        self.captured = False
        self._run_prefill = self._run_options(-1)
        self._run_decode = self._run_options(self.graph_id if self.graph_id is not None else -1)
        self._decode_binding: Any = None

    # -- helpers -------------------------------------------------------------------------------------------------------

    def _kv_shape(self, i: int) -> tuple[int, int, int, int]:
        heads, dim = self.sig.kv_shapes[i]
        return (self.batch, heads, self.max_length, dim)

    def _shadow_shape(self, name: str, key: int) -> tuple[tuple[int, ...], str]:
        """Shape and type of a shadow K buffer (docs/op.md): codes uint8 [B, Hkv, M, D/2], ranges [B, Hkv, nb, 2, D]."""
        heads, dim = self.sig.kv_shapes[key]
        if name.endswith(".key"):
            return (self.batch, heads, self.max_length, dim // 2), "tensor(uint8)"
        return (self.batch, heads, -(-self.max_length // 64), 2, dim), self.sig.cache_type

    def _zeros(self, shape: tuple[int, ...], ort_type: str) -> Any:
        """A zero-filled buffer (bfloat16 written as its uint16 bits)."""
        buf = self.buffers.empty(shape, ort_type)
        buf.write(np.zeros(shape, _ORT_TYPES[ort_type][0] or np.uint16))
        return buf

    def _as_buffer(self, value: Any) -> Any:
        return self.buffers.from_numpy(np.asarray(value)) if isinstance(value, np.ndarray) else value

    def _run_options(self, graph_id: int):
        import onnxruntime as ort

        ro = ort.RunOptions()
        if self.session.cuda_graph:
            ro.add_run_config_entry(GPU_GRAPH_ID, str(graph_id))
        return ro

    def set_input(self, name: str, array: np.ndarray) -> None:
        """Update an extra input in place (the captured CUDA graph keeps reading the same buffer)."""
        if name not in self.extra_inputs:
            raise TopThetaError(f"'{name}' is not an extra input of {self.session.path}: pass it in extra_inputs")
        self.extra_inputs[name].write(np.asarray(array))

    def _bind_common(self, binding: Any) -> None:
        for n, buf in self.extra_inputs.items():
            buf.bind_input(binding, n)
        if self.logits is not None:
            self.logits.bind_output(binding, names.LOGITS)
        else:
            binding.bind_output(names.LOGITS, self.device_type, 0)
        if self.next is not None:
            self.next.bind_output(binding, names.NEXT_TOKEN)
        for n in self.sig.extra_outputs:
            binding.bind_output(n, self.device_type, 0)

    def _bind_shared(self, binding: Any, ids: Any) -> None:
        ids.bind_input(binding, names.INPUT_IDS)
        self.mask.bind_input(binding, names.ATTENTION_MASK)
        self.past_len.bind_input(binding, names.PAST_SEQUENCE_LENGTH)
        for past, present, buf in zip(self.sig.past, self.sig.present, self.cache):
            buf.bind_input(binding, past)
            buf.bind_output(binding, present)
        for past, present, buf in zip(self.sig.shadow_past, self.sig.shadow_present, self.shadow):
            buf.bind_input(binding, past)
            buf.bind_output(binding, present)
        self._bind_common(binding)

    def _tokens(self, binding: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """The next tokens (from ``toptheta.next_token``, else the argmax of the logits) and the extra outputs."""
        extras: dict[str, Any] = {}
        logits = None
        if self.sig.extra_outputs or self.logits is None:
            values, order = binding.get_outputs(), self._bound_output_order()
            extras = {n: values[order.index(n)] for n in self.sig.extra_outputs}
            if self.logits is None:
                logits = values[order.index(names.LOGITS)].numpy()
        if self.next is not None:
            return self.next.read().reshape(-1).astype(np.int64), extras
        if logits is None:
            assert self.logits is not None
            logits = self.logits.read()
        return logits[:, -1, :].astype(np.float32).argmax(-1).astype(np.int64), extras

    def _bound_output_order(self) -> list[str]:
        """Output names in the order they were bound (what IOBinding.get_outputs returns)."""
        order = list(self.sig.present) + list(self.sig.shadow_present) if self.sig.form == "shared" else []
        order += [names.LOGITS]
        order += [names.NEXT_TOKEN] if self.next is not None else []
        order += list(self.sig.extra_outputs)
        if self.sig.form == "concat":
            order += list(self.sig.present)
        return order

    def _run(self, binding: Any, run_options: Any, t0: float) -> StepOutput:
        def run() -> None:
            self.sess.run_with_iobinding(binding, run_options)

        t = time.perf_counter()
        try:
            (self.run_hook or _call)(run)
        except Exception as e:  # onnxruntime's own exception types
            if run_options is self._run_decode and self.graph_id is not None and not self.captured:
                # the first replay of a decode step captures the CUDA graph: a refused capture falls back to plain runs
                self.session.note = f"CUDA graph capture failed ({_first_line(e)}); decode runs without it"
                self.graph_id, self._run_decode = None, self._run_options(-1)
                return self._run(binding, self._run_decode, t0)
            raise TopThetaError(
                f"onnxruntime failed to run {self.session.path.name}: {_first_line(e)} (batch {self.batch}, "
                f"position {self.position}, capacity {self.max_length})"
            ) from None
        run_ms = 1e3 * (time.perf_counter() - t)
        tokens, extras = self._tokens(binding)
        return StepOutput(tokens, StepTiming(run_ms, 1e3 * (time.perf_counter() - t0)), extras)

    def start_at(self, position: int, attention_mask: np.ndarray | None = None) -> None:
        """Shared form: continue at ``position`` on a cache the caller filled (``attention_mask`` [B, position], 0 on
        padding; default all ones); nothing runs."""
        if self.sig.form != "shared":
            raise TopThetaError("start_at is for the shared-form cache; the concat form takes set_past")
        if not 0 < position <= self.max_length:
            raise TopThetaError(f"position {position} is outside the cache of {self.max_length} tokens")
        if self.sig.shadow_past:  # the op quantises blocks as it appends them; rows written elsewhere have no shadow
            raise TopThetaError(
                f"{self.session.path} has the shadow K, which start_at cannot fill for a cache written elsewhere: "
                "prefill through this generator, or use a graph without the shadow K"
            )
        mask = np.ones((self.batch, position), np.int64) if attention_mask is None else attention_mask
        full = np.ones((self.batch, self.max_length), np.int64)
        full[:, :position] = mask
        self.mask.write(full)
        self.position, self.mask_host = int(position), mask

    # -- steps ---------------------------------------------------------------------------------------------------------

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> StepOutput:
        """Run the prompt ``input_ids`` [B, S] from position 0 (``attention_mask`` 0 on left padding)."""
        t0 = time.perf_counter()
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch:
            raise TopThetaError(f"input_ids must be [{self.batch}, S] for this generator, got {list(ids.shape)}")
        s = ids.shape[1]
        if s < 1 or s > self.max_length:
            raise TopThetaError(
                f"the prompt has {s} tokens but the generator holds {self.max_length}: open it with max_length >= {s}"
            )
        mask = np.ones_like(ids) if attention_mask is None else np.ascontiguousarray(attention_mask, dtype=np.int64)
        if mask.shape != ids.shape:
            raise TopThetaError(
                f"attention_mask must have the shape of input_ids {list(ids.shape)}, got {list(mask.shape)}"
            )
        self.position = 0
        self.mask_host = mask
        binding = self.sess.io_binding()
        ids_buf = self.buffers.from_numpy(ids)
        if self.sig.form == "shared":
            full = np.ones((self.batch, self.max_length), np.int64)
            full[:, :s] = mask
            self.mask.write(full)
            self.past_len.write(np.zeros(self.batch, np.int32))
            self._bind_shared(binding, ids_buf)
        else:
            host = OrtBuffers(self.session.device)  # empty past: OrtValues whatever the buffers (no null pointers)
            empty = [host.empty([self.batch, h, 0, d], self.sig.cache_type) for h, d in self.sig.kv_shapes]
            self._bind_concat(binding, ids_buf, self.buffers.from_numpy(mask), empty)
        out = self._run(binding, self._run_prefill, t0)
        if self.sig.form == "concat":
            self._take_presents(binding)
        self.position = s
        return out

    def _bind_concat(self, binding: Any, ids: Any, mask: Any, past: list[Any]) -> None:
        ids.bind_input(binding, names.INPUT_IDS)
        mask.bind_input(binding, names.ATTENTION_MASK)
        for n, buf in zip(self.sig.past, past):
            buf.bind_input(binding, n)
        self._bind_common(binding)
        for n in self.sig.present:
            binding.bind_output(n, self.device_type, 0)

    def _take_presents(self, binding: Any) -> None:
        values = binding.get_outputs()
        order = self._bound_output_order()
        self.cache = [OrtValueBuffer(values[order.index(n)], values[order.index(n)].shape()) for n in self.sig.present]

    def set_past(self, past: list[Any], length: int, attention_mask: np.ndarray | None = None) -> None:
        """Concat form: start from the given cache (``past`` buffers ``[B, Hkv, length, D]``) at position ``length``."""
        if self.sig.form != "concat":
            raise TopThetaError("set_past is for the concat-form cache; the shared form writes its own buffers")
        self.cache, self.position = list(past), int(length)
        self.mask_host = np.ones((self.batch, length), np.int64) if attention_mask is None else attention_mask

    def decode(self, tokens: np.ndarray, *, advance: bool = True) -> StepOutput:
        """One step with ``tokens`` [B] at the current position; ``advance=False`` repeats the same position."""
        t0 = time.perf_counter()
        tok = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64).reshape(self.batch, 1))
        if self.position < 1:
            raise TopThetaError("decode needs a prefill first: call prefill(input_ids)")
        if self.sig.form == "shared":
            if self.position + 1 > self.max_length:
                raise TopThetaError(
                    f"the cache holds {self.max_length} tokens and is full: open the generator with a larger max_length"
                )
            self.step_ids.write(tok)
            self.past_len.write(np.full(self.batch, self.position, np.int32))
            if self._decode_binding is None:
                self._decode_binding = self.sess.io_binding()
                self._bind_shared(self._decode_binding, self.step_ids)
            binding = self._decode_binding
        else:
            mask = np.concatenate([self.mask_host[:, : self.position], np.ones((self.batch, 1), np.int64)], axis=1)
            binding = self.sess.io_binding()
            self._bind_concat(binding, self.buffers.from_numpy(tok), self.buffers.from_numpy(mask), self.cache)
        out = self._run(binding, self._run_decode, t0)
        self.captured = self.captured or self.graph_id is not None
        if self.sig.form == "concat" and advance:
            self._take_presents(binding)
            self.mask_host = np.concatenate([self.mask_host[:, : self.position], np.ones((self.batch, 1), np.int64)], 1)
        if advance:
            self.position += 1
        return out

    # -- a whole generation --------------------------------------------------------------------------------------------

    def generate(
        self,
        input_ids: np.ndarray,
        max_new_tokens: int,
        *,
        attention_mask: np.ndarray | None = None,
        eos_token_id: int | None = None,
        on_token: Callable[[np.ndarray, int], None] | None = None,
        on_step: Callable[[StepOutput], None] | None = None,
    ) -> GenerationResult:
        """Greedy generation: the prompt's next token, then ``max_new_tokens - 1`` decode steps (OnnxModel.generate's
        tokens). ``on_token(tokens [B], i)`` streams each token as it is known; ``on_step`` sees every StepOutput.
        A row that produced ``eos_token_id`` gets it again on later steps; all rows done ends the loop."""
        if max_new_tokens < 1:
            raise TopThetaError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] + max_new_tokens - 1 > self.max_length:
            raise TopThetaError(
                f"a prompt of {ids.shape[-1]} tokens and {max_new_tokens} new ones need a cache of "
                f"{ids.shape[-1] + max_new_tokens - 1} tokens, this generator holds {self.max_length}: "
                "open it with a larger max_length"
            )
        first = self.prefill(ids, attention_mask)
        steps = [first]
        tokens = [first.tokens]
        done = np.zeros(self.batch, bool) if eos_token_id is None else first.tokens == eos_token_id
        if on_step:
            on_step(first)
        if on_token:
            on_token(first.tokens, 0)
        for i in range(1, max_new_tokens):
            if done.all():
                break
            out = self.decode(tokens[-1])
            nxt = out.tokens if eos_token_id is None else np.where(done, eos_token_id, out.tokens)
            if eos_token_id is not None:
                done |= nxt == eos_token_id
            steps.append(out)
            tokens.append(nxt)
            if on_step:
                on_step(out)
            if on_token:
                on_token(nxt, i)
        return _result(self, np.stack(tokens, axis=1), steps, ids.shape[1])


@dataclass
class GenerationResult:
    tokens: np.ndarray  # int64 [B, n] new tokens
    prefill_ms: float  # prompt step: inputs in, Run, next tokens out
    decode_ms_per_step: float | None  # median of the decode steps after the first (which may capture a CUDA graph)
    decode_tokens_per_s: float | None  # batch / decode_ms_per_step
    first_decode_ms: float | None  # the first decode step (includes the CUDA-graph capture when there is one)
    steps: int  # decode steps run
    batch: int
    prompt_length: int
    device: str
    providers: list[str]
    cuda_graph: bool
    note: str = ""

    def summary(self) -> str:
        """One line: prefill ms and decode tokens/s, as ``topθ-export run`` prints it."""
        line = f"prefill {self.prefill_ms:.1f} ms ({self.batch} x {self.prompt_length} tokens)"
        if self.decode_ms_per_step is not None and self.decode_tokens_per_s is not None:
            line += (
                f"; decode {self.decode_tokens_per_s:.1f} tokens/s ({self.decode_ms_per_step:.2f} ms/step, "
                f"{self.steps} steps, batch {self.batch})"
            )
        graphs = "CUDA graphs on" if self.cuda_graph else "no CUDA graphs"
        line += f"; {self.device} ({graphs})"
        return line + (f"; {self.note}" if self.note else "")


def _result(gen: DeviceGenerator, tokens: np.ndarray, steps: list[StepOutput], prompt_length: int) -> GenerationResult:
    decode = [s.timing.step_ms for s in steps[1:]]
    steady = decode[1:] if len(decode) > 1 else decode
    ms = float(np.median(steady)) if steady else None
    return GenerationResult(
        tokens=tokens,
        prefill_ms=steps[0].timing.step_ms,
        decode_ms_per_step=ms,
        decode_tokens_per_s=(gen.batch * 1e3 / ms) if ms else None,
        first_decode_ms=decode[0] if decode else None,
        steps=len(decode),
        batch=gen.batch,
        prompt_length=prompt_length,
        device=gen.session.device,
        providers=list(gen.session.providers),
        cuda_graph=gen.graph_id is not None,
        note=gen.session.note,
    )


# -- the one-call API ----------------------------------------------------------------------------------------------


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) [B, S] of token lists of any lengths, left-padded with ``pad_token_id``."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TopThetaError("every prompt needs at least one token: pass non-empty token lists")
    s = max(len(p) for p in prompts)
    ids = np.full((len(prompts), s), pad_token_id, np.int64)
    mask = np.zeros((len(prompts), s), np.int64)
    for i, p in enumerate(prompts):
        ids[i, s - len(p) :], mask[i, s - len(p) :] = p, 1
    return ids, mask


def generate(
    model: str | os.PathLike,
    input_ids: Any,
    max_new_tokens: int = 32,
    *,
    attention_mask: np.ndarray | None = None,
    device: str = "auto",
    eos_token_id: int | None = None,
    on_token: Callable[[np.ndarray, int], None] | None = None,
    cuda_graph: bool = True,
    threads: int | None = None,
    pad_token_id: int = 0,
) -> GenerationResult:
    """Greedy generation with ``model`` (an output folder or .onnx) on the device; returns tokens and timings.

    ``input_ids``: one token list, a list of token lists (left-padded here with ``pad_token_id``) or an int array
    [B, S] (with ``attention_mask`` for left-padded rows). ``on_token(tokens [B], i)`` streams the tokens.
    """
    if isinstance(input_ids, np.ndarray):
        ids = input_ids.astype(np.int64)
        ids = ids[None, :] if ids.ndim == 1 else ids
    else:
        rows = list(input_ids)
        rows = [rows] if rows and not isinstance(rows[0], (list, tuple, np.ndarray)) else rows
        ids, padded_mask = left_pad(rows, pad_token_id)
        attention_mask = padded_mask if attention_mask is None else attention_mask
    ds = DeviceSession(model, device=device, cuda_graph=cuda_graph, threads=threads)
    gen = ds.generator(ids.shape[0], ids.shape[1] + max(int(max_new_tokens), 1))
    return gen.generate(
        ids, max_new_tokens, attention_mask=attention_mask, eos_token_id=eos_token_id, on_token=on_token
    )

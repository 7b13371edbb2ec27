"""Run an exported (Top-θ or dense) model in onnxruntime: prefill, KV-cache decode, greedy generation.

Graph I/O follows docs/graph.md. Concat form: ``input_ids`` [B,S], ``attention_mask`` [B,P+S],
``past_key_values.{i}.key|value`` → ``logits`` (or ``last_hidden_state``), ``present.{i}.key|value``.
Shared-buffer form: the session owns one buffer ``[B, Hkv, M, D]`` per layer and kind (a ``KvCache``), bound with
IOBinding as both ``past_key_values.{i}.*`` and ``present.{i}.*``, plus ``past_sequence_length`` and an
``attention_mask`` over the buffer; ``run`` / ``generate`` are the same for both forms.
With ``with_kept=True`` the 4th output (``kept`` counts) of every TopThetaAttention node is exposed,
so callers can measure how many attention elements / V rows each row really used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import TopThetaError
from ..onnx.names import (
    ATTENTION_MASK,
    INPUT_IDS,
    IO_PREFIX,
    KEPT_PREFIX,
    PAST_PREFIX,
    PAST_RE,
    PAST_SEQUENCE_LENGTH,
    PRESENT_PREFIX,
    kv_cache_form,
)
from ..onnx.summary import graph_dtype
from . import library as runtime


@dataclass
class StepResult:
    output: np.ndarray  # logits [B,S,V] or last_hidden_state [B,S,H]
    # flat [k0, v0, k1, v1, ...]; shared form on the CPU: views of the buffers' valid rows [:, :, :max(P)+S]
    # (no copy: a later step on the same cache writes into them)
    present: list[np.ndarray] = field(default_factory=list)
    kept: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> int32 [B,Hq,S]
    io: dict[str, np.ndarray] = field(default_factory=dict)  # toptheta.io.{layer}.{q,k,v,mask,y}
    cache: Any = None  # what the next run takes as ``past``: the present list (concat form) or the KvCache (shared)


OP_IO_PREFIX = IO_PREFIX  # the name callers know
BFLOAT16 = "bfloat16"  # a KvCache dtype numpy lacks: device buffers of onnxruntime's bfloat16 (element type 16)
_BFLOAT16_ELEMENT = 16


@dataclass
class KvCache:
    """The shared-buffer KV cache of one sequence batch: one buffer ``[B, Hkv, M, D]`` per layer and kind.

    ``buffers`` are onnxruntime OrtValues bound as both ``past_key_values.{i}.*`` and ``present.{i}.*``, so the
    operator appends in place and no step reallocates or copies them; on the CPU they wrap ``arrays`` (numpy,
    zero copy). ``lengths`` (int32 [B]) is ``past_sequence_length``, the valid rows of each batch row; ``mask``
    (int64 [B, M]) is the ``attention_mask`` over the buffer (1 = real token, 0 = padding or unused slot).
    """

    names: list[str]  # past input names, flat [past_key_values.0.key, past_key_values.0.value, ...]
    buffers: list[Any]  # onnxruntime.OrtValue per name
    arrays: list[np.ndarray] | None  # the numpy memory of the buffers (CPU), None on a device
    lengths: np.ndarray
    mask: np.ndarray
    device: str = "cpu"
    device_id: int = 0

    @classmethod
    def allocate(
        cls,
        specs: list[tuple[str, int, int]],
        batch: int,
        capacity: int,
        dtype: Any = np.float32,
        *,
        device: str = "cpu",
        device_id: int = 0,
    ) -> KvCache:
        """Zeroed buffers ``[batch, heads, capacity, head_dim]`` for ``specs`` = [(past input name, heads,
        head_dim)], on ``device`` (an onnxruntime device type: ``cpu``, ``cuda``)."""
        import onnxruntime as ort

        if capacity < 1 or batch < 1:
            raise TopThetaError(f"a KV cache needs batch >= 1 and max_length >= 1, got {batch} and {capacity}")
        shapes = [(batch, heads, capacity, dim) for _, heads, dim in specs]
        if dtype == BFLOAT16:  # zeros written as their uint16 bits; no numpy view, even on the CPU
            arrays: list[np.ndarray] | None = None
            buffers = []
            for sh in shapes:
                buf = ort.OrtValue.ortvalue_from_shape_and_type(list(sh), _BFLOAT16_ELEMENT, device, device_id)
                buf.update_inplace(np.zeros(sh, np.uint16))
                buffers.append(buf)
        elif device == "cpu":
            arrays = [np.zeros(shape, dtype) for shape in shapes]
            buffers = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays or []]
        else:  # zeros uploaded once; later steps never copy the buffers again
            arrays = None
            buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(sh, dtype), device, device_id) for sh in shapes]
        return cls(
            [name for name, _, _ in specs],
            buffers,
            arrays,
            np.zeros(batch, np.int32),
            np.zeros((batch, capacity), np.int64),
            device,
            device_id,
        )

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.mask.shape[1])

    def reset(self) -> None:
        """Empty the cache for a new batch of sequences, keeping its buffers (and their addresses): rows at or past
        ``lengths`` are never read, so the old contents need no clearing."""
        self.lengths[:] = 0
        self.mask[:] = 0

    def valid(self) -> list[np.ndarray]:
        """Views of rows ``[0, max(lengths))`` of every buffer (CPU caches; no copy)."""
        if self.arrays is None:
            raise TopThetaError(f"the KV cache lives on {self.device}: read it with the OrtValues in .buffers")
        n = int(self.lengths.max()) if self.lengths.size else 0
        return [a[:, :, :n] for a in self.arrays]

    def data_ptrs(self) -> list[int]:
        """The buffers' memory addresses (they stay the same for the cache's lifetime)."""
        return [int(b.data_ptr()) for b in self.buffers]


class OnnxModel:
    """An onnxruntime session over an exported model, with helpers for the KV cache."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        threads: int | None = None,
        with_kept: bool = False,
        expose_io: bool = False,
        theta_fill: float | None = None,
        comp_mode: int | None = None,
        max_length: int | None = None,
    ):
        """``max_length``: the capacity (rows) of the buffers of a shared-form graph when ``run`` starts a cache
        (default: that call's sequence length; ``generate`` defaults to prompt + ``max_new_tokens``). Concat-form
        graphs ignore it."""
        self.path = Path(path)
        if self.path.is_dir():  # an output folder
            self.path = self.path / "model.onnx"
        if not self.path.is_file():
            raise TopThetaError(f"ONNX model {self.path} does not exist: run 'topθ-export export' first")
        load_path = self.path
        # numpy has no bfloat16: such a graph is run behind float32 inputs and outputs (Float32Interface, lossless)
        bfloat16 = graph_dtype(self.path) == "bfloat16"
        if bfloat16 and not runtime.runs_on_cuda(device):
            raise TopThetaError(
                f"{self.path} is a bfloat16 graph, and TopThetaAttention's CPU kernel has float32 and float16 only: "
                "run it with device='cuda' (--device cuda, onnxruntime-gpu), or export with --dtype float16"
            )
        if with_kept or expose_io or theta_fill is not None or comp_mode is not None or bfloat16:
            from ..onnx.variants import prepare_variant  # graph passes: onnx_ir is only loaded when needed

            load_path = prepare_variant(
                self.path,
                expose_kept=with_kept,
                expose_io=expose_io,
                theta_fill=theta_fill,
                comp_mode=comp_mode,
                float32_interface=bfloat16,
            )
        try:
            self.sess = runtime.session(load_path, device=device, threads=threads)
        finally:
            if load_path != self.path:
                load_path.unlink(missing_ok=True)
        self.providers = self.sess.get_providers()
        ins = self.sess.get_inputs()
        self.input_names = [i.name for i in ins]
        past = sorted(
            ((int(m.group(1)), m.group(2), i) for i in ins if (m := PAST_RE.match(i.name))),
            key=lambda t: (t[0], t[1] != "key"),
        )
        self.past_inputs = [i for _, _, i in past]
        self.num_layers = len(self.past_inputs) // 2
        self.kv_cache = kv_cache_form(self.input_names)  # "concat", "shared" or None (no cache)
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        ):
            raise TopThetaError(f"max_length must be an integer >= 1, got {max_length!r}: pass e.g. max_length=512")
        self.max_length = max_length
        # where the buffers of a shared-form cache live: the device of the session's first provider
        self.kv_device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        if self.past_inputs:
            shape = self.past_inputs[0].shape
            self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
            kind = self.past_inputs[0].type  # bfloat16 only for a shared-form cache (device buffers)
            self.dtype = BFLOAT16 if "bfloat16" in kind else np.float16 if "float16" in kind else np.float32
        outs = [o.name for o in self.sess.get_outputs()]
        self.output_name = outs[0]
        self.present_names = [o for o in outs if o.startswith(PRESENT_PREFIX)]
        self.kept_names = {int(o[len(KEPT_PREFIX) :]): o for o in outs if o.startswith(KEPT_PREFIX)}
        self.io_names = [o for o in outs if o.startswith(OP_IO_PREFIX)]

    @property
    def has_cache(self) -> bool:
        return bool(self.past_inputs)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.dtype) for _ in self.past_inputs]

    def new_cache(self, batch: int, max_length: int) -> KvCache:
        """Empty shared-form buffers for ``batch`` rows of up to ``max_length`` tokens, on the session's device."""
        if self.kv_cache != "shared":
            raise TopThetaError(
                f"{self.path} has no shared-buffer KV cache ({self.kv_cache or 'no'} cache): rewrite it with "
                "--kv-cache shared, or pass the present arrays of the previous step as past"
            )
        specs = [(i.name, int(i.shape[1]), int(i.shape[3])) for i in self.past_inputs]
        return KvCache.allocate(specs, batch, max_length, self.dtype, device=self.kv_device)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, past: Any = None) -> StepResult:
        """One forward pass of ``input_ids`` [B, S] after ``past``.

        ``past``: None (a prefill; in the shared form a new cache of ``max_length`` rows), the ``cache`` of the
        previous StepResult, or a list of arrays ``[B, Hkv, P, D]`` (shared form: copied into new buffers).
        ``attention_mask``: ``[B, P+S]`` (shared form also ``[B, M]``, the whole buffer); None = every token real
        (shared form: the cache's mask so far, plus ones for this call's tokens).
        """
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise TopThetaError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
        if self.kv_cache == "shared":
            return self._run_shared(input_ids, attention_mask, past)
        if isinstance(past, KvCache):
            raise TopThetaError(
                f"{self.path} has a concat-form KV cache: pass the present arrays (StepResult.cache), not a KvCache"
            )
        b, s = input_ids.shape
        feeds = {INPUT_IDS: input_ids}
        if self.has_cache:
            past = past if past is not None else self.empty_past(b)
            p = past[0].shape[2]
            for inp, arr in zip(self.past_inputs, past):
                feeds[inp.name] = arr
        else:
            p = 0
        if ATTENTION_MASK in self.input_names:
            feeds[ATTENTION_MASK] = (
                np.ones((b, p + s), np.int64)
                if attention_mask is None
                else np.ascontiguousarray(attention_mask, dtype=np.int64)
            )
        names = [self.output_name] + self.present_names + list(self.kept_names.values()) + self.io_names
        res = self.sess.run(names, feeds)
        n_present, n_kept = len(self.present_names), len(self.kept_names)
        kept = {layer: res[1 + n_present + j] for j, layer in enumerate(self.kept_names)}
        io = dict(zip(self.io_names, res[1 + n_present + n_kept :]))
        present = list(res[1 : 1 + n_present])
        return StepResult(res[0], present, kept, io, cache=present if self.has_cache else None)

    # -- the shared-buffer form --------------------------------------------------------------------------

    def _cache_for(self, past: Any, batch: int, seq: int) -> KvCache:
        if isinstance(past, KvCache):
            if past.batch != batch:
                raise TopThetaError(f"the KV cache holds {past.batch} rows but input_ids has {batch}: pass a new cache")
            return past
        if past is None:
            return self.new_cache(batch, self.max_length or seq)
        arrays = list(past)  # concat-style arrays [B, Hkv, P, D]: copied once into new buffers
        if len(arrays) != len(self.past_inputs) or any(np.ndim(a) != 4 for a in arrays):
            raise TopThetaError(
                f"past must be the KvCache of the previous step (StepResult.cache) or {len(self.past_inputs)} "
                "arrays [batch, kv_heads, past, head_dim]"
            )
        p = int(arrays[0].shape[2])
        cache = self.new_cache(batch, max(self.max_length or 0, p + seq))
        if cache.arrays is None:
            raise TopThetaError(f"past arrays can only be copied into a CPU cache, this session runs on {cache.device}")
        for buf, arr in zip(cache.arrays, arrays):
            buf[:, :, :p] = arr
        cache.lengths[:] = p
        cache.mask[:, :p] = 1
        return cache

    def _run_shared(self, input_ids: np.ndarray, attention_mask: np.ndarray | None, past: Any) -> StepResult:
        b, s = input_ids.shape
        cache = self._cache_for(past, b, s)
        p, m = cache.lengths, cache.capacity
        if int(p.max()) + s > m:
            raise TopThetaError(
                f"the KV cache is full: {int(p.max())} tokens + {s} new ones exceed its max_length {m}; start it "
                "with a larger max_length (OnnxModel(..., max_length=N) or generate(..., max_length=N))"
            )
        if attention_mask is None:
            cols = np.arange(m)[None, :]
            cache.mask[(cols >= p[:, None]) & (cols < p[:, None] + s)] = 1
        else:
            attention_mask = np.asarray(attention_mask, dtype=np.int64)
            width = int(p.max()) + s
            if attention_mask.ndim != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] not in (width, m):
                raise TopThetaError(
                    f"attention_mask has shape {list(attention_mask.shape)}: pass [batch, past + sequence] = "
                    f"[{b}, {width}] or [batch, max_length] = [{b}, {m}]"
                )
            cache.mask[:, : attention_mask.shape[1]] = attention_mask
            cache.mask[:, attention_mask.shape[1] :] = 0
        binding = self.sess.io_binding()
        binding.bind_cpu_input(INPUT_IDS, input_ids)
        binding.bind_cpu_input(ATTENTION_MASK, cache.mask)
        binding.bind_cpu_input(PAST_SEQUENCE_LENGTH, cache.lengths)
        fetched = [self.output_name, *self.kept_names.values(), *self.io_names]
        for name in fetched:
            binding.bind_output(name, "cpu")
        for name, buf in zip(cache.names, cache.buffers):
            binding.bind_ortvalue_input(name, buf)
            binding.bind_ortvalue_output(PRESENT_PREFIX + name[len(PAST_PREFIX) :], buf)  # the same memory
        self.sess.run_with_iobinding(binding)
        res = [v.numpy() for v in binding.get_outputs()[: len(fetched)]]
        cache.lengths += s
        kept = {layer: res[1 + j] for j, layer in enumerate(self.kept_names)}
        io = dict(zip(self.io_names, res[1 + len(self.kept_names) :]))
        present = cache.valid() if cache.arrays is not None else []
        return StepResult(res[0], present, kept, io, cache=cache)

    def generate(
        self,
        input_ids: np.ndarray,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        on_step=None,
        *,
        attention_mask: np.ndarray | None = None,
        max_length: int | None = None,
    ) -> np.ndarray:
        """Greedy decoding with the KV cache; returns the new tokens [B, n].

        ``attention_mask`` [B, S] of the prompt (0 = left padding). ``max_length``: the shared-form buffers'
        capacity (default: the session's ``max_length``, else prompt + ``max_new_tokens``); concat graphs ignore it.
        """
        if not self.has_cache:
            raise TopThetaError(f"{self.path} was exported without a KV cache: re-export a decoder LM with the cache")
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        b, s = input_ids.shape
        mask = np.ones((b, s), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        past = None
        if self.kv_cache == "shared":
            capacity = max_length or self.max_length or s + max_new_tokens
            if capacity < s + max_new_tokens - 1:  # the last new token is never fed back
                raise TopThetaError(
                    f"max_length {capacity} is too small for a prompt of {s} tokens and {max_new_tokens} new ones: "
                    f"pass max_length >= {s + max_new_tokens - 1}"
                )
            past = self.new_cache(b, capacity)
        step = self.run(input_ids, mask, past)
        new = []
        for _ in range(max_new_tokens):
            nxt = step.output[:, -1, :].argmax(-1).astype(np.int64)[:, None]
            new.append(nxt)
            if on_step:
                on_step(step)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
            if len(new) == max_new_tokens:
                break
            mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
            step = self.run(nxt, mask, step.cache)
        return np.concatenate(new, axis=1) if new else np.zeros((input_ids.shape[0], 0), np.int64)

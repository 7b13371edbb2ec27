"""Run an exported (Top-θ or dense) model in onnxruntime: prefill, KV-cache decode, greedy generation.

Graph I/O follows docs/graph.md: ``input_ids`` [B,S], ``attention_mask`` [B,P+S],
``past_key_values.{i}.key|value`` → ``logits`` (or ``last_hidden_state``), ``present.{i}.key|value``.
With ``with_kept=True`` the 4th output (``kept`` counts) of every TopThetaAttention node is exposed,
so callers can measure how many attention elements / V rows each row really used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._errors import TopThetaError
from ..onnx.names import ATTENTION_MASK, INPUT_IDS, IO_PREFIX, KEPT_PREFIX, PAST_RE, PRESENT_PREFIX
from . import library as runtime


@dataclass
class StepResult:
    output: np.ndarray  # logits [B,S,V] or last_hidden_state [B,S,H]
    present: list[np.ndarray] = field(default_factory=list)  # flat [k0, v0, k1, v1, ...]
    kept: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> int32 [B,Hq,S]
    io: dict[str, np.ndarray] = field(default_factory=dict)  # toptheta.io.{layer}.{q,k,v,mask,y}


OP_IO_PREFIX = IO_PREFIX  # the name callers know


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
    ):
        self.path = Path(path)
        if self.path.is_dir():  # an output folder
            self.path = self.path / "model.onnx"
        if not self.path.is_file():
            raise TopThetaError(f"ONNX model {self.path} does not exist: run 'topθ-export export' first")
        load_path = self.path
        if with_kept or expose_io or theta_fill is not None or comp_mode is not None:
            from ..onnx.variants import prepare_variant  # graph passes: onnx_ir is only loaded when needed

            load_path = prepare_variant(
                self.path, expose_kept=with_kept, expose_io=expose_io, theta_fill=theta_fill, comp_mode=comp_mode
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
        if self.past_inputs:
            shape = self.past_inputs[0].shape
            self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
            self.dtype = np.float16 if "float16" in self.past_inputs[0].type else np.float32
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

    def run(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, past: list[np.ndarray] | None = None
    ) -> StepResult:
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise TopThetaError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
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
        return StepResult(res[0], list(res[1 : 1 + n_present]), kept, io)

    def generate(
        self, input_ids: np.ndarray, max_new_tokens: int, eos_token_id: int | None = None, on_step=None
    ) -> np.ndarray:
        """Greedy decoding with the KV cache; returns the new tokens [B, n]."""
        if not self.has_cache:
            raise TopThetaError(f"{self.path} was exported without a KV cache: re-export a decoder LM with the cache")
        step = self.run(input_ids)
        new = []
        mask = np.ones_like(input_ids, dtype=np.int64)
        for _ in range(max_new_tokens):
            nxt = step.output[:, -1, :].argmax(-1).astype(np.int64)[:, None]
            new.append(nxt)
            if on_step:
                on_step(step)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
            mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
            step = self.run(nxt, mask, step.present)
        return np.concatenate(new, axis=1) if new else np.zeros((input_ids.shape[0], 0), np.int64)

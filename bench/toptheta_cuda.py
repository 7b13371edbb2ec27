"""ctypes access to the CUDA kernels of libtoptheta_ops (``toptheta_cuda_attention``), on torch tensors.

Used by the GPU tests and the benchmark to run the kernels without an onnxruntime session. K/V are the
full ``[B, Hkv, Ktot, *]`` tensors (no past concatenation), or in the shared-buffer form (``past_lens``) the
``[B, Hkv, M, *]`` cache buffers with the new rows already at ``[P_b, P_b + Sk)`` (``append_kv`` writes them
as the op does). Semantics: docs/op.md.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
PATHS = {0: "generic", 1: "prefill", 2: "decode"}


class _AttnParams(ctypes.Structure):
    """custom_ops/src/params.h ``toptheta::AttnParams``, field for field (checked against the library)."""

    _fields_ = [
        *[(n, ctypes.c_int64) for n in ("B", "Hq", "Hkv", "Sq", "Ktot", "D", "Dv", "R")],
        ("scale", ctypes.c_float),
        ("causal", ctypes.c_bool),
        ("comp_mode", ctypes.c_int32),
        ("dtype", ctypes.c_int32),  # DType: 0 float32, 1 float16, 2 bfloat16
        *[(n, ctypes.c_void_p) for n in ("q", "k", "v", "theta", "sdc")],
        ("mask_kind", ctypes.c_int32),  # MaskKind: 0 none, 1 bool, 2 additive T, 3 additive float32
        ("mask", ctypes.c_void_p),
        *[(n, ctypes.c_int64) for n in ("mask_sb", "mask_sh", "mask_sq")],
        ("out", ctypes.c_void_p),
        ("kept", ctypes.c_void_p),
        ("past_lens", ctypes.c_void_p),  # int32 [B] or [1] (device), null: the concat form
        ("past_lens_sb", ctypes.c_int64),
        ("kv_capacity", ctypes.c_int64),
        ("Sk", ctypes.c_int64),
        ("shadow_k", ctypes.c_void_p),  # uint8 [B, Hkv, M, D / 2] (shadow_k() below), null: none
        ("shadow_range", ctypes.c_void_p),  # K's dtype [B, Hkv, ceil(M / 64), 2, D]
        ("packed", ctypes.c_bool),  # query/output [B, S, H·D] (this module passes heads first: False)
        ("softcap", ctypes.c_float),  # > 0: scores capped to softcap · tanh(score / softcap) (Gemma 2)
    ]


class _KernelOptions(ctypes.Structure):
    """custom_ops/src/cuda/heuristics.h ``toptheta::cuda::KernelOptions``."""

    _fields_ = [
        ("force_generic", ctypes.c_int32),
        ("decode_splits", ctypes.c_int32),
        ("prefill_variant", ctypes.c_int32),
        ("decode_kstages", ctypes.c_int32),
        ("no_shadow", ctypes.c_int32),
    ]


class _Plan(ctypes.Structure):
    """custom_ops/src/cuda/heuristics.h ``toptheta::cuda::Plan``."""

    _fields_ = [
        ("path", ctypes.c_int32),
        ("splits", ctypes.c_int32),
        ("prefill_variant", ctypes.c_int32),
        ("decode_kstages", ctypes.c_int32),
        ("shadow", ctypes.c_int32),
        ("workspace", ctypes.c_size_t),
    ]


def _abi() -> str:
    """The layout string of the mirrors, in the form of the library's ``toptheta_cuda_abi()``."""
    parts = []
    for name, st in (("AttnParams", _AttnParams), ("KernelOptions", _KernelOptions), ("Plan", _Plan)):
        fields = "".join(f" {f}@{getattr(st, f).offset}" for f, _ in st._fields_)
        parts.append(f"{name} {ctypes.sizeof(st)}:{fields}")
    return "; ".join(parts)


class Kernels:
    """The library's C entry point; ``available`` is False for a CPU-only build."""

    def __init__(self, library: str | Path):
        self.lib = ctypes.CDLL(str(library))
        self.available = hasattr(self.lib, "toptheta_cuda_attention")
        if self.available:
            abi = self.lib.toptheta_cuda_abi
            abi.restype = ctypes.c_char_p
            theirs = abi().decode()
            if theirs != _abi():
                raise RuntimeError(
                    f"{library}: struct layout differs from bench/toptheta_cuda.py's mirrors:\n"
                    f"  library: {theirs}\n  mirrors: {_abi()}"
                )
            fn = self.lib.toptheta_cuda_attention
            fn.argtypes = [
                ctypes.POINTER(_AttnParams),
                ctypes.POINTER(_KernelOptions),
                ctypes.POINTER(_Plan),
                ctypes.c_void_p,
                ctypes.c_char_p,
                ctypes.c_int,
            ]
            fn.restype = ctypes.c_int
            app = self.lib.toptheta_cuda_append_kv
            app.argtypes = [ctypes.POINTER(_AttnParams)] + [ctypes.c_void_p] * 5 + [ctypes.c_char_p, ctypes.c_int]
            app.restype = ctypes.c_int
            upd = self.lib.toptheta_cuda_shadow_update
            upd.argtypes = [ctypes.POINTER(_AttnParams)] + [ctypes.c_void_p] * 3 + [ctypes.c_char_p, ctypes.c_int]
            upd.restype = ctypes.c_int
            self.lib.toptheta_cuda_options_from_env.argtypes = [ctypes.POINTER(_KernelOptions)]
            self.lib.toptheta_cuda_options_from_env.restype = None
        self.last_path = None
        self.last_splits = None
        self.last_variant = None  # prefill kernel: 0-2 mma.sync kernels, 3 the Hopper (wgmma) kernel

    def options_from_env(self) -> _KernelOptions:
        """The TOPTHETA_CUDA_PATH / TOPTHETA_DECODE_SPLITS / TOPTHETA_PREFILL_VARIANT overrides set now."""
        opts = _KernelOptions()
        self.lib.toptheta_cuda_options_from_env(ctypes.byref(opts))
        return opts

    def attention(
        self,
        q,
        k,
        v,
        thresholds,
        *,
        scale=None,
        causal=False,
        attn_mask=None,
        sdc=None,
        comp_mode=0,
        out=None,
        kept=None,
        stream=None,
        want_kept=True,
        options=None,
        past_lens=None,
        new_len=None,
        shadow=None,
        softcap=0.0,
    ):
        """Top-θ attention on the current CUDA stream; returns (out, kept). ``want_kept=False`` leaves the
        `kept` output out (as in a rewritten model without exposed counts; kept is then None). ``options``:
        kernel-choice overrides (``options_from_env()``, which is what None uses, read at each call).
        ``past_lens`` (int32 CUDA tensor [B] or [1]) with ``new_len`` (Sk): the shared-buffer form, k/v being the
        [B, Hkv, M, *] buffers whose rows [P_b, P_b + Sk) hold the new keys; the attn_mask is then [B, M].
        ``shadow``: (codes, range) of ``shadow_k(k)``, for the decode kernel's shadow-K scan. ``softcap`` (> 0): the
        op's attribute, scores capped before the mask is added."""
        B, Hq, Sq, D = q.shape
        Hkv, Ktot, Dv = k.shape[1], k.shape[2], v.shape[3]
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not (t.is_cuda and t.is_contiguous() and t.dtype == q.dtype and t.data_ptr() % 16 == 0):
                raise ValueError(f"{name} must be a contiguous, 16-byte aligned CUDA tensor of q's dtype")
        lens = None if past_lens is None else _lengths(past_lens, B)
        if lens is not None and new_len is None:
            raise ValueError("the shared-buffer form (past_lens) needs new_len (Sk)")
        th = thresholds.to(device=q.device, dtype=torch.float32).contiguous()
        rho = None if sdc is None else sdc.to(device=q.device, dtype=torch.float32).contiguous()
        if out is None:
            out = torch.empty(B, Hq, Sq, Dv, device=q.device, dtype=q.dtype)
        if kept is None and want_kept:
            kept = torch.empty(B, Hq, Sq, device=q.device, dtype=torch.int32)
        a = _AttnParams(
            B=B,
            Hq=Hq,
            Hkv=Hkv,
            Sq=Sq,
            Ktot=Ktot,
            D=D,
            Dv=Dv,
            R=th.shape[1],
            scale=scale if scale else 1.0 / math.sqrt(D),
            causal=bool(causal),
            comp_mode=comp_mode,
            dtype=_DTYPES[q.dtype],
            q=q.data_ptr(),
            k=k.data_ptr(),
            v=v.data_ptr(),
            theta=th.data_ptr(),
            sdc=rho.data_ptr() if rho is not None else None,
            out=out.data_ptr(),
            kept=kept.data_ptr() if want_kept else None,
            kv_capacity=Ktot,
            Sk=Ktot if lens is None else int(new_len),
            softcap=float(softcap),
        )
        if shadow is not None:
            codes, rng = shadow
            a.shadow_k, a.shadow_range = codes.data_ptr(), rng.data_ptr()
        if lens is not None:
            a.past_lens, a.past_lens_sb = lens.data_ptr(), (0 if lens.numel() == 1 else 1)
        mask = None
        if attn_mask is not None:
            mask = attn_mask.contiguous()
            a.mask_kind = 1 if mask.dtype == torch.bool else (2 if mask.dtype == q.dtype else 3)
            a.mask = mask.data_ptr()
            a.mask_sb, a.mask_sh, a.mask_sq = _mask_strides(mask.shape, Ktot)
        err = ctypes.create_string_buffer(256)
        s = stream if stream is not None else torch.cuda.current_stream(q.device).cuda_stream
        opts = options if options is not None else self.options_from_env()
        plan = _Plan()
        if (
            self.lib.toptheta_cuda_attention(
                ctypes.byref(a), ctypes.byref(opts), ctypes.byref(plan), ctypes.c_void_p(s), err, 256
            )
            != 0
        ):
            raise RuntimeError(err.value.decode())
        self.last_path, self.last_splits, self.last_variant = PATHS[plan.path], plan.splits, plan.prefill_variant
        self.last_kstages = plan.decode_kstages
        self.last_shadow = bool(plan.shadow)
        self._keep = (th, rho, mask, lens, shadow)  # alive until the next call (the launch is asynchronous)
        return out, kept

    def append_kv(self, k_buf, v_buf, key, value, past_lens, stream=None):
        """The op's append of the shared-buffer form: writes key/value [B, Hkv, Sk, *] to rows [P_b, P_b + Sk) of
        the [B, Hkv, M, *] CUDA buffers, P_b read on the device and clamped to [0, M - Sk]."""
        B, Hkv, Sk, D = key.shape
        for name, t in (("k_buf", k_buf), ("v_buf", v_buf), ("key", key), ("value", value)):
            if not (t.is_cuda and t.is_contiguous() and t.dtype == key.dtype):
                raise ValueError(f"{name} must be a contiguous CUDA tensor of key's dtype")
        lens = _lengths(past_lens, B)
        a = _AttnParams(
            B=B,
            Hkv=Hkv,
            D=D,
            Dv=value.shape[3],
            Ktot=k_buf.shape[2],
            kv_capacity=k_buf.shape[2],
            Sk=Sk,
            dtype=_DTYPES[key.dtype],
            past_lens=lens.data_ptr(),
            past_lens_sb=0 if lens.numel() == 1 else 1,
        )
        err = ctypes.create_string_buffer(256)
        s = stream if stream is not None else torch.cuda.current_stream(key.device).cuda_stream
        ptrs = (k_buf.data_ptr(), v_buf.data_ptr(), key.data_ptr(), value.data_ptr(), s)
        if self.lib.toptheta_cuda_append_kv(ctypes.byref(a), *map(ctypes.c_void_p, ptrs), err, 256) != 0:
            raise RuntimeError(err.value.decode())

    def shadow_update(self, k_buf, codes, rng, past_lens, new_len, stream=None):
        """The op's shadow-K maintenance of the shared-buffer form (docs/op.md, "Shadow K"): after an append of
        ``new_len`` keys at P_b, quantises the blocks of 64 keys that completes from the [B, Hkv, M, D] cache
        ``k_buf`` into ``codes`` / ``rng`` (the buffers of ``shadow_k``'s shapes)."""
        B, Hkv, M, D = k_buf.shape
        for name, t in (("k_buf", k_buf), ("codes", codes), ("rng", rng)):
            if not (t.is_cuda and t.is_contiguous()):
                raise ValueError(f"{name} must be a contiguous CUDA tensor")
        lens = _lengths(past_lens, B)
        a = _AttnParams(
            B=B,
            Hkv=Hkv,
            D=D,
            Dv=D,
            Ktot=M,
            kv_capacity=M,
            Sk=int(new_len),
            dtype=_DTYPES[k_buf.dtype],
            k=k_buf.data_ptr(),
            past_lens=lens.data_ptr(),
            past_lens_sb=0 if lens.numel() == 1 else 1,
        )
        err = ctypes.create_string_buffer(256)
        s = stream if stream is not None else torch.cuda.current_stream(k_buf.device).cuda_stream
        ptrs = (codes.data_ptr(), rng.data_ptr(), s)
        if self.lib.toptheta_cuda_shadow_update(ctypes.byref(a), *map(ctypes.c_void_p, ptrs), err, 256) != 0:
            raise RuntimeError(err.value.decode())


def _lengths(past_lens, B):
    if not (past_lens.is_cuda and past_lens.dtype == torch.int32 and past_lens.is_contiguous()):
        raise ValueError("past_lens must be a contiguous int32 CUDA tensor")
    if past_lens.dim() != 1 or past_lens.numel() not in (1, B):
        raise ValueError(f"past_lens must be [B] = [{B}] or [1], got {list(past_lens.shape)}")
    return past_lens


def _mask_strides(shape, ktot):
    if len(shape) == 2:
        return (0 if shape[0] == 1 else ktot), 0, 0
    b, h, s, _ = shape
    return (0 if b == 1 else h * s * ktot), (0 if h == 1 else s * ktot), (0 if s == 1 else ktot)


SHADOW_BLOCK = 64  # keys per (min, step) grid: kShadowBlock in custom_ops/src/params.h
SHADOW_LEVELS = 15  # 4-bit codes


def _shadow_lane_order(d: int) -> torch.Tensor:
    """Channel of each nibble slot of a key's code row (docs/cuda-notes.md, "Shadow K"): slot (t, i, n) of
    lane t's word i, nibble n = 4·odd + 2·kp + half, holds channel 16·(2i + kp) + 2t + 8·half + odd."""
    words = d // 32
    order = []
    for t in range(4):
        for i in range(words):
            for n in range(8):
                odd, kp, half = n >> 2, (n >> 1) & 1, n & 1
                order.append(16 * (2 * i + kp) + 2 * t + 8 * half + odd)
    return torch.tensor(order)


def shadow_k(k: torch.Tensor, valid: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 4-bit shadow of a K cache [B, Hkv, M, D] (fp16/bf16, CUDA): (codes uint8 [B, Hkv, M, D/2], range
    [B, Hkv, ceil(M/64), 2, D] of (min, step) in K's dtype). Per block of 64 keys and channel: min is the block's
    smallest value, step at least (max - min) / 15 (rounded up in K's dtype), code = round((k - min) / step), so
    min + code·step is within step / 2 of k. Blocks with keys at or past ``valid`` (default M) are left zero: the
    kernel never reads them (it treats their keys as candidates)."""
    B, H, M, D = k.shape
    nb = (M + SHADOW_BLOCK - 1) // SHADOW_BLOCK
    full = (M if valid is None else valid) // SHADOW_BLOCK
    codes = torch.zeros(B, H, M, D, dtype=torch.uint8, device=k.device)
    rng = torch.zeros(B, H, nb, 2, D, dtype=k.dtype, device=k.device)
    if full:
        blocks = k[:, :, : full * SHADOW_BLOCK].float().view(B, H, full, SHADOW_BLOCK, D)
        lo, hi = blocks.amin(3) + 0.0, blocks.amax(3)  # + 0: -0 -> +0 (which zero a min returns varies)
        lo_t = lo.to(k.dtype)  # exact: lo is a value of K
        rel = 2.0**-9 if k.dtype == torch.float16 else 2.0**-7
        # a tensor divisor: torch on CUDA multiplies by the reciprocal of a Python scalar divisor, which rounds
        # differently from the true division of the CPU, the op's quantisers and docs/op.md
        step = (hi - lo_t.float()) / torch.full_like(hi, SHADOW_LEVELS)
        tiny = torch.where(step > 0, 2.0**-24, 0.0)  # fp16 subnormals are 2^-24 apart
        step_t = (step * (1 + rel) + tiny).to(k.dtype)
        bump = step_t.float() < step  # rounded below the exact step: take the next value up
        step_t = torch.where(bump, (step_t.float() * (1 + 4 * rel) + tiny).to(k.dtype), step_t)
        if not bool((step_t.float() >= step).all()):
            raise ArithmeticError("shadow_k: a grid step rounded below (max - min) / 15")
        s = step_t.float().unsqueeze(3)
        c = torch.where(s > 0, torch.round((blocks - lo_t.float().unsqueeze(3)) / torch.where(s > 0, s, 1.0)), 0.0)
        c = torch.nan_to_num(c, nan=0.0)  # non-finite keys: code 0, as the op's quantisers (docs/op.md)
        codes[:, :, : full * SHADOW_BLOCK] = c.clamp(0, SHADOW_LEVELS).to(torch.uint8).view(B, H, -1, D)
        rng[:, :, :full, 0] = lo_t
        rng[:, :, :full, 1] = step_t
    slots = codes[..., _shadow_lane_order(D).to(k.device)]
    packed = slots[..., 0::2] | (slots[..., 1::2] << 4)
    return packed.contiguous(), rng.contiguous()

"""PyTorch reference of ``ai.toptheta::TopThetaAttention`` (the parity oracle; see docs/op.md).

Everything is batched torch. float64 inputs are computed in float64; every other dtype is computed in
float32 and the output is cast back to the input dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = ["toptheta_attention", "dense_attention", "topk_attention", "valid_and_scores"]

_NEG_INF = float("-inf")


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _cat_past(k, v, past_key, past_value):
    if past_key is not None:
        k = torch.cat([past_key.to(k.dtype), k], dim=2)
    if past_value is not None:
        v = torch.cat([past_value.to(v.dtype), v], dim=2)
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"key has {k.shape[2]} rows but value has {v.shape[2]} (past_key/past_value mismatch)")
    return k, v


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    hkv = x.shape[1]
    if hq % hkv:
        raise ValueError(f"Hq={hq} is not a multiple of Hkv={hkv}")
    return x if hkv == hq else x.repeat_interleave(hq // hkv, dim=1)


def _mask_parts(attn_mask, b, ktot, dt):
    """(allowed bool, additive float or None), both broadcastable to [B, Hq, Sq, Ktot]."""
    if attn_mask is None:
        return None, None
    m = attn_mask
    if m.dim() == 2:
        if tuple(m.shape) != (b, ktot):
            raise ValueError(f"2-D attn_mask must be [B, Ktot] = [{b}, {ktot}], got {list(m.shape)}")
        m = m[:, None, None, :]
    elif m.dim() != 4:
        raise ValueError(f"attn_mask must be 2-D [B, Ktot] or 4-D, got {m.dim()}-D")
    if m.dtype == torch.bool:
        return m, None
    limit = -65504.0 if m.dtype == torch.float16 else -1e30
    allowed = m > limit  # also False for -inf and NaN-free masks at or below the limit
    add = torch.where(allowed, m.to(dt), torch.zeros((), dtype=dt, device=m.device))
    return allowed, add


def valid_and_scores(q, k, *, scale=None, causal=False, attn_mask=None, softcap=None):
    """Scaled (softcapped, mask-added) scores ``s`` [B,Hq,Sq,Ktot] and the ``valid`` bool mask, per docs/op.md.

    ``k`` must already include the past and may have Hkv heads (expanded here). Invalid scores are left
    as computed; callers mask them. ``softcap`` (> 0; None or 0: none) caps the scaled scores to
    ``softcap * tanh(s / softcap)`` before the mask is added (Gemma 2's attention logit softcapping).
    """
    dt = _compute_dtype(q)
    b, hq, sq, d = q.shape
    ktot = k.shape[2]
    scale = (1.0 / math.sqrt(d)) if not scale else float(scale)
    kk = _expand_kv(k, hq).to(dt)
    s = torch.matmul(q.to(dt), kk.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / float(softcap)) * float(softcap)
    valid = torch.ones((1, 1, sq, ktot), dtype=torch.bool, device=q.device)
    if causal:
        r = torch.arange(sq, device=q.device) + (ktot - sq)
        j = torch.arange(ktot, device=q.device)
        valid = valid & (j[None, :] <= r[:, None])[None, None]
    allowed, add = _mask_parts(attn_mask, b, ktot, dt)
    if allowed is not None:
        valid = valid & allowed
    if add is not None:
        s = s + add
    valid = valid.expand(b, hq, sq, ktot)
    return s, valid


def _weighted_rows(w: torch.Tensor, use: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
    """``sum_j w[..., j] * vv[..., j, :]`` over the keys with ``use[..., j]`` only: V rows a row does not use are
    never read, so a NaN / inf in them cannot leak in through ``0 * NaN`` (docs/op.md, "NaN")."""
    w = w.masked_fill(~use, 0.0)
    bad = ~torch.isfinite(vv)
    if not bool(bad.any()):
        return torch.matmul(w, vv)
    cols = bad.any(-1).flatten(0, -2).any(0).nonzero().flatten()  # keys with a non-finite V entry somewhere
    clean = vv.clone()
    clean[..., cols, :] = 0.0
    wc, uc, vc = w[..., cols], use.expand_as(w)[..., cols], vv[..., cols, :]
    terms = torch.where(uc[..., None], wc[..., None] * vc[..., None, :, :], vc.new_zeros(()))
    return torch.matmul(w, clean) + terms.sum(-2)


def _row_table(table: torch.Tensor, sq: int, ktot: int, dt) -> torch.Tensor:
    """Pick the per-row constants ``table[h, min(r, R-1)]`` with ``r = Ktot - Sq + i`` -> [1,Hq,Sq,1]."""
    rows = table.shape[1]
    r = torch.arange(sq, device=table.device) + (ktot - sq)
    rr = r.clamp(min=0, max=rows - 1)
    return table.to(dt)[:, rr][None, :, :, None]


def toptheta_attention(
    q,
    k,
    v,
    thresholds,
    *,
    scale=None,
    causal=False,
    attn_mask=None,
    past_key=None,
    past_value=None,
    sdc=None,
    comp_mode=0,
    return_kept=False,
    keep_mask=None,
    softcap=None,
):
    """Top-θ attention exactly as docs/op.md.

    q [B,Hq,Sq,D], k/v [B,Hkv,Sk,D(v)], thresholds [Hq,R] -> out [B,Hq,Sq,Dv]
    (and kept int32 [B,Hq,Sq] when ``return_kept``). ``keep_mask`` (bool, broadcastable to [B,Hq,Sq,Ktot]):
    keep these elements instead of deciding ``s >= θ`` here (validation pins onnxruntime's decisions so that
    the two runs differ by float32 rounding only); θ still enters ``m`` and the compensation.
    """
    if comp_mode not in (0, 1, 2):
        raise ValueError(f"comp_mode must be 0, 1 or 2, got {comp_mode}")
    dt = _compute_dtype(q)
    k, v = _cat_past(k, v, past_key, past_value)
    b, hq, sq, _ = q.shape
    ktot = k.shape[2]
    if thresholds.dim() != 2 or thresholds.shape[0] != hq:
        raise ValueError(f"thresholds must be [Hq={hq}, R], got {list(thresholds.shape)}")
    s, valid = valid_and_scores(q, k, scale=scale, causal=causal, attn_mask=attn_mask, softcap=softcap)
    vv = _expand_kv(v, hq).to(dt)

    theta = _row_table(thresholds.to(q.device), sq, ktot, dt)  # [1,Hq,Sq,1]
    # `not s < θ`: a NaN score counts as kept, so it reaches the softmax and the row is NaN (docs/op.md, "NaN").
    kept = valid & ~(s < theta) if keep_mask is None else valid & keep_mask.to(device=q.device, dtype=torch.bool)
    n_valid = valid.sum(-1)
    n_kept = kept.sum(-1)
    n_pruned = (n_valid - n_kept).to(dt)

    max_kept = s.masked_fill(~kept | torch.isnan(s), _NEG_INF).amax(-1, keepdim=True)
    m = torch.maximum(theta.expand_as(max_kept), max_kept)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m_safe).masked_fill(~kept, 0.0)
    den = e.sum(-1)
    num = _weighted_rows(e, kept, vv)

    if comp_mode >= 1 and sdc is not None:
        rho = _row_table(sdc.to(q.device), sq, ktot, dt)[..., 0]
        th, ms = theta.expand_as(m)[..., 0], m_safe[..., 0]
        use = n_pruned > 0
        # exp(θ - m) with m = θ when nothing is kept (docs/op.md): 1 there, also for θ = +inf.
        any_kept = n_kept > 0
        factor = torch.where(
            use & any_kept, torch.exp(torch.where(use & any_kept, th - ms, torch.zeros_like(ms))), torch.ones_like(ms)
        )
        dp = torch.where(use, n_pruned * rho * factor, torch.zeros_like(ms))
        if comp_mode == 2:  # the V mean is read only where there is pruned mass to compensate
            vbar = _weighted_rows(valid.to(dt), valid, vv) / n_valid.clamp(min=1).to(dt)[..., None]
            num = torch.where((dp > 0)[..., None], num + dp[..., None] * vbar, num)
        den = den + dp

    # Zeros where the denominator is 0; a NaN denominator (NaN score) stays NaN.
    use = (den > 0) | torch.isnan(den)
    out = torch.where(
        use[..., None], num / torch.where(use, den, torch.ones_like(den))[..., None], torch.zeros_like(num)
    )
    out = out.to(q.dtype)
    if return_kept:
        return out, n_kept.to(torch.int32)
    return out


def dense_attention(
    q,
    k,
    v,
    *,
    scale=None,
    causal=False,
    attn_mask=None,
    past_key=None,
    past_value=None,
    return_kept=False,
    softcap=None,
):
    """Dense masked softmax attention (Top-θ with every θ = -inf)."""
    th = torch.full((q.shape[1], 1), _NEG_INF, dtype=torch.float32, device=q.device)
    return toptheta_attention(
        q,
        k,
        v,
        th,
        scale=scale,
        causal=causal,
        attn_mask=attn_mask,
        past_key=past_key,
        past_value=past_value,
        return_kept=return_kept,
        softcap=softcap,
    )


def topk_attention(
    q,
    k,
    v,
    k_keep,
    *,
    scale=None,
    causal=False,
    attn_mask=None,
    past_key=None,
    past_value=None,
    return_kept=False,
    softcap=None,
):
    """Keep the ``k_keep`` largest valid scores of every row (ties: lower key index first), then softmax."""
    dt = _compute_dtype(q)
    k, v = _cat_past(k, v, past_key, past_value)
    hq = q.shape[1]
    s, valid = valid_and_scores(q, k, scale=scale, causal=causal, attn_mask=attn_mask, softcap=softcap)
    vv = _expand_kv(v, hq).to(dt)
    masked = s.masked_fill(~valid, _NEG_INF)
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
    kept = valid & (rank < int(k_keep))
    m = masked.masked_fill(~kept, _NEG_INF).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m).masked_fill(~kept, 0.0)
    den = e.sum(-1, keepdim=True)
    out = torch.where(
        den > 0,
        torch.matmul(e, vv) / torch.where(den > 0, den, torch.ones_like(den)),
        torch.zeros((), dtype=dt, device=q.device),
    ).to(q.dtype)
    if return_kept:
        return out, kept.sum(-1).to(torch.int32)
    return out

"""Calibrated Top-θ constants: θ and ρ per (layer, head, row), saved as safetensors + JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._errors import TopThetaError
from ._io import atomic_path, write_json

__all__ = [
    "EXTRAPOLATIONS",
    "FIT_RANGES",
    "FORMAT_VERSION",
    "META_FILE",
    "TENSORS_FILE",
    "Thresholds",
    "check_k_growth",
    "parse_dense_heads",
    "parse_layer_k",
    "fit_rows",
    "fit_start",
    "k_rows",
]

EXTRAPOLATIONS = ("fit", "last-row")
FIT_MODELS = ("gauss", "log")
# Rows fitted by "fit": the last FIT_FRACTION of the calibrated rows (the short rows near the start, with a few
# dozen keys, follow another curve and would bend the line; the extrapolation is for rows far past R).
FIT_FRACTION = 0.5
# Which calibrated rows "fit" uses (``Thresholds.extended(..., fit_range=)``): "half", the last FIT_FRACTION (the
# default); "all", every row with more than k keys (the longest span of x(r), so the slope b is least sensitive
# to the calibration text's row-to-row swings, which every head sees at the same rows). Measured at 8k
# (docs/accuracy.md "θ past R: which fit"): "all" brings Qwen2.5-Coder-1.5B from 1.42 k to 1.19 k kept per row
# at 4x R and SmolLM2-135M from 0.94 k to 0.76 k, the edge of the ±25% band, so it is an option, not the default.
FIT_RANGES = ("half", "all")

FORMAT_VERSION = 1
TENSORS_FILE = "thresholds.safetensors"
META_FILE = "thresholds.json"
_META_KEY = "toptheta_meta"
_REQUIRED_META = ("format_version", "num_layers", "num_heads")


@dataclass
class Thresholds:
    """θ [L, Hq, R] and ρ (SDC) [L, Hq, R], float32, plus metadata (see docs/op.md)."""

    theta: torch.Tensor
    sdc: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.theta = torch.as_tensor(self.theta).detach().to("cpu", torch.float32).contiguous()
        self.sdc = torch.as_tensor(self.sdc).detach().to("cpu", torch.float32).contiguous()
        problem = _shape_problem(self.theta, self.sdc, self.meta)
        if problem:
            raise TopThetaError(f"inconsistent thresholds: {problem}: recalibrate with 'topθ-export calibrate'")
        self.check_values()
        self.meta.setdefault("format_version", FORMAT_VERSION)
        self.meta.setdefault("num_layers", self.num_layers)
        self.meta.setdefault("num_heads", self.num_heads)

    # -- shape -------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.theta.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.theta.shape[1])

    @property
    def num_rows(self) -> int:
        return int(self.theta.shape[2])

    @property
    def dense_layers(self) -> list[int]:
        return [int(i) for i in self.meta.get("dense_layers", [])]

    @property
    def layer_k(self) -> dict[int, int]:
        """Per-layer k that replaced the thresholds' k at calibration (``calibrate(layer_k=)``); {} if none."""
        return {int(i): int(k) for i, k in (self.meta.get("layer_k") or {}).items()}

    def layer_k_at(self, k: int) -> dict[int, int]:
        """The per-layer k of a calibration at ``k`` instead of the thresholds' k: each in the same proportion
        (what ``eval --sweep`` calibrates for each of its k)."""
        k0 = int(self.meta.get("k") or 0)
        return {i: max(1, round(kk * k / k0)) for i, kk in self.layer_k.items()} if k0 else {}

    def k_of(self, layer: int) -> int:
        """The k layer ``layer`` was calibrated for (0 if the thresholds do not say)."""
        return self.layer_k.get(layer, int(self.meta.get("k") or 0))

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ [Hq, R], ρ [Hq, R]) of layer ``i``."""
        if not 0 <= i < self.num_layers:
            raise TopThetaError(f"layer {i} is out of range: the thresholds have {self.num_layers} layers")
        return self.theta[i], self.sdc[i]

    def extended(self, rows: int, method: str = "fit", *, model: str = "gauss", fit_range: str = "half") -> Thresholds:
        """Thresholds materialised for ``rows`` rows (>= the calibrated ones, which are kept as they are).

        ``method`` "fit": for every (layer, head), θ(r) = a + b·x(r) fitted by least squares on the finite θ
        of the last ``FIT_FRACTION`` of the calibrated rows (``fit_range`` "half", the default; "all": every
        calibrated row with more than k keys, ``FIT_RANGES``) and evaluated for the new rows, with (``model``)
        "gauss": x(r) = Φ⁻¹(1 - k/(r + 1)), the k-th largest of r + 1 normal scores (the default: it
        extrapolates best on SmolLM2, docs/accuracy.md "Long context"), or "log": x(r) = ln(r + 1). ρ of the
        new rows is ρ of the last calibrated row. "last-row": every new row repeats the last calibrated row,
        exactly what the operator does with rows past R (docs/op.md), so the thresholds are returned as they
        are. Heads with fewer than two finite θ in the fitted range also repeat the last row (dense layers
        stay -inf).
        """
        if method not in EXTRAPOLATIONS:
            raise TopThetaError(f"unknown θ extrapolation '{method}': use one of {', '.join(EXTRAPOLATIONS)}")
        if model not in FIT_MODELS:
            raise TopThetaError(f"unknown θ fit model '{model}': use one of {', '.join(FIT_MODELS)}")
        if fit_range not in FIT_RANGES:
            raise TopThetaError(f"unknown θ fit range '{fit_range}': use one of {', '.join(FIT_RANGES)}")
        if rows < self.num_rows:
            raise TopThetaError(f"cannot extend {self.num_rows} calibrated rows to {rows}: pass at least that many")
        meta = dict(self.meta)
        meta["theta_extrapolation"] = method
        meta.setdefault("calibrated_rows", self.num_rows)
        if method == "last-row" or rows == self.num_rows:
            return Thresholds(self.theta.clone(), self.sdc.clone(), meta)
        k = int(self.meta.get("k") or 0)
        growth = self.meta.get("k_growth")
        if model == "gauss" and k < 1:
            raise TopThetaError("the gauss θ fit needs the thresholds' k (meta 'k'): recalibrate, or use model 'log'")
        fraction = FIT_FRACTION if fit_range == "half" else 1.0
        a, b, ok = fit_rows(self.theta, fraction, model=model, k=k, growth=growth)
        r = torch.arange(self.num_rows, rows, dtype=torch.float64)
        ext = a[..., None] + b[..., None] * _fit_x(r, model, k, growth)  # [L, H, rows - R]
        for layer_k in sorted(set(self.layer_k.values())):  # layers calibrated for another k: x(r) uses theirs
            ls = [i for i, v in sorted(self.layer_k.items()) if v == layer_k]
            a_l, b_l, ok_l = fit_rows(self.theta[ls], fraction, model=model, k=layer_k, growth=growth)
            ext[ls] = a_l[..., None] + b_l[..., None] * _fit_x(r, model, layer_k, growth)
            ok[ls] = ok_l
        last = self.theta[..., -1:].double().expand_as(ext)
        ext = torch.where(ok[..., None], ext, last).float()
        sdc = self.sdc[..., -1:].expand(-1, -1, rows - self.num_rows)
        formula = "a + b*PhiInv(1 - k/(r+1))" if model == "gauss" else "a + b*ln(r+1)"
        meta["theta_fit"] = {
            "model": formula,
            "rows_fitted_from": fit_start(self.num_rows, fraction, model, k),
            "fit_range": fit_range,
        }
        return Thresholds(torch.cat([self.theta, ext], -1), torch.cat([self.sdc, sdc], -1), meta)

    # -- io ----------------------------------------------------------------------------------------
    def save(self, out_dir) -> Path:
        """Write ``thresholds.safetensors`` and ``thresholds.json`` into ``out_dir`` (each atomically)."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta)
        path = out_dir / TENSORS_FILE
        with atomic_path(path) as tmp:
            save_file(
                {"theta": self.theta, "sdc": self.sdc}, str(tmp), metadata={_META_KEY: json.dumps(meta, default=str)}
            )
        write_json(out_dir / META_FILE, meta)
        return path

    @classmethod
    def load(cls, path) -> Thresholds:
        """Load from a directory holding ``thresholds.safetensors`` or from that file itself."""
        from safetensors import safe_open

        p = Path(path)
        file = p / TENSORS_FILE if p.is_dir() else p
        if not file.is_file():
            raise TopThetaError(f"thresholds file {file} does not exist: run 'topθ-export calibrate' first")
        try:
            with safe_open(str(file), framework="pt") as f:
                names = set(f.keys())
                missing = {"theta", "sdc"} - names
                if missing:
                    raise TopThetaError(f"thresholds file {file} lacks tensor(s) {sorted(missing)}: recalibrate")
                theta, sdc = f.get_tensor("theta"), f.get_tensor("sdc")
                raw = (f.metadata() or {}).get(_META_KEY)
        except TopThetaError:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure becomes the one-line error
            raise TopThetaError(f"cannot read thresholds file {file} ({_first_line(e)}): recalibrate") from None
        meta = _read_meta(file, raw)
        try:
            return cls(theta, sdc, meta)
        except TopThetaError as e:
            raise TopThetaError(f"{file}: {e}") from None

    # -- checks ------------------------------------------------------------------------------------
    def check_values(self) -> None:
        """Raise a one-line TopThetaError naming the first layer whose θ or ρ is NaN (or otherwise invalid).

        Run on construction and again by the rewrite, since the tensors can be edited in place afterwards.
        """
        problem = _value_problem(self.theta, self.sdc)
        if problem:
            raise TopThetaError(
                f"{problem}: recalibrate with 'topθ-export calibrate' (θ = -inf, not NaN, marks a dense row)"
            )

    def check_compatible(self, loaded) -> None:
        """Raise TopThetaError if these thresholds do not fit ``loaded`` (a LoadedModel)."""
        checks = [
            ("layers", self.num_layers, getattr(loaded, "num_layers", None)),
            ("query heads", self.num_heads, getattr(loaded, "num_heads", None)),
            ("kv heads", self.meta.get("num_kv_heads"), getattr(loaded, "num_kv_heads", None)),
            ("head dim", self.meta.get("head_dim"), getattr(loaded, "head_dim", None)),
        ]
        for what, mine, theirs in checks:
            if mine is not None and theirs is not None and int(mine) != int(theirs):
                name = getattr(loaded, "name", "the model")
                raise TopThetaError(
                    f"thresholds were calibrated for {mine} {what} (model {self.meta.get('model', '?')}) but "
                    f"{name} has {theirs}: calibrate thresholds for this model"
                )

    def stats(self) -> dict[str, Any]:
        """Summary numbers for reports."""
        th = self.theta
        finite = torch.isfinite(th)
        fin_vals = th[finite]
        kinds = self.meta.get("attention_kinds") or []
        kinds = kinds if len(kinds) == self.num_layers else ["global"] * self.num_layers
        per_layer = []
        for i in range(self.num_layers):
            f = torch.isfinite(th[i])
            per_layer.append(
                {
                    "layer": i,
                    "attention": kinds[i],
                    "dense": bool(not f.any()),
                    "theta_mean": float(th[i][f].mean()) if f.any() else None,
                    "sdc_mean": float(self.sdc[i][f].mean()) if f.any() else None,
                }
            )
        by_attention = {}
        for kind in sorted(set(kinds)):
            layers = [i for i in range(self.num_layers) if kinds[i] == kind]
            vals = th[layers][finite[layers]]
            by_attention[kind] = {
                "layers": layers,
                "finite_fraction": float(finite[layers].float().mean()) if layers else 0.0,
                "theta_mean": float(vals.mean()) if vals.numel() else None,
            }
        return {
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_rows": self.num_rows,
            "k": self.meta.get("k"),
            "layer_k": self.meta.get("layer_k") or {},
            "dense_heads": self.meta.get("dense_heads") or {},
            "dense_layers": self.dense_layers,
            "finite_fraction": float(finite.float().mean()) if th.numel() else 0.0,
            "theta_min": float(fin_vals.min()) if fin_vals.numel() else None,
            "theta_max": float(fin_vals.max()) if fin_vals.numel() else None,
            "theta_mean": float(fin_vals.mean()) if fin_vals.numel() else None,
            "sdc_mean": float(self.sdc[finite].mean()) if fin_vals.numel() else None,
            "sdc_max": float(self.sdc.max()) if self.sdc.numel() else None,
            "sliding_window": self.meta.get("sliding_window"),
            "by_attention": by_attention,
            "per_layer": per_layer,
        }


# k growing with the row (calibrate --k-growth): "fraction:F" keeps k(r) = max(k, ⌈F·(r+1)⌉) keys of row r
# (a share of its r + 1 keys), "power:A@R" keeps k(r) = max(k, round(k·((r+1)/R)^A)).
K_GROWTH_KINDS = ("fraction", "power")


def check_k_growth(growth: str | None) -> str | None:
    """``growth`` normalised ("fraction:0.0625", "power:0.5@512"), or None for a constant k; a bad spec raises."""
    if growth in (None, "", "none"):
        return None
    kind, _, rest = str(growth).partition(":")
    try:
        if kind == "fraction":
            f = float(rest)
            if 0.0 < f <= 1.0:
                return f"fraction:{f:g}"
        elif kind == "power":
            a, _, ref = rest.partition("@")
            if 0.0 < float(a) <= 1.0 and int(ref) >= 1:
                return f"power:{float(a):g}@{int(ref)}"
    except ValueError:
        pass
    raise TopThetaError(
        f"k growth '{growth}' is not understood: use none, fraction:F (0 < F <= 1, k(r) = max(k, F·(r+1))) "
        "or power:A@R (0 < A <= 1, k(r) = max(k, k·((r+1)/R)^A)), e.g. fraction:0.03125"
    )


_LAYER_K_FIX = "use LAYERS=K[,LAYERS=K...], LAYERS as 2+4+15 or 3-9, e.g. --layer-k 2+4+15=384"
_DENSE_HEADS_FIX = "use LAYER:HEADS[,LAYER:HEADS...], HEADS as 3+7 or 0-2, e.g. --dense-heads 1:3+7"


def _spec_pairs(spec: str, sep: str, flag: str, fix: str, list_side: int) -> list[tuple[str, str]]:
    """The (left, right) pairs of "A<sep>B,..." with side ``list_side`` (0 or 1) a list such as 2+4 or 3-9,
    expanded to one pair per element (``parse_layer_k``, ``parse_dense_heads``)."""
    pairs = []
    for part in spec.split(","):
        left, found, right = part.partition(sep)
        if not found or not left.strip() or not right.strip():
            what = "LAYERS=K" if sep == "=" else "LAYER:HEADS"
            raise TopThetaError(f"{flag} part '{part}' has no {what}: {fix}")
        listed = (left, right)[list_side]
        for chunk in listed.split("+"):
            lo, dash, hi = chunk.strip().partition("-")
            try:
                span = range(int(lo), int(hi) + 1) if dash else [int(lo)]
            except ValueError:
                raise TopThetaError(f"{flag} list '{listed}' is not integers: {fix}") from None
            pairs += [(str(x), right) if list_side == 0 else (left, str(x)) for x in span]
    return pairs


def _int_pair(a, b, flag: str, fix: str) -> tuple[int, int]:
    try:
        return int(str(a).strip()), int(str(b).strip())
    except ValueError:
        raise TopThetaError(f"{flag} entry {a}, {b} is not two integers: {fix}") from None


def parse_layer_k(spec: str | dict | None) -> dict[int, int]:
    """Per-layer k (``--layer-k``): "2+4+15=384,7-9=256", or a dict {layer: k}, to {layer: k}; None or "" -> {}."""
    if spec is None or spec == "" or spec == {}:
        return {}
    if not isinstance(spec, (str, dict)):
        raise TopThetaError(f"layer_k must be a string or a dict, got {type(spec).__name__}: {_LAYER_K_FIX}")
    items = list(spec.items()) if isinstance(spec, dict) else _spec_pairs(spec, "=", "--layer-k", _LAYER_K_FIX, 0)
    out: dict[int, int] = {}
    for layer, k in items:
        i, kk = _int_pair(layer, k, "--layer-k", _LAYER_K_FIX)
        if i < 0 or kk < 1:
            raise TopThetaError(f"--layer-k entry {i}={kk} needs a layer >= 0 and k >= 1: {_LAYER_K_FIX}")
        if out.get(i, kk) != kk:
            raise TopThetaError(f"--layer-k gives layer {i} two k ({out[i]} and {kk}): name each layer once")
        out[i] = kk
    return out


def parse_dense_heads(spec: str | dict | None) -> dict[int, list[int]]:
    """Dense heads of sparse layers (``--dense-heads``): "1:3+7,5:0-2", or a dict {layer: [heads]}, to
    {layer: sorted heads}; None or "" -> {}."""
    if spec is None or spec == "" or spec == {}:
        return {}
    if not isinstance(spec, (str, dict)):
        raise TopThetaError(f"dense_heads must be a string or a dict, got {type(spec).__name__}: {_DENSE_HEADS_FIX}")
    if isinstance(spec, dict):
        items = [(layer, h) for layer, hs in spec.items() for h in hs]
    else:
        items = _spec_pairs(spec, ":", "--dense-heads", _DENSE_HEADS_FIX, 1)
    out: dict[int, set[int]] = {}
    for layer, h in items:
        i, j = _int_pair(layer, h, "--dense-heads", _DENSE_HEADS_FIX)
        if i < 0 or j < 0:
            raise TopThetaError(f"--dense-heads entry {i}:{j} needs a layer and a head >= 0: {_DENSE_HEADS_FIX}")
        out.setdefault(i, set()).add(j)
    return {i: sorted(hs) for i, hs in sorted(out.items())}


def _k_real(r: torch.Tensor, k: int, growth: str | None) -> torch.Tensor:
    """k(r) before rounding, float64 (the fit's x uses it unrounded: rounding would add a sawtooth)."""
    g = check_k_growth(growth)
    r1 = r.double() + 1.0
    if g is None:
        return torch.full_like(r1, float(k))
    kind, _, rest = g.partition(":")
    if kind == "fraction":
        return (float(rest) * r1).clamp(min=float(k))
    a, _, ref = rest.partition("@")
    return (float(k) * (r1 / int(ref)) ** float(a)).clamp(min=float(k))


def k_rows(r: torch.Tensor, k: int, growth: str | None = None) -> torch.Tensor:
    """Target kept count k(r) of rows ``r`` (int64): ``k`` itself, or grown by ``growth`` (``check_k_growth``)."""
    g = check_k_growth(growth)
    kr = _k_real(r, k, g)
    kr = kr.ceil() if g is not None and g.startswith("fraction") else kr.round()
    return kr.long().clamp(min=int(k))


def _fit_x(r: torch.Tensor, model: str, k: int, growth: str | None = None) -> torch.Tensor:
    if model == "log":
        return torch.log1p(r)
    p = (1.0 - _k_real(r, k, growth) / (r + 1.0)).clamp(min=1e-9, max=1.0 - 1e-12)
    return math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)  # Φ⁻¹(p)


def fit_start(rows: int, fraction: float, model: str = "gauss", k: int = 0) -> int:
    """First row fitted by ``fit_rows``: the last ``fraction`` of ``rows``, and for the gauss model no row
    with at most k keys (every model skips non-finite θ, which such rows have)."""
    r0 = min(int(rows * (1 - fraction)), rows - 1)
    return max(r0, min(k + 1, rows - 1)) if model == "gauss" else r0


def fit_rows(
    theta: torch.Tensor, fraction: float = FIT_FRACTION, *, model: str = "gauss", k: int = 0, growth: str | None = None
):
    """Least-squares θ ≈ a + b·x(r) per (layer, head) over the finite θ of the last ``fraction`` of rows
    (``Thresholds.extended``; rows with at most k + 1 keys are left out of the gauss fit). With ``growth`` the
    gauss x(r) uses k(r); where x does not vary over the fitted rows (a kept fraction: Φ⁻¹(1 - F) for every
    row) the fit is the constant a = mean θ, b = 0.

    Returns (a, b, ok), each [L, H] (float64; ``ok``: at least two finite rows were fitted).
    """
    rows = theta.shape[-1]
    r0 = fit_start(rows, fraction, model, k)
    y = theta[..., r0:].double()
    x = _fit_x(torch.arange(r0, rows, dtype=torch.float64), model, k, growth).expand_as(y)
    w = torch.isfinite(y).double()
    y = torch.where(w > 0, y, 0.0)
    n = w.sum(-1)
    sx, sy = (w * x).sum(-1), (w * y).sum(-1)
    sxx, sxy = (w * x * x).sum(-1), (w * x * y).sum(-1)
    den = n * sxx - sx * sx
    spread = den / (n * n).clamp(min=1)  # the weighted variance of x
    ok = n >= 2
    varies = ok & (spread > 1e-9)
    b = torch.where(varies, (n * sxy - sx * sy) / torch.where(varies, den, 1.0), 0.0)
    a = torch.where(ok, (sy - b * sx) / n.clamp(min=1), 0.0)
    return a, b, ok


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _read_meta(file: Path, raw: str | None) -> dict:
    side = file.with_name(META_FILE)
    source = None
    if side.is_file():
        source = side.read_text(errors="replace")
    elif raw:
        source = raw
    if source is None:
        raise TopThetaError(f"thresholds metadata is missing ({side} and the file's own metadata): recalibrate")
    try:
        meta = json.loads(source)
    except json.JSONDecodeError as e:
        raise TopThetaError(
            f"thresholds metadata in {side if side.is_file() else file} is not valid JSON "
            f"({e.msg} at line {e.lineno}): recalibrate"
        ) from None
    if not isinstance(meta, dict):
        raise TopThetaError(f"thresholds metadata of {file} is not a JSON object: recalibrate")
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        raise TopThetaError(f"thresholds metadata of {file} lacks {missing}: recalibrate")
    if int(meta["format_version"]) != FORMAT_VERSION:
        raise TopThetaError(
            f"thresholds format_version {meta['format_version']} is not supported "
            f"(this version reads {FORMAT_VERSION}): recalibrate"
        )
    return meta


def _shape_problem(theta: torch.Tensor, sdc: torch.Tensor, meta: dict) -> str | None:
    if theta.dim() != 3:
        return f"theta must be [layers, heads, rows], got shape {list(theta.shape)}"
    if tuple(sdc.shape) != tuple(theta.shape):
        return f"sdc shape {list(sdc.shape)} differs from theta shape {list(theta.shape)}"
    if theta.shape[2] < 1:
        return "theta has no rows"
    for key, dim in (("num_layers", 0), ("num_heads", 1)):
        if key in meta and int(meta[key]) != int(theta.shape[dim]):
            return f"meta {key}={meta[key]} but theta has {theta.shape[dim]}"
    return None


def _value_problem(theta: torch.Tensor, sdc: torch.Tensor) -> str | None:
    """What is wrong with the values of θ [L, Hq, R] / ρ [L, Hq, R], naming the first bad layer; None if fine.

    NaN θ would keep nothing (every comparison with NaN is false) and silently zero the layer's output.
    """
    checks = (
        ("θ", torch.isnan(theta), "NaN"),
        ("θ", theta == math.inf, "+inf"),
        ("ρ (sdc)", torch.isnan(sdc), "NaN"),
        ("ρ (sdc)", sdc.abs() == math.inf, "infinite"),
        ("ρ (sdc)", sdc < 0, "negative"),
    )
    for what, bad, kind in checks:
        if bad.any():
            layer, head, row = (int(i) for i in bad.nonzero()[0])
            count = int(bad[layer].sum())
            return (
                f"{what} of layer {layer} is {kind} at head {head}, row {row} "
                f"({count} value{'s' if count > 1 else ''} in that layer)"
            )
    return None

"""CPU kernel of ai.toptheta::TopThetaAttention in real onnxruntime sessions, against the float64
NumPy reference of tests/_onnx_single.py (docs/op.md)."""

from __future__ import annotations

import functools

import _onnx_single as S
import numpy as np
import pytest

from topthetaexport._errors import TopThetaError
from topthetaexport.ort import library as runtime

F32_TOL = 1e-5
F16_REL_TOL = 1e-2


@pytest.fixture(scope="module", autouse=True)
def library():
    """The built library; missing means the product is broken, so this errors instead of skipping."""
    path = runtime.library_path()
    assert path.is_file()
    return path


@functools.cache
def _session(dtype="float32", threads=None, **kw):
    return S.session(S.make_model(dtype, **kw), threads=threads)


def sess(dtype="float32", threads=None, **kw):
    """Cached session of a single-node model (see _onnx_single.make_model)."""
    return _session(dtype, threads, **kw)


def randn(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def make_case(rng, B, Hq, Hkv, Sq, P, D, Dv, R, dtype=np.float32, dense_rows=0):
    """Random inputs; θ drawn around the score scale (≈ N(0, 1)), first `dense_rows` rows -inf."""
    q, k, v = randn(rng, (B, Hq, Sq, D), dtype), randn(rng, (B, Hkv, Sq, D), dtype), randn(rng, (B, Hkv, Sq, Dv), dtype)
    pk = randn(rng, (B, Hkv, P, D), dtype) if P else None
    pv = randn(rng, (B, Hkv, P, Dv), dtype) if P else None
    th = rng.uniform(-0.5, 1.5, (Hq, R)).astype(np.float32)
    th[:, :dense_rows] = -np.inf
    sdc = rng.uniform(0.05, 0.9, (Hq, R)).astype(np.float32)
    return dict(query=q, key=k, value=v, thresholds=th, past_key=pk, past_value=pv, sdc=sdc)


def untie(f, causal, mask=None):
    """θ moved away from every score it is compared with, so fp32 and fp64 keep the same keys."""
    _, _, scores = S.reference(
        f["query"], f["key"], f["value"], f["thresholds"], mask, f["past_key"], f["past_value"], causal=causal
    )
    return S.untie_thresholds(f["thresholds"], scores)


def ref(f, mask=None, sdc=True, **attrs):
    return S.reference(
        f["query"],
        f["key"],
        f["value"],
        f["thresholds"],
        mask,
        f["past_key"],
        f["past_value"],
        f["sdc"] if sdc else None,
        **attrs,
    )


def test_library_registers_the_op(library):
    """Without the library onnxruntime does not know the op; with it the session opens."""
    import onnxruntime as ort

    model = S.make_model(causal=1).SerializeToString()
    with pytest.raises(Exception, match="TopThetaAttention"):
        ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    s = ort.InferenceSession(
        model, sess_options=runtime.session_options(library=library), providers=["CPUExecutionProvider"]
    )
    assert [i.name for i in s.get_inputs()] == ["query", "key", "value", "thresholds"]
    assert [o.name for o in s.get_outputs()] == ["output", "kept"]


@pytest.mark.parametrize(
    "B,Hq,Hkv,Sq,P,D,Dv,R,causal,comp_mode",
    [
        (1, 4, 4, 13, 0, 16, 16, 13, 1, 0),  # MHA, causal prefill
        (2, 6, 2, 33, 0, 20, 12, 40, 1, 1),  # GQA, Dv != D, D not a multiple of 8, R > Ktot
        (2, 3, 1, 20, 0, 8, 8, 5, 0, 2),  # MQA, non-causal, rows past R reuse the last row
        (1, 4, 2, 7, 9, 16, 16, 64, 1, 2),  # chunked prefill on top of a cache
        (3, 2, 2, 17, 0, 64, 64, 17, 1, 1),  # D = 64 (vector path), several batches
    ],
)
def test_random_shapes_fp32(B, Hq, Hkv, Sq, P, D, Dv, R, causal, comp_mode):
    rng = np.random.default_rng(B * 1000 + Sq * 10 + P)
    f = make_case(rng, B, Hq, Hkv, Sq, P, D, Dv, R, dense_rows=3)
    f["thresholds"] = untie(f, causal)
    want, want_kept, _ = ref(f, causal=causal, comp_mode=comp_mode)
    got = S.run(sess(past=bool(P), sdc=True, causal=causal, comp_mode=comp_mode, num_heads=Hq, num_kv_heads=Hkv), **f)
    assert np.abs(got["output"] - want).max() <= F32_TOL
    np.testing.assert_array_equal(got["kept"], want_kept)
    # the case prunes something and keeps something
    assert 0 < want_kept.sum() < (want_kept.size * (P + Sq))


def test_dense_when_theta_is_minus_inf():
    """θ = -inf everywhere is plain causal softmax attention (checked against a direct softmax)."""
    rng = np.random.default_rng(1)
    B, H, S_, D = 2, 3, 19, 16
    f = make_case(rng, B, H, H, S_, 0, D, D, 4)
    f["thresholds"][:] = -np.inf
    got = S.run(sess(sdc=True, causal=1, comp_mode=2), **f)
    s = np.einsum("bhid,bhjd->bhij", f["query"].astype(np.float64), f["key"].astype(np.float64)) / np.sqrt(D)
    s = np.where(np.tril(np.ones((S_, S_), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    dense = (p / p.sum(-1, keepdims=True)) @ f["value"].astype(np.float64)
    assert np.abs(got["output"] - dense).max() <= F32_TOL
    np.testing.assert_array_equal(got["kept"], np.broadcast_to(np.arange(1, S_ + 1), (B, H, S_)))


def test_scale_attribute():
    rng = np.random.default_rng(2)
    f = make_case(rng, 1, 2, 2, 9, 0, 8, 8, 9)
    f["thresholds"][:] = -np.inf
    a = S.run(sess(causal=0, scale=0.7), **f)["output"]
    want, _, _ = ref(f, sdc=False, scale=0.7, causal=0)
    assert np.abs(a - want).max() <= F32_TOL
    default = S.run(sess(causal=0), **f)["output"]
    assert np.abs(a - default).max() > 1e-3  # the attribute is honoured


def test_decode_with_past_matches_prefill():
    """One decode step (Sq=1 with past) equals the last row of the full causal prefill; presents are
    the concatenations."""
    rng = np.random.default_rng(3)
    B, Hq, Hkv, N, D = 2, 6, 2, 25, 16
    full = make_case(rng, B, Hq, Hkv, N, 0, D, D, 32, dense_rows=2)
    full["thresholds"] = untie(full, 1)
    pre = S.run(sess(sdc=True, causal=1, comp_mode=1), **full)
    step = dict(
        full,
        query=full["query"][:, :, -1:],
        key=full["key"][:, :, -1:],
        value=full["value"][:, :, -1:],
        past_key=full["key"][:, :, :-1],
        past_value=full["value"][:, :, :-1],
    )
    got = S.run(sess(past=True, present=True, sdc=True, causal=1, comp_mode=1), **step)
    np.testing.assert_array_equal(got["present_key"], full["key"])
    np.testing.assert_array_equal(got["present_value"], full["value"])
    assert np.abs(got["output"][:, :, 0] - pre["output"][:, :, -1]).max() <= F32_TOL
    np.testing.assert_array_equal(got["kept"][:, :, 0], pre["kept"][:, :, -1])
    want, want_kept, _ = ref(step, causal=1, comp_mode=1)
    assert np.abs(got["output"] - want).max() <= F32_TOL
    np.testing.assert_array_equal(got["kept"], want_kept)


def test_decode_without_present_outputs_and_empty_past():
    rng = np.random.default_rng(4)
    f = make_case(rng, 1, 4, 2, 1, 12, 8, 8, 16)
    f["thresholds"] = untie(f, 1)
    got = S.run(sess(past=True, sdc=True, causal=1, comp_mode=2), **f)  # past given, presents not requested
    want, want_kept, _ = ref(f, causal=1, comp_mode=2)
    assert np.abs(got["output"] - want).max() <= F32_TOL
    np.testing.assert_array_equal(got["kept"], want_kept)
    # zero-length past: present = the new keys
    g = make_case(rng, 1, 4, 2, 5, 0, 8, 8, 16)
    g["past_key"] = np.zeros((1, 2, 0, 8), np.float32)
    g["past_value"] = np.zeros((1, 2, 0, 8), np.float32)
    out = S.run(sess(past=True, present=True, causal=1), **g)
    np.testing.assert_array_equal(out["present_key"], g["key"])
    want, _, _ = ref(g, sdc=False, causal=1)
    assert np.abs(out["output"] - want).max() <= F32_TOL


def test_short_rows_keep_everything():
    """Rows calibrated as shorter than k carry θ = -inf and keep all their valid keys."""
    rng = np.random.default_rng(5)
    f = make_case(rng, 1, 3, 3, 12, 0, 8, 8, 12, dense_rows=6)
    f["thresholds"] = untie(f, 1)
    got = S.run(sess(sdc=True, causal=1, comp_mode=1), **f)
    np.testing.assert_array_equal(got["kept"][:, :, :6], np.broadcast_to(np.arange(1, 7), (1, 3, 6)))
    assert (got["kept"][:, :, 6:] < np.arange(7, 13)).any()
    want, _, _ = ref(f, causal=1, comp_mode=1)
    assert np.abs(got["output"] - want).max() <= F32_TOL


@pytest.mark.parametrize("comp_mode", [0, 1, 2])
def test_all_pruned_rows(comp_mode):
    """θ = +inf prunes everything: zeros, except VMC which returns the mean of the valid V rows."""
    rng = np.random.default_rng(6)
    B, H, Sq, D = 2, 2, 6, 8
    f = make_case(rng, B, H, H, Sq, 0, D, D, Sq)
    f["thresholds"][:] = np.inf
    got = S.run(sess(sdc=True, causal=1, comp_mode=comp_mode), **f)
    assert (got["kept"] == 0).all()
    if comp_mode < 2:
        assert (got["output"] == 0).all()
    else:
        v = f["value"].astype(np.float64)
        vbar = np.cumsum(v, axis=2) / np.arange(1, Sq + 1)[None, None, :, None]
        assert np.abs(got["output"] - vbar).max() <= F32_TOL
    # without sdc there is nothing to compensate with: zeros in every mode
    nosdc = S.run(sess(causal=1, comp_mode=comp_mode), **{**f, "sdc": None})
    assert (nosdc["output"] == 0).all()
    # sdc of zero: denominator 0 -> zeros
    zero = S.run(sess(sdc=True, causal=1, comp_mode=comp_mode), **{**f, "sdc": np.zeros_like(f["sdc"])})
    assert (zero["output"] == 0).all()
    # a denormal ρ (calibration gives them, e.g. Qwen2.5-1.5B layer 1): Dp below FLT_MIN, whose 1 / Dp overflows
    tiny = S.run(sess(sdc=True, causal=1, comp_mode=comp_mode), **{**f, "sdc": np.full_like(f["sdc"], 2.3e-42)})
    assert not np.isnan(tiny["output"]).any()
    if comp_mode < 2:
        assert (tiny["output"] == 0).all()
    else:
        assert np.abs(tiny["output"] - vbar).max() <= F32_TOL


def _masks(rng, B, Hq, Sq, Ktot):
    pad = rng.random((B, Ktot)) > 0.25
    pad[:, -1] = True
    pad[0, :] = False  # batch 0 fully masked: zero rows
    m4 = rng.random((B, 1, Sq, Ktot)) > 0.3
    mh = rng.random((1, Hq, 1, Ktot)) > 0.3
    add = rng.uniform(-1.0, 0.0, (B, 1, Sq, Ktot)).astype(np.float32)
    add[rng.random(add.shape) < 0.2] = -np.inf
    add[rng.random(add.shape) < 0.1] = -1e30
    add[:, :, :, :2] = -3e38
    return {"bool2d": pad, "bool4d": m4, "bool4d_heads": mh, "additive": add}


@pytest.mark.parametrize("kind", ["bool2d", "bool4d", "bool4d_heads", "additive"])
@pytest.mark.parametrize("causal", [0, 1])
def test_masks_fp32(kind, causal):
    rng = np.random.default_rng(7 + causal)
    B, Hq, Hkv, Sq, P, D = 2, 4, 2, 10, 3, 16
    f = make_case(rng, B, Hq, Hkv, Sq, P, D, D, 16, dense_rows=2)
    mask = _masks(rng, B, Hq, Sq, P + Sq)[kind]
    f["thresholds"] = untie(f, causal, mask)
    mtype = "bool" if mask.dtype == np.bool_ else "float32"
    got = S.run(sess(mask=mtype, past=True, sdc=True, causal=causal, comp_mode=2), attn_mask=mask, **f)
    want, want_kept, _ = ref(f, mask, causal=causal, comp_mode=2)
    assert np.abs(got["output"] - want).max() <= F32_TOL
    np.testing.assert_array_equal(got["kept"], want_kept)
    if kind == "bool2d":
        assert (got["output"][0] == 0).all() and (got["kept"][0] == 0).all()


@pytest.mark.parametrize("mask_type", [None, "bool", "float16", "float32"])
def test_fp16(mask_type):
    rng = np.random.default_rng(8)
    B, Hq, Hkv, Sq, P, D = 2, 6, 2, 9, 14, 32
    f = make_case(rng, B, Hq, Hkv, Sq, P, D, D, 32, dtype=np.float16, dense_rows=4)
    mask = None
    if mask_type == "bool":
        mask = rng.random((B, P + Sq)) > 0.2
    elif mask_type:
        mask = rng.uniform(-1, 0, (B, 1, Sq, P + Sq)).astype(mask_type)
        mask[rng.random(mask.shape) < 0.2] = -65504.0 if mask_type == "float16" else -np.inf
    f["thresholds"] = untie(f, 1, mask)
    got = S.run(
        sess("float16", mask=mask_type, past=True, present=True, sdc=True, causal=1, comp_mode=2), attn_mask=mask, **f
    )
    assert got["output"].dtype == np.float16 and got["present_key"].dtype == np.float16
    want, want_kept, _ = ref(f, mask, causal=1, comp_mode=2)
    err = np.abs(got["output"].astype(np.float64) - want).max() / np.abs(want).max()
    assert err <= F16_REL_TOL
    np.testing.assert_array_equal(got["kept"], want_kept)
    np.testing.assert_array_equal(got["present_value"][:, :, :P], f["past_value"])


def test_float16_mask_cutoff_only_for_float16_masks():
    """-65504 excludes a key in a float16 mask but is an ordinary (large negative) bias in a float32 mask."""
    rng = np.random.default_rng(9)
    f = make_case(rng, 1, 2, 2, 1, 4, 8, 8, 8, dtype=np.float16)
    f["thresholds"][:] = -np.inf
    m16 = np.zeros((1, 5), np.float16)
    m16[0, 0] = -65504
    k16 = S.run(sess("float16", mask="float16", past=True), attn_mask=m16, **f)["kept"]
    k32 = S.run(sess("float16", mask="float32", past=True), attn_mask=m16.astype(np.float32), **f)["kept"]
    assert (k16 == 4).all() and (k32 == 5).all()


def test_threads_agree():
    rng = np.random.default_rng(10)
    f = make_case(rng, 2, 4, 2, 40, 0, 16, 16, 40, dense_rows=3)
    one = S.run(sess(sdc=True, causal=1, comp_mode=2, threads=1), **f)
    two = S.run(sess(sdc=True, causal=1, comp_mode=2, threads=2), **f)
    np.testing.assert_array_equal(one["output"], two["output"])
    np.testing.assert_array_equal(one["kept"], two["kept"])


def test_optional_outputs_can_be_omitted():
    rng = np.random.default_rng(11)
    f = make_case(rng, 1, 2, 1, 5, 0, 8, 8, 5)
    got = S.run(sess(kept=False, causal=1), **f)
    assert list(got) == ["output"]
    want, _, _ = ref(f, sdc=False, causal=1)
    assert np.abs(got["output"] - want).max() <= F32_TOL


def _base(rng):
    return dict(
        query=randn(rng, (1, 4, 5, 8)),
        key=randn(rng, (1, 2, 5, 8)),
        value=randn(rng, (1, 2, 5, 8)),
        thresholds=np.zeros((4, 3), np.float32),
    )


@pytest.mark.parametrize(
    "change,model_kw,message",
    [
        ({"thresholds": np.zeros((3, 3), np.float32)}, {}, "thresholds must be float32 [Hq, R] = [4, R>=1]"),
        ({"thresholds": np.zeros((4, 0), np.float32)}, {}, "thresholds must be float32 [Hq, R]"),
        ({"query": np.zeros((4, 5, 8), np.float32)}, {}, "rank 3) needs the attributes num_heads and num_kv_heads"),
        ({"query": np.zeros((1, 2, 4, 5, 8), np.float32)}, {}, "query must be [B, Hq, Sq, D] (or packed [B, Sq, Hq·D]"),
        (
            {"key": np.zeros((1, 3, 5, 8), np.float32), "value": np.zeros((1, 3, 5, 8), np.float32)},
            {},
            "must be a multiple of key/value heads Hkv=3",
        ),
        ({"key": np.zeros((1, 2, 5, 4), np.float32)}, {}, "key shape [1, 2, 5, 4] does not match query"),
        ({"value": np.zeros((1, 2, 4, 8), np.float32)}, {}, "value shape [1, 2, 4, 8] does not match key"),
        ({"sdc": np.zeros((4, 2), np.float32)}, {"sdc": True}, "sdc shape [4, 2] must equal thresholds shape [4, 3]"),
        ({}, {"num_heads": 8}, "attribute num_heads=8 disagrees with query heads Hq=4"),
        ({}, {"num_kv_heads": 1}, "attribute num_kv_heads=1 disagrees with key/value heads Hkv=2"),
        ({"attn_mask": np.ones((1, 4), bool)}, {"mask": "bool"}, "attn_mask shape [1, 4] does not fit"),
        ({"attn_mask": np.ones((1, 5, 5), bool)}, {"mask": "bool"}, "got rank-3 shape"),
        ({"attn_mask": np.ones((2, 1, 5, 5), bool)}, {"mask": "bool"}, "attn_mask shape [2, 1, 5, 5] does not fit"),
        (
            {"past_key": np.zeros((1, 2, 3, 8), np.float32), "past_value": np.zeros((1, 2, 2, 8), np.float32)},
            {"past": True},
            "past_value must be [B, Hkv, P, Dv] = [1, 2, 3, 8]",
        ),
        (
            {"past_key": np.zeros((1, 1, 3, 8), np.float32), "past_value": np.zeros((1, 1, 3, 8), np.float32)},
            {"past": True},
            "past_key must be [B, Hkv, P, D]",
        ),
        ({"query": np.zeros((1, 4, 6, 8), np.float32)}, {}, "query length Sq=6 exceeds key length Ktot=P+Sk=5"),
    ],
)
def test_bad_inputs_give_clear_errors(change, model_kw, message):
    rng = np.random.default_rng(12)
    feeds = {**_base(rng), **change}
    if model_kw.get("sdc") and "sdc" not in feeds:
        feeds["sdc"] = np.zeros((4, 3), np.float32)
    with pytest.raises(Exception) as e:
        S.run(sess(**model_kw), **feeds)
    assert message in str(e.value)
    assert "TopThetaAttention node 'tt0'" in str(e.value)


@pytest.mark.parametrize(
    "attrs,message",
    [
        ({"comp_mode": 3}, "comp_mode must be 0 (none), 1 (SDC) or 2"),
        ({"causal": 2}, "attribute causal must be 0 or 1"),
        ({"softcap": -1.0}, "attribute softcap must be 0 (none) or a finite positive cap"),
    ],
)
def test_bad_attributes_fail_at_session_creation(attrs, message):
    with pytest.raises(Exception) as e:
        S.session(S.make_model(**attrs))
    assert message in str(e.value)


def test_missing_library_is_a_toptheta_error(tmp_path, monkeypatch):
    model = tmp_path / "m.onnx"
    model.write_bytes(S.make_model().SerializeToString())
    monkeypatch.setenv(runtime.LIBRARY_ENV, str(tmp_path / "nope" / "libtoptheta_ops.so"))
    with pytest.raises(TopThetaError, match="does not exist"):
        runtime.session(model, device="cpu")
    bogus = tmp_path / "libtoptheta_ops.so"
    bogus.write_bytes(b"not a shared library")
    monkeypatch.setenv(runtime.LIBRARY_ENV, str(bogus))
    with pytest.raises(TopThetaError, match="could not load the custom-op library"):
        runtime.session(model, device="cpu")


def test_runtime_session_runs_the_op(tmp_path, library):
    model = tmp_path / "m.onnx"
    model.write_bytes(S.make_model(causal=1).SerializeToString())
    s = runtime.session(model, device="cpu", library=library)
    rng = np.random.default_rng(13)
    f = make_case(rng, 1, 2, 2, 4, 0, 8, 8, 4)
    f["thresholds"][:] = -np.inf
    out = S.run(s, **{k: f[k] for k in ("query", "key", "value", "thresholds")})
    np.testing.assert_array_equal(out["kept"], [[[1, 2, 3, 4]] * 2])


# -- NaN (docs/op.md, "NaN"): a NaN score is kept and makes its row NaN; pruned V rows are not read ---------


def _torch_ref(f, causal, comp_mode, mask=None, scale=None, softcap=None):
    """topthetaexport.torch.reference (PyTorch, float64) on the feeds: (output, kept)."""
    import torch

    from topthetaexport.torch import reference

    def t(x):
        return None if x is None else torch.from_numpy(np.asarray(x, np.float64))

    out, kept = reference.toptheta_attention(
        t(f["query"]),
        t(f["key"]),
        t(f["value"]),
        torch.from_numpy(f["thresholds"]),
        scale=scale,
        causal=bool(causal),
        attn_mask=None if mask is None else torch.from_numpy(mask),
        past_key=t(f["past_key"]),
        past_value=t(f["past_value"]),
        sdc=t(f["sdc"]),
        comp_mode=comp_mode,
        return_kept=True,
        softcap=softcap,
    )
    return out.numpy(), kept.numpy()


def _assert_same_with_nan(got, want, tol):
    """The same NaN positions, and the other values within tol (absolute)."""
    got, want = got.astype(np.float64), np.asarray(want, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    fin = ~np.isnan(want)
    assert np.abs(got[fin] - want[fin]).max() <= tol


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("comp_mode", [0, 1, 2])
def test_nan_in_query_row_gives_nan_row_only(dtype, comp_mode):
    rng = np.random.default_rng(20 + comp_mode)
    B, Hq, Hkv, Sq, P, D = 2, 4, 2, 12, 5, 16
    f = make_case(rng, B, Hq, Hkv, Sq, P, D, D, 17, dtype=np.dtype(dtype), dense_rows=2)
    f["thresholds"] = untie(f, 1)
    f["query"][1, 2, 7, 3] = np.nan
    got = S.run(sess(dtype, past=True, sdc=True, causal=1, comp_mode=comp_mode), **f)
    want, want_kept = _torch_ref(f, 1, comp_mode)
    out = got["output"].astype(np.float64)
    assert np.isnan(out[1, 2, 7]).all()
    others = np.ones(out.shape[:3], bool)
    others[1, 2, 7] = False
    assert np.isfinite(out[others]).all()
    tol = F32_TOL if dtype == "float32" else F16_REL_TOL * np.abs(want[others]).max()
    _assert_same_with_nan(out, want, tol)
    # every valid score of the row is NaN, so every one counts as kept: P + i + 1 keys (causal)
    assert got["kept"][1, 2, 7] == P + 7 + 1
    np.testing.assert_array_equal(got["kept"], want_kept)


def test_nan_in_key_row_gives_nan_in_the_rows_that_see_it():
    rng = np.random.default_rng(23)
    B, Hq, Hkv, Sq, P, D = 1, 4, 2, 12, 5, 16
    f = make_case(rng, B, Hq, Hkv, Sq, P, D, D, 17)
    f["thresholds"] = untie(f, 1)
    j = 9  # a new key (P = 5): rows at positions >= 9 (query index >= 4) see it under the causal mask
    f["key"][0, 1, j - P, 0] = np.nan
    got = S.run(sess(past=True, sdc=True, causal=1, comp_mode=1), **f)
    want, want_kept = _torch_ref(f, 1, 1)
    out = got["output"]
    assert np.isnan(out[0, 2:, 4:]).all()  # query heads 2, 3 read kv head 1
    assert np.isfinite(out[0, 2:, :4]).all() and np.isfinite(out[0, :2]).all()
    _assert_same_with_nan(out, want, F32_TOL)
    np.testing.assert_array_equal(got["kept"], want_kept)


@pytest.mark.parametrize("comp_mode", [0, 1, 2])
def test_nan_in_pruned_value_row_is_not_read(comp_mode):
    """A V row whose key every row prunes is never read: the output stays finite and equals the reference.
    Only VMC (comp_mode 2) reads all valid V rows, so there the rows with pruned mass are NaN."""
    rng = np.random.default_rng(24)
    B, Hq, Hkv, Sq, P, D = 2, 4, 2, 10, 6, 16
    f = make_case(rng, B, Hq, Hkv, Sq, P, D, D, 16)
    j = 3  # a past key, visible to every row
    f["past_key"][:, :, j] = 0.0  # its score is 0 in every row ...
    f["thresholds"] = np.maximum(f["thresholds"], 0.25).astype(np.float32)  # ... and every θ is above it
    f["thresholds"] = untie(f, 1)
    f["past_value"][:, 1, j] = np.nan
    got = S.run(sess(past=True, sdc=True, causal=1, comp_mode=comp_mode), **f)
    want, want_kept = _torch_ref(f, 1, comp_mode)
    np.testing.assert_array_equal(got["kept"], want_kept)
    assert (want_kept > 0).any()
    out = got["output"]
    if comp_mode < 2:
        assert np.isfinite(out).all()
        assert np.abs(out - want).max() <= F32_TOL
    else:
        assert np.isnan(out[:, 2:]).all() and np.isfinite(out[:, :2]).all()  # kv head 1: all rows prune something
        _assert_same_with_nan(out, want, F32_TOL)
    # a kept key's NaN V row is read, as in dense attention
    dense = dict(f, thresholds=np.full_like(f["thresholds"], -np.inf))
    out = S.run(sess(past=True, sdc=True, causal=1, comp_mode=comp_mode), **dense)["output"]
    assert np.isnan(out[:, 2:]).all() and np.isfinite(out[:, :2]).all()


# -- Fuzz: fp32 scores with the rounding bound and double recompute near θ keep the float64 decisions ---------
#
# The kernel scores in fp32 and recomputes in double only the scores within its rounding bound of θ. These cases
# put θ exactly on scores (ties: inputs on a coarse dyadic grid, so every score is exact in fp32 and fp64) or
# within 1e-7 relative of them (Gaussian inputs), over shapes with many key tiles, causal tile edges, masks,
# past, GQA and the key splits of decode; the kept counts must equal the float64 torch reference's exactly.

ISAS = ["avx2", "scalar"]  # TOPTHETA_CPU_ISA: the AVX2 body (when the CPU has it) and the portable one


def _fuzz_case(seed):
    rng = np.random.default_rng(1000 + seed)
    ties = seed % 2 == 0
    B = int(rng.integers(1, 3))
    Hkv = int(rng.integers(1, 4))
    Hq = Hkv * int(rng.integers(1, 4))
    D = int(rng.choice([8, 16, 64] if ties else [8, 16, 24, 64, 20]))  # 20: portable body only
    Dv = int(rng.choice([8, 16, 64]))
    decode = rng.random() < 0.4
    if decode:  # Ktot >= 1024 with few tasks: the kernel splits the keys
        Sq, P = 1, int(rng.integers(1024, 2200))
    else:
        Sq, P = int(rng.integers(1, 150)), int(rng.choice([0, int(rng.integers(1, 130))]))
    Ktot = P + Sq
    R = int(rng.choice([1, 7, Ktot]))
    causal = int(rng.random() < 0.7)

    def draw(shape):
        if ties:  # multiples of 1/4 in [-2, 2]: products and sums of <= 64 terms are exact in fp32
            return (rng.integers(-8, 9, shape) / 4.0).astype(np.float32)
        return rng.standard_normal(shape).astype(np.float32)

    f = dict(
        query=draw((B, Hq, Sq, D)),
        key=draw((B, Hkv, Sq, D)),
        value=rng.standard_normal((B, Hkv, Sq, Dv)).astype(np.float32),
        past_key=draw((B, Hkv, P, D)) if P else None,
        past_value=rng.standard_normal((B, Hkv, P, Dv)).astype(np.float32) if P else None,
        sdc=rng.uniform(0.05, 0.9, (Hq, R)).astype(np.float32),
        thresholds=np.zeros((Hq, R), np.float32),
    )
    mask_kind = rng.choice(["none", "bool", "float32"])
    mask = None
    if mask_kind == "bool":
        mask = rng.random((B, Ktot)) > 0.2
        mask[:, -1] = True
    elif mask_kind == "float32":  # ties: additive values on the grid too, some excluded
        mask = (rng.integers(-4, 5, (B, 1, Sq, Ktot)) / 4.0).astype(np.float32)
        mask[rng.random(mask.shape) < 0.15] = -np.inf
    # scale 1/sqrt(D) is exact (a power of 2) for D in 16, 64; others get an explicit exact scale
    scale = 0.0 if D in (16, 64) else 0.25
    _, _, scores = S.reference(
        f["query"],
        f["key"],
        f["value"],
        f["thresholds"],
        mask,
        f["past_key"],
        f["past_value"],
        scale=scale,
        causal=causal,
    )
    for h in range(Hq):
        for rr in range(R):
            rows = [i for i in range(Sq) if min(Ktot - Sq + i, R - 1) == rr]
            s = scores[:, h, rows].ravel() if rows else np.array([])
            s = s[np.isfinite(s)]
            if s.size == 0 or (rr < R - 1 and rng.random() < 0.1):  # a few dense (-inf) rows
                f["thresholds"][h, rr] = -np.inf
                continue
            target = float(np.quantile(s, rng.uniform(0.5, 0.97)))
            target = float(s[np.argmin(np.abs(s - target))])  # an actual score
            if not ties:  # within 1e-7 relative: below, on (rounded to fp32) or above
                target *= 1 + rng.choice([-1e-7, -3e-8, 0.0, 3e-8, 1e-7])
            f["thresholds"][h, rr] = np.float32(target)
    return f, mask, dict(scale=scale, causal=causal), ties


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("seed", range(16))
def test_fuzz_decisions_equal_float64_reference(seed, isa, monkeypatch):
    monkeypatch.setenv("TOPTHETA_CPU_ISA", isa)
    f, mask, attrs, ties = _fuzz_case(seed)
    mask_type = None if mask is None else str(mask.dtype)
    comp_mode = seed % 3
    got = S.run(
        sess(mask=mask_type, past=f["past_key"] is not None, sdc=True, comp_mode=comp_mode, **attrs),
        **f,
        attn_mask=mask,
    )

    want, want_kept = _torch_ref(f, attrs["causal"], comp_mode, mask, scale=attrs["scale"] or None)
    np.testing.assert_array_equal(got["kept"], want_kept)
    assert np.abs(got["output"] - want).max() <= F32_TOL

    # The case has teeth: θ sits on (ties) or within fp32 rounding of scores, where a plain fp32 comparison errs.
    _, _, scores = S.reference(
        f["query"],
        f["key"],
        f["value"],
        f["thresholds"],
        mask,
        f["past_key"],
        f["past_value"],
        scale=attrs["scale"],
        causal=attrs["causal"],
    )
    Ktot, Sq = scores.shape[-1], scores.shape[2]
    rr = np.minimum(np.arange(Ktot - Sq, Ktot), f["thresholds"].shape[1] - 1)
    th = np.broadcast_to(f["thresholds"][:, rr].astype(np.float64)[None, :, :, None], scores.shape)
    use = np.isfinite(th) & np.isfinite(scores)
    gap = np.abs(scores[use] - th[use]) / np.maximum(np.abs(th[use]), 1e-30)
    assert (gap <= (0 if ties else 2e-7)).any()


# -- Shared-buffer KV cache (input 8 past_sequence_length, docs/op.md): past/present are one [B, Hkv, M, *] buffer,
# the Sk new rows go to [P_b, P_b + Sk) and batch row b attends over its first P_b + Sk rows. -----------------------


def shared_case(rng, B, Hq, Hkv, Sq, lens, M, D, R, dtype=np.float32, mask=False):
    """Shared-form feeds and mask ([B, M] key padding or None). Buffer rows at and above P_b are NaN: the new rows
    overwrite [P_b, P_b + Sk), the rest must never be read."""
    lens = np.asarray(lens, np.int32)
    f = make_case(rng, B, Hq, Hkv, Sq, 0, D, D, R, dtype=dtype, dense_rows=2)
    pk, pv = randn(rng, (B, Hkv, M, D), dtype), randn(rng, (B, Hkv, M, D), dtype)
    for b in range(B):
        pk[b, :, lens[b] :] = np.nan
        pv[b, :, lens[b] :] = np.nan
    f.update(past_key=pk, past_value=pv, past_sequence_length=lens)
    m = rng.random((B, M)) > 0.25 if mask else None
    _, _, scores = S.reference(f["query"], f["key"], f["value"], f["thresholds"], m, pk, pv, causal=1, past_lens=lens)
    f["thresholds"] = S.untie_thresholds(f["thresholds"], scores, lens=S.key_lens(B, M, lens, Sq))
    return f, m


def concat_rows(f, mask, dtype, **attrs):
    """The same call in the classic concat form, one batch row at a time with P = P_b: [(output, kept, presents)]."""
    Sk = f["key"].shape[2]
    s = sess(dtype, mask=None if mask is None else "bool", past=True, present=True, sdc=True, **attrs)
    rows = []
    for b, P in enumerate(f["past_sequence_length"]):
        one = {n: np.ascontiguousarray(f[n][b : b + 1]) for n in ("query", "key", "value")}
        for n in ("past_key", "past_value"):
            one[n] = np.ascontiguousarray(f[n][b : b + 1, :, :P])
        m = None if mask is None else np.ascontiguousarray(mask[b : b + 1, : P + Sk])
        rows.append(S.run(s, thresholds=f["thresholds"], sdc=f["sdc"], attn_mask=m, **one))
    return rows


SHARED = {
    "prefill": dict(Sq=13, lens=[0, 0, 0], M=40),
    "chunk": dict(Sq=5, lens=[0, 7, 27], M=32),  # 27 + 5 = M: a full buffer
    "decode": dict(Sq=1, lens=[3, 17, 30], M=31),
    "decode_long": dict(Sq=1, lens=[1500, 40, 1100], M=1600),  # key splits (cut over the longest row)
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "keypad"])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("kind", list(SHARED))
def test_shared_form_equals_concat_form(kind, Hq, Hkv, mask, dtype, isa, monkeypatch):
    monkeypatch.setenv("TOPTHETA_CPU_ISA", isa)
    c = SHARED[kind]
    B, D, R, Sq, M = 3, 16, 24, c["Sq"], c["M"]
    rng = np.random.default_rng(list(SHARED).index(kind) * 100 + Hq + 10 * mask)
    f, m = shared_case(rng, B, Hq, Hkv, Sq, c["lens"], M, D, R, np.dtype(dtype), mask)
    inputs = {n: f[n].copy() for n in ("past_key", "past_value")}
    attrs = dict(causal=1, comp_mode=2, num_heads=Hq, num_kv_heads=Hkv)
    s = sess(dtype, mask=None if m is None else "bool", past=True, present=True, sdc=True, past_lens=True, **attrs)
    got = S.run(s, attn_mask=m, **f)
    for n in ("past_key", "past_value"):  # present is other memory here: the op copied past first
        np.testing.assert_array_equal(f[n], inputs[n])
    assert got["present_key"].shape == (B, Hkv, M, D)

    want = concat_rows(f, m, dtype, **attrs)
    exact = max(c["lens"]) + Sq < 1024  # no key splits: each batch row runs the very same tasks as alone
    for b, (P, w) in enumerate(zip(c["lens"], want)):
        np.testing.assert_array_equal(got["kept"][b], w["kept"][0])
        if exact:
            np.testing.assert_array_equal(got["output"][b], w["output"][0])
        else:
            err = np.abs(got["output"][b].astype(np.float64) - w["output"][0]).max()
            assert err <= (F32_TOL if dtype == "float32" else 2e-3)
        for n, new in (("present_key", "key"), ("present_value", "value")):
            pres = got[n][b]
            np.testing.assert_array_equal(pres[:, : P + Sq], w[n][0])  # [past rows ; new rows]
            np.testing.assert_array_equal(pres[:, P : P + Sq], f[new][b])
            np.testing.assert_array_equal(pres[:, P + Sq :], f["past_" + new][b, :, P + Sq :])  # untouched (NaN)

    ref_out, ref_kept, _ = S.reference(
        f["query"],
        f["key"],
        f["value"],
        f["thresholds"],
        m,
        f["past_key"],
        f["past_value"],
        f["sdc"],
        causal=1,
        comp_mode=2,
        past_lens=f["past_sequence_length"],
    )
    np.testing.assert_array_equal(got["kept"], ref_kept)
    if dtype == "float32":
        assert np.abs(got["output"] - ref_out).max() <= F32_TOL
    else:
        assert np.abs(got["output"].astype(np.float64) - ref_out).max() / np.abs(ref_out).max() <= F16_REL_TOL
    valid = S.key_lens(B, M, c["lens"], Sq)[:, None, None]
    assert 0 < ref_kept.sum() < (np.minimum(valid, M) * np.ones_like(ref_kept)).sum()  # prunes, keeps


def test_shared_form_broadcast_length():
    """A [1] past_sequence_length is the length of every batch row."""
    rng = np.random.default_rng(40)
    f, _ = shared_case(rng, 2, 4, 2, 2, [6, 6], 12, 8, 12)
    s = sess(past=True, present=True, past_lens=True, causal=1)
    full = S.run(s, **f)
    one = S.run(s, **{**f, "past_sequence_length": np.array([6], np.int32)})
    for n in full:
        np.testing.assert_array_equal(one[n], full[n])


def test_shared_buffer_in_place_with_iobinding():
    """One CPU OrtValue bound as past_key input and present_key output (same for value): each decode step writes
    its row at P_b of that buffer, leaves every other row as it was, and attends over the rows written before."""
    import onnxruntime as ort

    rng = np.random.default_rng(41)
    B, Hq, Hkv, D, M, R = 2, 4, 2, 16, 12, 12
    lens = np.array([3, 8], np.int32)
    f, _ = shared_case(rng, B, Hq, Hkv, 1, lens, M, D, R)
    buf = {n: f[n].copy() for n in ("past_key", "past_value")}  # what the buffers must hold
    vals = {n: ort.OrtValue.ortvalue_from_numpy(f[n].copy()) for n in buf}
    s = sess(past=True, present=True, past_lens=True, sdc=True, causal=1, comp_mode=1)
    for step in range(4):
        P = lens + np.int32(step)
        new = dict(query=randn(rng, (B, Hq, 1, D)), key=randn(rng, (B, Hkv, 1, D)), value=randn(rng, (B, Hkv, 1, D)))
        out = ort.OrtValue.ortvalue_from_numpy(np.full((B, Hq, 1, D), np.nan, np.float32))
        kept = ort.OrtValue.ortvalue_from_numpy(np.full((B, Hq, 1), -1, np.int32))
        io = s.io_binding()
        for n, x in dict(new, thresholds=f["thresholds"], sdc=f["sdc"], past_sequence_length=P).items():
            io.bind_cpu_input(n, x)
        for past, present in (("past_key", "present_key"), ("past_value", "present_value")):
            io.bind_ortvalue_input(past, vals[past])
            io.bind_ortvalue_output(present, vals[past])
        io.bind_ortvalue_output("output", out)
        io.bind_ortvalue_output("kept", kept)
        s.run_with_iobinding(io)

        for b in range(B):
            buf["past_key"][b, :, P[b]] = new["key"][b, :, 0]
            buf["past_value"][b, :, P[b]] = new["value"][b, :, 0]
        for n in buf:  # the new rows appended in place, everything else untouched (NaN garbage included)
            np.testing.assert_array_equal(vals[n].numpy(), buf[n])
        want, want_kept, _ = S.reference(
            new["query"],
            new["key"],
            new["value"],
            f["thresholds"],
            None,
            buf["past_key"],
            buf["past_value"],
            f["sdc"],
            causal=1,
            comp_mode=1,
            past_lens=P,
        )
        np.testing.assert_array_equal(kept.numpy(), want_kept)
        assert np.abs(out.numpy() - want).max() <= F32_TOL


def _shared_base(rng):
    M = 8
    pk = randn(rng, (2, 2, M, 8))
    return dict(
        query=randn(rng, (2, 4, 3, 8)),
        key=randn(rng, (2, 2, 3, 8)),
        value=randn(rng, (2, 2, 3, 8)),
        thresholds=np.zeros((4, 3), np.float32),
        past_key=pk,
        past_value=pk.copy(),
        past_sequence_length=np.array([2, 5], np.int32),
    )


SHARED_KW = dict(past=True, present=True, past_lens=True)


@pytest.mark.parametrize(
    "change,model_kw,message",
    [
        (
            {"past_sequence_length": np.array([-1, 2], np.int32)},
            SHARED_KW,
            "past_sequence_length[0] = -1 is out of range: need 0 <= P_b and P_b + Sk <= M (Sk=3, M=8)",
        ),
        ({"past_sequence_length": np.array([2, 6], np.int32)}, SHARED_KW, "past_sequence_length[1] = 6 is out of"),
        ({"past_sequence_length": np.array([6], np.int32)}, SHARED_KW, "past_sequence_length[0] = 6 is out of"),
        (
            {"past_sequence_length": np.array([1, 2, 3], np.int32)},
            SHARED_KW,
            "past_sequence_length must be int32 [B] = [2] or [1], got shape [3]",
        ),
        ({"past_sequence_length": np.array([[2, 5]], np.int32)}, SHARED_KW, "got shape [1, 2]"),
        ({}, dict(past=True, past_lens=True), "needs the present_key and present_value outputs"),
        ({}, dict(present=True, past_lens=True), "needs past_key and past_value: pass the [B, Hkv, M, D]"),
        (
            {"key": np.zeros((2, 2, 9, 8), np.float32), "value": np.zeros((2, 2, 9, 8), np.float32)},
            SHARED_KW,
            "key length Sk=9 exceeds the KV buffer capacity M=8",
        ),
        ({"query": np.zeros((2, 4, 4, 8), np.float32)}, SHARED_KW, "query length Sq=4 exceeds the new key length Sk=3"),
        (
            {"past_value": np.zeros((2, 2, 7, 8), np.float32)},
            SHARED_KW,
            "past_value must be [B, Hkv, M, Dv] = [2, 2, 8",
        ),
        (
            {"attn_mask": np.ones((2, 5), bool)},
            dict(SHARED_KW, mask="bool"),
            "attn_mask shape [2, 5] does not fit: expected [B, M] = [2, 8]",
        ),
    ],
)
def test_shared_form_bad_inputs_give_clear_errors(change, model_kw, message):
    feeds = {**_shared_base(np.random.default_rng(42)), **change}
    with pytest.raises(Exception) as e:
        S.run(sess(**model_kw), **feeds)
    assert message in str(e.value)
    assert "TopThetaAttention node 'tt0'" in str(e.value)


# -- packed layout: query [B, Sq, Hq·D], key/value [B, Sk, Hkv·D], output [B, Sq, Hq·Dv] (docs/op.md, "Layouts") --


PACKED_FORMS = {
    # name: model keywords, case (Sq, P or shared lens, M)
    "prefill_no_cache": dict(kw=dict(), Sq=11, P=0),
    "concat_decode": dict(kw=dict(past=True, present=True), Sq=1, P=29),
    "concat_chunk_no_present": dict(kw=dict(past=True), Sq=4, P=9),
    "shared_decode": dict(kw=dict(past=True, present=True, past_lens=True), Sq=1, lens=[3, 17, 30], M=31),
    "shared_chunk": dict(kw=dict(past=True, present=True, past_lens=True), Sq=5, lens=[0, 7, 27], M=32),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("form", list(PACKED_FORMS))
def test_packed_layout_equals_heads_first(form, dtype, isa, monkeypatch):
    """The same call with packed query/key/value gives the packed output of the heads-first call, bit for bit, the
    same kept counts and the same present K/V (which stay [B, Hkv, *, D])."""
    monkeypatch.setenv("TOPTHETA_CPU_ISA", isa)
    c = PACKED_FORMS[form]
    B, Hq, Hkv, D, R = 3, 6, 2, 16, 40
    rng = np.random.default_rng(500 + list(PACKED_FORMS).index(form))
    if "lens" in c:
        f, _ = shared_case(rng, B, Hq, Hkv, c["Sq"], c["lens"], c["M"], D, R, np.dtype(dtype))
    else:
        f = make_case(rng, B, Hq, Hkv, c["Sq"], c["P"], D, D, R, dtype=np.dtype(dtype), dense_rows=2)
        f["thresholds"] = untie(f, causal=True)
    attrs = dict(causal=1, comp_mode=2, num_heads=Hq, num_kv_heads=Hkv)
    s = sess(dtype, sdc=True, **c["kw"], **attrs)
    heads_first = S.assert_packed_equals_heads_first(s, f)
    assert heads_first["output"].shape == (B, Hq, c["Sq"], D)
    assert 0 < heads_first["kept"].sum()


@pytest.mark.parametrize(
    "change,attrs,message",
    [
        ({}, dict(num_kv_heads=2), "a packed query [B, Sq, Hq·D] (rank 3) needs the attributes num_heads and"),
        ({"key": np.zeros((2, 2, 3, 8), np.float32)}, dict(num_heads=4, num_kv_heads=2), "key must be [B, Sk, Hkv·D]"),
        ({}, dict(num_heads=3, num_kv_heads=2), "must split into num_heads=3 / num_kv_heads=2 heads: fix the"),
        ({"key": np.zeros((2, 3, 12), np.float32)}, dict(num_heads=4, num_kv_heads=2), "(B and D must agree)"),
        ({"value": np.zeros((2, 4, 16), np.float32)}, dict(num_heads=4, num_kv_heads=2), "in B, Sk"),
    ],
)
def test_packed_layout_bad_inputs_give_clear_errors(change, attrs, message):
    rng = np.random.default_rng(43)
    feeds = {
        "query": randn(rng, (2, 3, 32)),
        "key": randn(rng, (2, 3, 16)),
        "value": randn(rng, (2, 3, 16)),
        "thresholds": np.zeros((4, 3), np.float32),
        **change,
    }
    with pytest.raises(Exception) as e:
        S.run(sess(**attrs), **feeds)
    assert message in str(e.value)


# -- softcap (Gemma 2): scores capped to c · tanh(s / c) before the threshold, the mask and the softmax ------------


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("seed", range(6))
def test_softcap_decisions_equal_float64_reference(seed, isa, monkeypatch):
    """θ within 1e-7 (relative) of actual capped scores; kept counts equal the float64 reference's."""
    import torch

    from topthetaexport.torch import reference

    monkeypatch.setenv("TOPTHETA_CPU_ISA", isa)
    rng = np.random.default_rng(7000 + seed)
    Hkv, G = 2, 1 + seed % 3
    Hq = Hkv * G
    D = [16, 64, 256, 20, 32, 256][seed]  # 256: gemma's head dim; 20: portable body only
    Sq, P = (1, 1100) if seed == 3 else (int(rng.integers(5, 40)), int(rng.integers(0, 30)))
    Ktot, causal, comp_mode = P + Sq, seed % 2, seed % 3
    cap = [1.0, 2.0, 5.0, 3.0, 0.5, 4.0][seed]
    f = make_case(rng, 2, Hq, Hkv, Sq, P, D, D, Ktot)
    f["query"] *= 3.0  # large scores, so that the cap saturates some of them
    mask = None
    if seed % 3 == 1:
        mask = rng.random((2, Ktot)) > 0.2
        mask[:, -1] = True

    def t(x):
        return None if x is None else torch.from_numpy(np.asarray(x, np.float64))

    keys = t(f["key"]) if P == 0 else torch.cat([t(f["past_key"]), t(f["key"])], 2)
    s, valid = reference.valid_and_scores(
        t(f["query"]),
        keys,
        causal=bool(causal),
        attn_mask=None if mask is None else torch.from_numpy(mask),
        softcap=cap,
    )
    s, valid = s.numpy(), valid.numpy()
    assert np.abs(s[valid]).max() <= cap and (np.abs(s[valid]) > 0.9 * cap).any()
    th = np.full((Hq, Ktot), -np.inf, np.float32)
    for h in range(Hq):
        for i in range(Sq):
            row = s[:, h, i][valid[:, h, i]]
            target = float(row[np.argmin(np.abs(row - np.quantile(row, rng.uniform(0.4, 0.95))))])
            th[h, Ktot - Sq + i] = np.float32(target * (1 + rng.choice([-1e-7, 0.0, 1e-7])))
    f["thresholds"] = th
    got = S.run(
        sess(
            mask=None if mask is None else "bool",
            past=bool(P),
            sdc=True,
            causal=causal,
            comp_mode=comp_mode,
            softcap=cap,
        ),
        **f,
        attn_mask=mask,
    )
    want, want_kept = _torch_ref(f, causal, comp_mode, mask, softcap=cap)
    np.testing.assert_array_equal(got["kept"], want_kept)
    assert np.abs(got["output"] - want).max() <= F32_TOL
    assert 0 < want_kept.sum() < valid.sum()  # it prunes and keeps
    # without the cap the same inputs keep other keys: the attribute is applied, not ignored
    plain = S.run(
        sess(mask=None if mask is None else "bool", past=bool(P), sdc=True, causal=causal, comp_mode=comp_mode),
        **f,
        attn_mask=mask,
    )
    assert (plain["kept"] != got["kept"]).any()

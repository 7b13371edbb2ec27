"""The shadow K as an op input/output pair of the shared-buffer cache (docs/op.md, "Shadow K"), on the CPU op: the
codes and ranges it writes equal bench/toptheta_cuda.shadow_k of the cache after a prefill and across decode steps,
the output and kept counts are those without the pair, bit for bit, and bad inputs give one-line errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _onnx_single as S  # noqa: E402
from toptheta_cuda import SHADOW_BLOCK, shadow_k  # noqa: E402

from topthetaexport.ort import library as runtime  # noqa: E402

pytestmark = pytest.mark.skipif(runtime.library_path(required=False) is None, reason="custom-op library not built")

KV = ("past_key", "past_value", "past_shadow_key", "past_shadow_range")


def shadow_buffers(B, Hkv, M, D, dtype=np.float16):
    """Zeroed shadow buffers: codes uint8 [B, Hkv, M, D/2], ranges [B, Hkv, ceil(M/64), 2, D]."""
    nb = (M + SHADOW_BLOCK - 1) // SHADOW_BLOCK
    return np.zeros((B, Hkv, M, D // 2), np.uint8), np.zeros((B, Hkv, nb, 2, D), dtype)


def reference_shadow(k_cache: np.ndarray, lens) -> tuple[np.ndarray, np.ndarray]:
    """shadow_k of each batch row's cache with its first lens[b] keys valid (blocks past them zero)."""
    out = [shadow_k(torch.from_numpy(k_cache[b : b + 1]), valid=int(n)) for b, n in enumerate(lens)]
    return (
        np.concatenate([c.numpy() for c, _ in out]),
        np.concatenate([r.numpy() for _, r in out]),
    )


def assert_shadow_equal(got_codes, got_range, k_cache, lens):
    """The valid blocks (all 64 keys below lens[b]) equal shadow_k's, bit for bit; the op leaves the others alone."""
    want_codes, want_range = reference_shadow(k_cache, lens)
    for b, n in enumerate(lens):
        full = int(n) // SHADOW_BLOCK
        assert full > 0
        np.testing.assert_array_equal(got_codes[b, :, : full * SHADOW_BLOCK], want_codes[b, :, : full * SHADOW_BLOCK])
        np.testing.assert_array_equal(got_range[b, :, :full].view(np.uint16), want_range[b, :, :full].view(np.uint16))


class Cache:
    """One session over a shared-buffer model; the cache buffers (K, V and, with ``shadow``, the shadow pair) are
    OrtValues bound as both past input and present output, as a generation binds them."""

    def __init__(self, B, Hq, Hkv, M, D, shadow, seed=0):
        import onnxruntime as ort

        self.rng = np.random.default_rng(seed)
        self.B, self.Hq, self.Hkv, self.D, self.M = B, Hq, Hkv, D, M
        kw = dict(past=True, present=True, past_lens=True, shadow=shadow, causal=1)
        self.sess = S.session(S.make_model("float16", **kw))
        bufs = {
            "past_key": np.full((B, Hkv, M, D), np.nan, np.float16),  # rows past the cache are never read
            "past_value": np.full((B, Hkv, M, D), np.nan, np.float16),
        }
        if shadow:
            bufs["past_shadow_key"], bufs["past_shadow_range"] = shadow_buffers(B, Hkv, M, D)
        self.vals = {n: ort.OrtValue.ortvalue_from_numpy(x) for n, x in bufs.items()}
        self.thresholds = self.rng.uniform(-0.5, 1.0, (Hq, M)).astype(np.float32)
        self.thresholds[:, :8] = -np.inf

    def step(self, lens, q, k, v):
        import onnxruntime as ort

        io = self.sess.io_binding()
        feeds = dict(query=q, key=k, value=v, thresholds=self.thresholds, past_sequence_length=lens)
        for n, x in feeds.items():
            io.bind_cpu_input(n, x)
        for past, val in self.vals.items():
            io.bind_ortvalue_input(past, val)
            io.bind_ortvalue_output(past.replace("past_", "present_"), val)
        out = ort.OrtValue.ortvalue_from_numpy(np.zeros((self.B, self.Hq, q.shape[2], self.D), np.float16))
        kept = ort.OrtValue.ortvalue_from_numpy(np.zeros((self.B, self.Hq, q.shape[2]), np.int32))
        io.bind_ortvalue_output("output", out)
        io.bind_ortvalue_output("kept", kept)
        self.sess.run_with_iobinding(io)
        return out.numpy().copy(), kept.numpy().copy()

    def buffer(self, name):
        return self.vals[name].numpy()

    def assert_shadow(self, lens):
        """The shadow buffers equal shadow_k of the K buffer, batch row b with lens[b] keys."""
        b = self.buffer
        assert_shadow_equal(b("past_shadow_key"), b("past_shadow_range"), b("past_key"), lens)


def new_rows(rng, B, Hq, Hkv, S_, D, scale=1.0):
    def r(h):
        return (rng.standard_normal((B, h, S_, D)) * scale).astype(np.float16)

    return r(Hq), r(Hkv), r(Hkv)


@pytest.mark.parametrize("D", [64, 128])
def test_prefill_writes_the_reference_shadow(D):
    """A prefill of 200 keys completes blocks 0-2 (192 keys): they equal shadow_k's; keys 192-199 and block 3 stay 0."""
    B, Hq, Hkv, M = 2, 4, 2, 300
    c = Cache(B, Hq, Hkv, M, D, shadow=True, seed=D)
    # channels of very different ranges, and a constant one (step 0)
    q, k, v = new_rows(c.rng, B, Hq, Hkv, 200, D)
    k = (k.astype(np.float32) * np.linspace(0.01, 20, D, dtype=np.float32)).astype(np.float16)
    k[0, 0, :64, 5] = 1.5
    c.step(np.zeros(B, np.int32), q, k, v)
    c.assert_shadow([200] * B)
    assert c.buffer("past_shadow_range")[0, 0, 0, 1, 5] == 0  # the constant channel
    assert not c.buffer("past_shadow_key")[:, :, 192:].any() and not c.buffer("past_shadow_range")[:, :, 3:].any()


@pytest.mark.parametrize("scale", [3e-7, 1e-3, 1.0, 300.0], ids=["subnormal", "small", "unit", "large"])
def test_prefill_over_scales_equals_reference(scale):
    """Many blocks at scales where the step lands among fp16 subnormals, or near its rounding points."""
    B, Hq, Hkv, D, M = 1, 2, 2, 64, 64 * 24
    c = Cache(B, Hq, Hkv, M, D, shadow=True, seed=7)
    q, k, v = new_rows(c.rng, B, Hq, Hkv, M, D, scale=scale)
    c.step(np.zeros(B, np.int32), q, k, v)
    c.assert_shadow([M])


def test_decode_across_block_boundaries_equals_reference_and_plain_op():
    """Batch rows at 190 and 120 keys decode 70 steps (to 260 and 190): after every step the shadow is shadow_k of
    the cache, and the output and kept counts equal those of the same op without the shadow pair, bit for bit."""
    B, Hq, Hkv, D, M = 2, 6, 2, 64, 320
    with_s, without = Cache(B, Hq, Hkv, M, D, shadow=True, seed=1), Cache(B, Hq, Hkv, M, D, shadow=False, seed=1)
    rng = np.random.default_rng(2)
    lens = np.array([190, 120], np.int32)
    q, k, v = new_rows(rng, B, Hq, Hkv, int(lens.max()), D)
    # prefill: row 1 takes only its first 120 keys (the rest of its chunk lands past them, then is overwritten)
    for c in (with_s, without):
        c.step(np.zeros(B, np.int32), q, k, v)
    with_s.assert_shadow([190, 190])
    for step in range(70):
        P = lens + np.int32(step)
        q, k, v = new_rows(rng, B, Hq, Hkv, 1, D)
        got, got_kept = with_s.step(P, q, k, v)
        want, want_kept = without.step(P, q, k, v)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_kept, want_kept)
        np.testing.assert_array_equal(with_s.buffer("past_key"), without.buffer("past_key"))
        # row 1 wrote keys 120.. over the prefill's 120..189, so its blocks 1-2 are rewritten as they complete again
        if P[0] % SHADOW_BLOCK in (63, 0) or step in (0, 69):
            have = [int(n) + 1 for n in P]
            with_s.assert_shadow(have)
    assert 0 < int(got_kept.min()) and int(got_kept.max()) < 190  # it prunes, and keeps


def test_shadow_outputs_are_other_memory():
    """Present shadow buffers that are not the inputs' memory: the op copies past in first, as for K and V."""
    B, Hq, Hkv, D, M = 1, 2, 1, 32, 70
    rng = np.random.default_rng(5)
    pk = rng.standard_normal((B, Hkv, M, D)).astype(np.float16)
    codes, rngs = reference_shadow(pk, [64])
    q, k, v = new_rows(rng, B, Hq, Hkv, 1, D)
    s = S.session(S.make_model("float16", past=True, present=True, past_lens=True, shadow=True, causal=1))
    got = S.run(
        s,
        query=q,
        key=k,
        value=v,
        thresholds=np.zeros((Hq, 1), np.float32),
        past_key=pk,
        past_value=pk.copy(),
        past_sequence_length=np.array([64], np.int32),
        past_shadow_key=codes,
        past_shadow_range=rngs,
    )
    np.testing.assert_array_equal(got["present_shadow_key"], codes)  # block 0 as given, no block completed
    np.testing.assert_array_equal(got["present_shadow_range"], rngs)


def _bad_base():
    rng = np.random.default_rng(9)
    B, Hkv, M, D = 2, 2, 70, 32
    codes, ranges = shadow_buffers(B, Hkv, M, D)
    return dict(
        query=rng.standard_normal((B, 4, 1, D)).astype(np.float16),
        key=rng.standard_normal((B, Hkv, 1, D)).astype(np.float16),
        value=rng.standard_normal((B, Hkv, 1, D)).astype(np.float16),
        thresholds=np.zeros((4, 3), np.float32),
        past_key=np.zeros((B, Hkv, M, D), np.float16),
        past_value=np.zeros((B, Hkv, M, D), np.float16),
        past_sequence_length=np.array([3, 63], np.int32),
        past_shadow_key=codes,
        past_shadow_range=ranges,
    )


SHARED = dict(past=True, present=True, past_lens=True)


def _as(feeds, dtype):
    return {n: (x.astype(dtype) if x.dtype == np.float16 else x) for n, x in feeds.items()}


@pytest.mark.parametrize(
    "dtype,model_kw,change,message",
    [
        (
            "float16",
            dict(SHARED, shadow=("uint8", "float32")),
            {"past_shadow_range": np.zeros((2, 2, 2, 2, 32), np.float32)},
            "past_shadow_range must be float16, got float32",
        ),
        (
            "float16",
            dict(SHARED, shadow=("int8", "float16")),
            {"past_shadow_key": np.zeros((2, 2, 70, 16), np.int8)},
            "past_shadow_key must be uint8, got int8",
        ),
        (
            "float16",
            dict(SHARED, shadow=True),
            {"past_shadow_key": np.zeros((2, 2, 70, 32), np.uint8)},
            "past_shadow_key must be uint8 [B, Hkv, M, D/2] = [2, 2, 70, 16], got [2, 2, 70, 32]",
        ),
        (
            "float16",
            dict(SHARED, shadow=True),
            {"past_shadow_range": np.zeros((2, 2, 1, 2, 32), np.float16)},
            "past_shadow_range must be float16 [B, Hkv, ceil(M/64), 2, D] = [2, 2, 2, 2, 32], got [2, 2, 1, 2, 32]",
        ),
        (
            "float32",
            dict(SHARED, shadow=("uint8", "float32")),
            {},
            "(shadow K) need float16 or bfloat16 keys, got float32",
        ),
        (
            "float16",
            dict(past=True, present=True, shadow=True),
            {"past_key": np.zeros((2, 2, 5, 32), np.float16), "past_value": np.zeros((2, 2, 5, 32), np.float16)},
            "(shadow K) need the shared KV buffer form: add past_sequence_length",
        ),
    ],
    ids=["range-dtype", "codes-dtype", "codes-shape", "range-shape", "float32-keys", "concat-form"],
)
def test_bad_shadow_inputs_give_one_line_errors(dtype, model_kw, change, message):
    feeds = {**_as(_bad_base(), np.float32 if dtype == "float32" else np.float16), **change}
    with pytest.raises(Exception) as e:
        S.run(S.session(S.make_model(dtype, **model_kw)), **feeds)
    text = str(e.value)
    assert message in text and "TopThetaAttention node 'tt0'" in text
    assert "\n" not in text.split("TopThetaAttention node")[1].strip()

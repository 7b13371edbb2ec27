"""Evaluation (topthetaexport.eval.evaluation): the ONNX top-k baseline, the cloze task, the eval report and CLI.

Real onnxruntime sessions with the custom-op library, tiny random-weight models, a tiny BPE tokenizer
trained here on a few pydoc topics.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import save_tiny_llama_with_tokenizer
from onnx import TensorProto, helper

from topthetaexport._errors import TopThetaError

try:
    from topthetaexport.cli.main import main as cli_main
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cli.main import main as cli_main

SEQ = 192


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm_out(tmp_path_factory):
    """A tiny LLaMA (GQA 4/2 heads, 3 layers) with a BPE tokenizer, through the pipeline (no validation)."""
    from topthetaexport.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("eval")
    save_tiny_llama_with_tokenizer(root / "model")
    run_pipeline(
        str(root / "model"),
        "builtin:pydoc",
        root / "out",
        k=8,
        seq_len=SEQ,
        num_samples=3,
        dense_layers=1,
        do_validate=False,
    )
    return root


# -- the ONNX top-k replacement -------------------------------------------------------------------------


def _single_node(mask_rank: int | None, causal: int, hq: int = 4, hkv: int = 2):
    """One TopThetaAttention node with stated shapes (so the mask's rank is known to the replacement)."""
    ins = [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", hq, "S", 16]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, ["B", hkv, "K", 16]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, ["B", hkv, "K", 8]),
    ]
    names = ["q", "k", "v", "toptheta.theta.0"]
    if mask_rank:
        shape = ["B", "K"] if mask_rank == 2 else ["B", 1, "S", "K"]
        ins.append(helper.make_tensor_value_info("m", TensorProto.BOOL, shape))
        names.append("m")
    node = helper.make_node(
        "TopThetaAttention",
        names,
        ["y", "", "", "kept"],
        domain="ai.toptheta",
        causal=causal,
        num_heads=hq,
        num_kv_heads=hkv,
        comp_mode=0,
    )
    outs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", hq, "S", 8]),
        helper.make_tensor_value_info("kept", TensorProto.INT32, ["B", hq, "S"]),
    ]
    theta = helper.make_tensor("toptheta.theta.0", TensorProto.FLOAT, [hq, 4], [0.0] * (4 * hq))
    graph = helper.make_graph([node], "one", ins, outs, initializer=[theta])
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("ai.toptheta", 1)], ir_version=10
    )


@pytest.mark.parametrize(
    "mask_rank,causal,sq,ktot", [(2, 1, 7, 19), (4, 0, 5, 5), (None, 1, 1, 12), (2, 0, 6, 6), (None, 0, 3, 3)]
)
def test_topk_replacement_equals_numpy(mask_rank, causal, sq, ktot):
    """The standard-ops top-k equals the float64 NumPy definition: GQA, causal bottom-right, masks, k > row."""
    import onnxruntime as ort

    from topthetaexport.onnx.variants import replace_with_topk, topk_attention_numpy

    rng = np.random.default_rng(sq * 31 + ktot)
    model = _single_node(mask_rank, causal)
    assert replace_with_topk(model, 4, dense_layers=[]) == [0]
    assert not any(n.op_type == "TopThetaAttention" for n in model.graph.node)
    assert not model.graph.initializer or "toptheta.theta.0" not in {t.name for t in model.graph.initializer}
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    b = 2
    q = rng.standard_normal((b, 4, sq, 16)).astype(np.float32)
    k = rng.standard_normal((b, 2, ktot, 16)).astype(np.float32)
    v = rng.standard_normal((b, 2, ktot, 8)).astype(np.float32)
    feeds = {"q": q, "k": k, "v": v}
    pad = np.ones((b, ktot), bool)
    pad[1, : ktot // 3] = False  # batch 1: the first keys are padding
    if mask_rank == 2:
        feeds["m"] = pad
    elif mask_rank == 4:
        feeds["m"] = np.broadcast_to(pad[:, None, None, :], (b, 1, sq, ktot)).copy()
    y, kept = sess.run(["y", "kept"], feeds)
    ref_y, ref_kept = topk_attention_numpy(q, k, v, 4, causal=bool(causal), key_padding=pad if mask_rank else None)
    np.testing.assert_array_equal(kept, ref_kept)
    np.testing.assert_allclose(y, ref_y, atol=2e-5)
    assert kept.max() == min(4, ktot)


def test_topk_variant_matches_pytorch_topk(tiny_lm_out):
    """Whole model, every layer top-k through onnxruntime = the PyTorch top-k reference; dense = dense."""
    from topthetaexport.models import load_model
    from topthetaexport.onnx.variants import write_variant
    from topthetaexport.ort.sessions import OnnxModel
    from topthetaexport.torch.attention import attention_mode

    loaded = load_model(tiny_lm_out / "model")
    ids = torch.randint(3, 900, (2, 40), generator=torch.Generator().manual_seed(3))
    for kind in ("topk", "dense"):
        path = write_variant(tiny_lm_out / "out" / "model.onnx", kind=kind, k=5, dense_layers=[])
        try:
            om = OnnxModel(path)
        finally:
            path.unlink()
        res = om.run(ids.numpy())
        with torch.no_grad(), attention_mode(loaded.model, kind, k=5 if kind == "topk" else None):
            ref = loaded.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
        assert np.abs(res.output - ref).max() < 1e-4
        assert sorted(res.kept) == [0, 1, 2]
        expect = np.minimum(np.arange(1, 41), 5) if kind == "topk" else np.arange(1, 41)
        for kept in res.kept.values():
            np.testing.assert_array_equal(kept, np.broadcast_to(expect, kept.shape))
    assert not [p for p in (tiny_lm_out / "out").iterdir() if p.name.startswith(".variant")]


def test_variant_errors(tiny_lm_out, tmp_path):
    from topthetaexport.onnx.variants import write_variant

    model = tiny_lm_out / "out" / "model.onnx"
    with pytest.raises(TopThetaError, match="top-k needs k >= 1"):
        write_variant(model, kind="topk", k=0)
    with pytest.raises(TopThetaError, match="unknown variant"):
        write_variant(model, kind="sparse")
    with pytest.raises(TopThetaError, match="does not exist"):
        write_variant(tmp_path / "none.onnx")


# -- the cloze task -------------------------------------------------------------------------------------


def test_cloze_is_deterministic_and_correct(tiny_lm_out):
    from transformers import AutoTokenizer

    from topthetaexport.data import token_batches
    from topthetaexport.eval.tasks import build_window_cloze

    tok = AutoTokenizer.from_pretrained(str(tiny_lm_out / "model"))
    win = token_batches(tok, "builtin:pydoc", seq_len=SEQ, num_samples=8, skip=3).numpy()
    a = build_window_cloze(win, tok, num_items=6, source="x")
    b = build_window_cloze(win, tok, num_items=6, source="x")
    assert a == b and len(a) == 6
    assert len({it["window"] for it in a}) >= 3  # spread over windows
    for it in a:
        t, true = it["position"], it["ending_ids"][it["label"]]
        assert t >= SEQ // 4
        assert win[it["window"], t : t + len(true)].tolist() == true  # the correct ending is what follows
        assert tok.decode(win[it["window"], :t].tolist()) == it["ctx"]
        assert len(set(it["endings"])) == 4 and all(e.startswith(" ") for e in it["endings"])
        assert [tok.decode(e) for e in it["ending_ids"]] == it["endings"]
    assert build_window_cloze(win, tok, num_items=6, seed=1) != a


def test_task_file_errors(tmp_path):
    from topthetaexport.eval.tasks import load_task

    cases = {
        "notjson.jsonl": ("{oops\n", "line 1 is not valid JSON"),
        "noctx.jsonl": ('{"endings": ["a", "b"], "label": 0}\n', 'no non-empty string "ctx"'),
        "label.jsonl": ('{"ctx": "c", "endings": ["a", "b"], "label": 2}\n', '"label" must be an integer index'),
        "one.jsonl": ('{"ctx": "c", "endings": ["a"], "label": 0}\n', "at least 2 non-empty strings"),
        "empty.jsonl": ("\n", "holds no items"),
    }
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(TopThetaError, match=msg) as e:
            load_task(tmp_path / name)
        assert "\n" not in str(e.value)
    with pytest.raises(TopThetaError, match="does not exist"):
        load_task(tmp_path / "missing.jsonl")
    (tmp_path / "ok.jsonl").write_text('{"ctx": "c", "endings": ["a", "b"], "label": "1"}\n')
    assert load_task(tmp_path / "ok.jsonl")[0]["label"] == 1


def test_criterion_in_domain_and_strict():
    """The accuracy bar: in-domain perplexity and tasks decide `meets`; the cross-domain task only the strict
    flag; V rows are those read (a comp 2 variant reads all and never meets it)."""
    from topthetaexport.eval.evaluation import _criterion

    def variant(name, ppl, d_in, d_cross, read_red, kind="toptheta"):
        return {
            "name": name,
            "kind": kind,
            "in_domain": {
                "perplexity": 10.0,
                "perplexity_relative_change": ppl,
                "attention": {"decode": {"v_rows_reduction": 5.0, "v_rows_read_reduction": read_red}},
            },
            "tasks": {
                "cloze:in_domain": {"acc_delta_points": 0.0, "acc_norm_delta_points": d_in},
                "cloze:cross_domain": {"acc_delta_points": 0.0, "acc_norm_delta_points": d_cross},
            },
        }

    crit = _criterion(
        [
            variant("dense", 0.0, 0.0, 0.0, 1.0, kind="dense"),
            variant("a", 0.002, 0.4, -1.1, 3.2),  # in-domain ok, cross-domain 1.1 points down
            variant("b", 0.011, 0.8, 0.0, 5.0),  # perplexity +1.1 %
            variant("c", 0.008, 0.0, 0.0, 1.0),  # comp 2: reads every V row
            variant("d", 0.001, -0.5, -0.9, 3.0),
        ]
    )
    by = {c["variant"]: c for c in crit["variants"]}
    assert set(by) == {"a", "b", "c", "d"}
    assert crit["met_by"] == ["a", "d"] and crit["met_incl_cross_domain_by"] == ["d"]
    assert by["a"]["worst_in_domain_task_delta_points"] == 0.4 and by["a"]["worst_task_delta_points"] == -1.1


def test_builtin_licenses_text():
    from topthetaexport.data import LICENSES_DIR, load_texts

    if not LICENSES_DIR.is_dir():
        pytest.skip("no /usr/share/common-licenses here")
    texts = load_texts("builtin:licenses")
    assert len(texts) >= 5 and any("GNU GENERAL PUBLIC LICENSE" in t for t in texts)


# -- standard tasks: lm-eval's scoring through onnxruntime ------------------------------------------------


def _by_hand(om, tok, ctx: str, continuation: str) -> tuple[float, bool, int]:
    """log P(continuation | ctx), whether it is greedy, and its length, from one forward pass of the whole text
    without the KV cache (lm-eval's token split: the context's trailing spaces belong to the continuation)."""
    spaces = len(ctx) - len(ctx.rstrip(" "))
    c = tok(ctx[: len(ctx) - spaces], add_special_tokens=False)["input_ids"]
    whole = tok(ctx + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(c) :]
    logits = om.run(np.asarray([c + cont], np.int64)).output[0].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    lp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    rows = lp[len(c) - 1 : len(c) - 1 + len(cont)]
    return float(rows[np.arange(len(cont)), cont].sum()), bool((rows.argmax(-1) == cont).all()), len(cont)


def test_standard_task_scoring_matches_by_hand(tiny_lm_out):
    """acc, acc_norm (log-likelihood / characters of the choice, delimiter excluded) and LAMBADA's greedy match
    through the KV-cache scorer equal the same quantities computed by hand from a plain forward pass."""
    from topthetaexport.eval.evaluation import Variant, _open, _task_accuracy, score_continuations
    from topthetaexport.eval.measure import KeptElements
    from topthetaexport.models import load_model

    tok = load_model(tiny_lm_out / "model").tokenizer
    om = _open(tiny_lm_out / "out" / "model.onnx", Variant("dense"), [0], "cpu", None)
    # a greedy word of this model: its most likely next token after a context, written out as text (a context
    # whose token re-tokenizes to itself after the text, so that the request holds exactly that token)
    for ctx_g in ("The function returns the", "The value of the", "A list of", "Return a new"):
        ids = tok(ctx_g, add_special_tokens=False)["input_ids"]
        nxt = int(om.run(np.asarray([ids], np.int64)).output[0, -1].argmax())
        word = tok.decode([nxt])
        if word.strip() and tok(ctx_g + word, add_special_tokens=False)["input_ids"] == ids + [nxt]:
            break
    else:
        pytest.fail("no context whose greedy next token round-trips through the tokenizer")
    lead = word[: len(word) - len(word.lstrip(" "))]
    items = [
        {"ctx": "Return the value of", "endings": ["x", "the list of all keys", "None"], "label": 1},
        {"ctx": "A module is a file ", "endings": ["containing Python code.", "of"], "label": 0},
        {"ctx": "The class", "endings": ["is", "defines a new type"], "label": 1},
        {"ctx": ctx_g, "endings": [word.lstrip(" ")], "label": 0, "metric": "greedy", "target_delimiter": lead},
        {"ctx": "import os", "endings": ["zebra"], "label": 0, "metric": "greedy"},
    ]
    for it in items:
        it.setdefault("target_delimiter", " ")
    right, right_norm, greedy = [], [], []
    for it in items:
        got = [_by_hand(om, tok, it["ctx"], it["target_delimiter"] + e) for e in it["endings"]]
        ll = np.array([g[0] for g in got])
        if it.get("metric") == "greedy":
            greedy.append(got[0][1])
            continue
        right.append(int(ll.argmax() == it["label"]))
        right_norm.append(int((ll / np.array([len(e) for e in it["endings"]])).argmax() == it["label"]))
        # the KV-cache scorer's log-likelihoods are the by-hand ones
        c = tok(it["ctx"].rstrip(" "), add_special_tokens=False)["input_ids"]
        text = [it["ctx"] + it["target_delimiter"] + e for e in it["endings"]]
        conts = [tok(t, add_special_tokens=False)["input_ids"][len(c) :] for t in text]
        assert [len(x) for x in conts] == [g[2] for g in got]
        ll_cache, _ = score_continuations(om, c, conts)
        np.testing.assert_allclose(ll_cache, ll, rtol=1e-4, atol=1e-4)
    assert greedy == [True, False]  # the model's own greedy word, and a word it does not predict
    kept = KeptElements(3)
    res = _task_accuracy(om, items, tok, SEQ, [], kept)
    assert res["correct"] == right + [int(g) for g in greedy]
    assert res["correct_norm"] == right_norm
    assert res["acc"] == pytest.approx((sum(right) + sum(greedy)) / len(items))
    assert res["acc_norm"] == pytest.approx(sum(right_norm) / len(right_norm))
    assert kept.summary([0])["kept_fraction"] == 1.0  # dense: every element of every prompt


# -- the whole evaluation ------------------------------------------------------------------------------


def test_evaluate_report_is_consistent(tiny_lm_out, tmp_path):
    """One eval run: files written atomically, dense is dense, top-k keeps exactly min(k, row), the decode
    V rows read from prefill rows equal a real KV-cache decode, the written cloze jsonl scores the same as a
    text task, the cross-domain drift is reported."""
    from topthetaexport.eval.evaluation import Variant, _open, _task_accuracy, evaluate
    from topthetaexport.eval.tasks import load_task

    prose = tmp_path / "prose.txt"  # a second text for the cross-domain check
    from topthetaexport.data import load_texts

    prose.write_text("\n\n\n".join(load_texts("builtin:pydoc")[40:44]))
    out = tmp_path / "ev"
    with pytest.warns(RuntimeWarning, match="cloze task on .* skipped"):  # 3 short windows: too few sentences
        rep = evaluate(
            tiny_lm_out / "out",
            windows=6,
            cross_data=str(prose),
            cross_windows=3,
            task_items=5,
            sweep=[4],
            sweep_comp_modes=[0],
            output=out,
        )
    assert "cloze:cross_domain" in rep["tasks_skipped"]
    assert {p.name for p in out.iterdir()} == {"eval.json", "sweep.csv", "sweep.md", "accuracy.png", "tasks"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    on_disk = json.loads((out / "eval.json").read_text())
    names = [r["name"] for r in on_disk["variants"]]
    assert names == [
        "dense",
        "topk@4",
        "toptheta@4/comp0",
        "topk@8",
        "toptheta@8/comp0",
        "toptheta@8/comp1",
        "toptheta@8/comp2",
    ]
    by = {r["name"]: r for r in rep["variants"]}
    dense = by["dense"]
    assert dense["in_domain"]["attention"]["kept_fraction"] == 1.0
    assert dense["in_domain"]["perplexity_relative_change"] == 0.0
    # exact top-k: sparse layers keep min(k, row + 1) keys, the dense layer all
    rows = np.arange(1, SEQ + 1)
    expect = (rows.sum() + 2 * np.minimum(rows, 8).sum()) / (3 * rows.sum())
    assert by["topk@8"]["in_domain"]["attention"]["kept_fraction"] == pytest.approx(expect)
    assert by["topk@8"]["kept_drift"]["relative"] == pytest.approx(0.0)
    tt = by["toptheta@8/comp0"]["in_domain"]["attention"]
    assert 1.0 < tt["reduction"] and tt["per_layer_kept_fraction"][0] == 1.0
    assert tt["decode"]["v_rows_reduction"] > 1.0
    assert tt["decode"]["v_rows_read_per_token"] == tt["decode"]["v_rows_kept_per_token"]
    # V-mean compensation reads every valid V row for the mean: no V-row saving, whatever P·V keeps
    vmc = by["toptheta@8/comp2"]["in_domain"]["attention"]["decode"]
    assert vmc["v_rows_kept_per_token"] < vmc["v_rows_dense_per_token"]
    assert vmc["v_rows_read_per_token"] == vmc["v_rows_dense_per_token"] and vmc["v_rows_read_reduction"] == 1.0
    crit = {c["variant"]: c for c in rep["criterion"]["variants"]}
    assert crit["toptheta@8/comp2"]["v_rows_read_reduction"] == 1.0 and not crit["toptheta@8/comp2"]["meets"]
    assert "kept_drift" in by["toptheta@8/comp0"]
    assert by["toptheta@4/comp0"]["in_domain"]["attention"]["kept_fraction"] < tt["kept_fraction"]
    # decode V rows measured on prefill rows = a real decode through the KV cache
    dc = rep["decode_check"]
    assert dc["variant"] == "toptheta@8/comp0"
    assert dc["kv_cache_decode"]["v_rows_kept_per_step"] == pytest.approx(
        dc["from_prefill_rows"]["v_rows_kept_per_token"]
    )
    assert dc["kv_cache_decode"]["max_abs_diff_decode_vs_prefill"] < 1e-4
    # the cloze task was built, written, and scores the same when read back as a text task
    task = next(t for t in rep["tasks"] if t["name"] == "cloze:in_domain")
    items = load_task(out / task["file"])
    assert len(items) == task["items"] == dense["tasks"]["cloze:in_domain"]["items"] >= 2
    from topthetaexport.models import load_model

    tok = load_model(tiny_lm_out / "model").tokenizer
    om = _open(tiny_lm_out / "out" / "model.onnx", Variant("dense"), [0], "cpu", None)
    again = _task_accuracy(om, items, tok, SEQ)
    assert again["acc"] == dense["tasks"]["cloze:in_domain"]["acc"]
    assert again["acc_norm"] == dense["tasks"]["cloze:in_domain"]["acc_norm"]
    md = (out / "sweep.md").read_text()
    assert md.count("\n") == 2 + len(names) and "toptheta@8/comp2" in md
    assert rep["criterion"]["variants"] and all("meets" in c for c in rep["criterion"]["variants"])


def test_eval_cli_errors(tmp_path, tiny_lm_out, capsys):
    rc = cli_main(["eval", str(tmp_path / "nothing"), "-o", str(tmp_path / "ev")])
    err = capsys.readouterr().err
    assert rc == 2 and "holds no model.onnx" in err
    rc = cli_main(["eval", str(tiny_lm_out / "out"), "-o", str(tmp_path / "ev"), "--sweep", "8,x"])
    err = capsys.readouterr().err
    assert rc == 2 and "--sweep must be comma-separated integers" in err
    rc = cli_main(["eval", str(tiny_lm_out / "out"), "-o", str(tmp_path / "ev"), "--comp-modes", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "compensation mode 3 does not exist" in err
    assert not (tmp_path / "ev").exists()


def test_shared_cache_output_evaluates_without_the_topk_baseline(tiny_lm_out, tmp_path):
    """A folder whose graph has the shared-buffer KV cache (what --device cuda writes) evaluates by default, the
    top-k baseline left out and said so in eval.json; asking for the baseline there is one line naming the fix."""
    import onnx_ir as ir

    from topthetaexport.eval.evaluation import evaluate
    from topthetaexport.onnx.kv_cache import ShareKvBuffer

    out = tmp_path / "shared-out"
    shutil.copytree(tiny_lm_out / "out", out)
    model = ir.load(out / "model.onnx")
    assert ShareKvBuffer()(model).modified
    (out / "model.onnx").unlink()
    ir.save(model, out / "model.onnx")
    kwargs = dict(windows=2, task_items=1, comp_modes=(0,), builtin_cloze=False, decode_check=False)
    rep = evaluate(out, output=tmp_path / "ev", **kwargs)
    assert rep["topk_baseline"].startswith("skipped: the shared-buffer KV cache")
    assert "topk" not in {r["kind"] for r in rep["variants"]}
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["topk_baseline"] == rep["topk_baseline"]
    with pytest.raises(TopThetaError) as err:
        evaluate(out, output=tmp_path / "ev2", topk=True, **kwargs)
    assert "\n" not in str(err.value) and "--no-topk" in str(err.value) and "--kv-cache concat" in str(err.value)

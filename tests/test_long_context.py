"""Long-context evaluation (topthetaexport.eval.long_context, ``eval --context``) through onnxruntime, on a tiny
LLaMA with a BPE tokenizer calibrated at 48 rows and measured at 2x and 4x that."""

from __future__ import annotations

import json
import math

import pytest
from conftest import save_tiny_llama_with_tokenizer

from topthetaexport._errors import TopThetaError

CALIB = 48
KEYS = {
    "model",
    "context",
    "calib_len",
    "k",
    "ppl_dense",
    "ppl_toptheta",
    "kept_per_row",
    "v_rows_reduction",
    "needle_dense",
    "needle_toptheta",
    "theta_extrapolation",
}


@pytest.fixture(scope="module")
def short_calibrated(tmp_path_factory):
    from topthetaexport.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("long")
    save_tiny_llama_with_tokenizer(root / "model")
    run_pipeline(
        str(root / "model"),
        "builtin:pydoc",
        root / "out",
        k=6,
        seq_len=CALIB,
        num_samples=3,
        dense_layers=1,
        do_validate=False,
    )
    return root


def test_needle_items_place_the_fact_and_the_answer(short_calibrated):
    from transformers import AutoTokenizer

    from topthetaexport.eval.long_context import needle_items

    tok = AutoTokenizer.from_pretrained(short_calibrated / "out")
    hay = list(range(5, 2000))
    items = needle_items(tok, hay, 300, [0.0, 0.5, 1.0], trials=2)
    assert len(items) == 6 and all(it["ids"].shape == (1, 300) for it in items)
    for it in items:
        text = tok.decode(it["ids"][0, -40:].tolist())
        assert f"is {it['fact']}" in text.replace("  ", " ") and it["answer_positions"][-1] == 299
    with pytest.raises(TopThetaError, match="haystack"):
        needle_items(tok, hay[:50], 300, [0.5], trials=1)


def test_long_context_eval_report(short_calibrated):
    from topthetaexport.eval.long_context import evaluate_long_context

    out = short_calibrated / "out"
    rep = evaluate_long_context(
        out,
        contexts=[2 * CALIB, 4 * CALIB],
        data="builtin:pydoc",
        cross_data="builtin:licenses",
        windows=1,
        needle_depths=(0.5,),
        needle_contexts=(4 * CALIB,),
        output=short_calibrated / "eval",
    )
    rows = json.loads((short_calibrated / "eval" / "long-context.json").read_text())
    assert rows == json.loads(json.dumps(rep["results"]))
    assert len(rows) == 2 * 2 * 2  # contexts x extrapolations x (in-domain, cross-domain)
    for r in rows:
        assert KEYS <= set(r) and r["calib_len"] == CALIB and r["k"] == 6
        assert r["k_growth"] is None and r["dense_layers"] == 1  # the setting travels with each row
        assert math.isfinite(r["ppl_dense"]) and math.isfinite(r["ppl_toptheta"])
        assert r["v_rows_reduction"] > 1.0 and 0 < r["kept_per_row"] < r["context"]
        if r["domain"] == "in_domain" and r["context"] == 4 * CALIB:
            assert r["needle_dense"] in (0.0, 1.0) and r["needle_toptheta"] in (0.0, 1.0)
            assert r["needle_items"] == 1
        else:  # cross-domain text, or a context left out of needle_contexts
            assert r["needle_dense"] is None and r["needle_toptheta"] is None and r["needle_items"] == 0
    assert set(rep["measured"]["dense"]["96"]) == {"in_domain", "cross_domain"}  # no needle run at 2 x CALIB
    by = {(r["context"], r["theta_extrapolation"], r["domain"]): r for r in rows}
    for c in (2 * CALIB, 4 * CALIB):
        fit, last = by[(c, "fit", "in_domain")], by[(c, "last-row", "in_domain")]
        assert fit["ppl_dense"] == last["ppl_dense"]  # one dense run per context
        assert fit["kept_per_row"] != last["kept_per_row"]  # the fitted rows really are in the graph
    assert set(by[(4 * CALIB, "fit", "in_domain")]["kept_per_row_by_band"]) == {"1x", "2x", "4x"}
    # a shorter context is measured on the prefix of the longest one's window: the same as its own run
    short = evaluate_long_context(out, contexts=[2 * CALIB], data="builtin:pydoc", windows=1, needle=False)
    for r in short["results"]:
        twin = by[(2 * CALIB, r["theta_extrapolation"], "in_domain")]
        assert r["ppl_toptheta"] == pytest.approx(twin["ppl_toptheta"], rel=1e-9)
        assert r["kept_per_row"] == twin["kept_per_row"] and r["v_rows_reduction"] == twin["v_rows_reduction"]


def test_long_context_cli_errors(short_calibrated, capsys):
    try:
        from topthetaexport.cli.main import main
    except ImportError:
        from cli.main import main

    out = short_calibrated / "out"
    assert main(["eval", str(out), "-o", str(short_calibrated / "e2"), "--context", "96", "--needle-depths", "2"]) == 2
    assert "--needle-depths must lie in [0, 1]" in capsys.readouterr().err
    assert (
        main(
            ["eval", str(out), "-o", str(short_calibrated / "e2"), "--context", "96", "--theta-extrapolation", "spline"]
        )
        == 2
    )
    assert "unknown --theta-extrapolation" in capsys.readouterr().err
    assert main(["eval", str(out), "-o", str(short_calibrated / "e2"), "--context", "4096"]) == 2
    assert "positions" in capsys.readouterr().err
    args = ["eval", str(out), "-o", str(short_calibrated / "e2"), "--context", "96,192", "--needle-contexts", "384"]
    assert main(args) == 2
    assert "--needle-contexts 384 names lengths not in --context 96,192" in capsys.readouterr().err
    from topthetaexport.eval.long_context import evaluate_long_context

    with pytest.raises(TopThetaError, match=r"needle contexts \[384\] are not among"):
        evaluate_long_context(out, contexts=[96], needle_contexts=(384,))
    with pytest.raises(TopThetaError, match="builtin:pydoc is part of the calibration data"):
        evaluate_long_context(out, contexts=[96], cross_data="builtin:pydoc")
    assert not (short_calibrated / "e2").exists()


def test_mixed_text_gives_windows_in_turn_and_one_haystack(short_calibrated, tmp_path):
    from transformers import AutoTokenizer

    from topthetaexport.data import token_batches
    from topthetaexport.eval.long_context import _book_windows, _haystack

    tok = AutoTokenizer.from_pretrained(str(short_calibrated / "model"))
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the cat sat on the mat. " * 40)
    b.write_text("a dog ran in the park. " * 40)
    spec = f"{a},{b}"
    w, names = _book_windows(tok, spec, 16, 3)
    assert names == [spec] * 3
    assert w[1].tolist() == token_batches(tok, b, seq_len=16, num_samples=1)[0].tolist()
    assert w[2].tolist() == token_batches(tok, a, seq_len=16, num_samples=1, skip=1)[0].tolist()
    assert len(_haystack(tok, spec, set())) > len(_haystack(tok, str(a), set()))


def test_held_out_novels_leave_out_every_calibrated_one():
    from topthetaexport.eval.long_context import _default_data

    assert (
        _default_data("austen:emma")
        == "austen:sensesensibility+prideprejudice+mansfieldpark+northangerabbey+persuasion"
    )
    assert _default_data("austen:emma,builtin:licenses") == _default_data("austen:emma")
    assert _default_data("builtin:pydoc,austen:emma+persuasion").endswith("northangerabbey")
    assert _default_data("builtin:pydoc") == "austen:all"


def test_cross_data_must_be_a_text_the_calibration_did_not_read():
    from topthetaexport.eval.long_context import _check_cross_data

    _check_cross_data("builtin:pydoc", "austen:emma,builtin:licenses")
    _check_cross_data("austen:persuasion", "austen:emma")
    for cross, calib in (
        ("builtin:pydoc", "builtin:pydoc"),
        ("builtin:licenses", "austen:emma,builtin:licenses"),
        ("austen:emma+persuasion", "austen:emma"),
        ("austen:persuasion", "austen:all-but-emma"),
    ):
        with pytest.raises(TopThetaError, match="part of the calibration data"):
            _check_cross_data(cross, calib)


def test_long_context_table_merges_rows_into_its_json(tmp_path):
    """bench/long_context_table.py --out replaces the rows of the same setting and keeps the others."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from long_context_table import merged_rows

    path = tmp_path / "long-context.json"
    base = {"model": "m", "calib_len": 2048, "k": 560, "data": "austen:sense", "dense_layers": 1, "comp_mode": 0}
    old = [
        {**base, "context": 8192, "theta_extrapolation": "fit", "ppl_toptheta": 1.0},
        {**base, "context": 4096, "theta_extrapolation": "fit", "ppl_toptheta": 2.0},
    ]
    path.write_text(json.dumps(old))
    new = [
        {**base, "context": 8192, "theta_extrapolation": "fit", "ppl_toptheta": 3.0},
        {**base, "context": 8192, "theta_extrapolation": "last-row", "ppl_toptheta": 4.0},
    ]
    rows = merged_rows(str(path), new)
    assert sorted((r["context"], r["theta_extrapolation"], r["ppl_toptheta"]) for r in rows) == [
        (4096, "fit", 2.0),
        (8192, "fit", 3.0),
        (8192, "last-row", 4.0),
    ]
    assert merged_rows(str(tmp_path / "missing.json"), new) == new
    other_calibration = [{**new[0], "calib_source": "austen:emma,builtin:licenses", "ppl_toptheta": 5.0}]
    assert len(merged_rows(str(path), other_calibration)) == 3  # another calibration is another row

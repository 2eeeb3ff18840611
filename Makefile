# Each target installs what it needs into .venv (torch's CPU build first where there is no CUDA GPU).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all bench bench-gpu bench-finetune lint format clean

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(VENV)/bin/gptforge run configs/default.yaml

test: setup
	$(PY) -m pytest -q tests

test-all: setup
	GPTFORGE_SLOW=1 $(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/run.py

bench-gpu: setup  # one CUDA GPU, under 8 minutes; exits 2 without one
	$(PY) benchmarks/gpu.py
# whole finetunes against the HF Trainer and TRL (about 12 minutes alone; not part of `make bench`)
bench-finetune: setup
	$(PY) benchmarks/run.py --only finetune

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf runs .pytest_cache

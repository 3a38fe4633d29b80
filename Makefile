# Two entry points, each doing its own set-up on a fresh machine: `make demo`, `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= ../shared/data
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: setup test test-fast lint format demo demo-tiny bench bench-agreement clean

# torch is installed first from its exact CPU version: a loose torch requirement would pull
# several GB of CUDA wheels. The stamp re-runs the install only when the pins change.
$(BIN)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(BIN)/.installed

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

test: setup lint
	$(BIN)/pytest -q

# The inner loop: the tests not marked slow (no simulation, no run in a subprocess).
test-fast: setup
	$(BIN)/pytest -q -m "not slow"

# The embedded default: Qwen2.5-Coder 1.5B (server) and 0.5B (4 clients) on the built-in
# vell_fruits task. The first run fetches (~1.6 GB) and converts both models once.
demo: setup
	$(BIN)/fedcollm run configs/demo.toml --out runs/demo --continue

# The same pipeline on tiny random models and ARC-Easy: about half a minute.
demo-tiny: setup
	$(BIN)/fedcollm run configs/tiny.toml --data-dir $(DATA_DIR) --out runs/demo-tiny

# Does fedcollm score multiple choice exactly as lm-evaluation-harness? (benchmark only)
bench-agreement: setup
	$(BIN)/pip install -q lm-eval==0.4.13
	$(BIN)/python benchmarks/lm_eval_agreement.py --model smollm2-135m --limit 200 \
		--data-dir $(DATA_DIR) --out runs/bench/agreement.json

# Every benchmark of BENCHMARKS.md, one after another (about an hour on 2 CPU cores; never
# part of `make test`). Figures go to runs/bench/.
bench: setup bench-agreement
	mkdir -p runs/bench
	$(BIN)/python benchmarks/client_throughput.py --json runs/bench/client_throughput.json
	$(BIN)/python benchmarks/distillation_step.py --repeats 5 --json runs/bench/distillation_step.json
	$(BIN)/python benchmarks/distillation_step.py --memory --json runs/bench/distillation_memory.json
	$(BIN)/python benchmarks/federation.py --data-dir $(DATA_DIR)
	$(BIN)/python benchmarks/secure_aggregation.py --data-dir $(DATA_DIR)
	$(BIN)/python benchmarks/privacy.py --data-dir $(DATA_DIR) --json runs/bench/privacy.json
	$(BIN)/python benchmarks/generation.py --data-dir $(DATA_DIR) --json runs/bench/generation.json
	$(BIN)/python benchmarks/memory_plan.py --data-dir $(DATA_DIR) --json runs/bench/memory_plan.json
	$(BIN)/python benchmarks/quantization.py --data-dir $(DATA_DIR) --json runs/bench/quantization.json
	$(BIN)/python benchmarks/reconstruction.py --data-dir $(DATA_DIR) --json runs/bench/reconstruction.json
	$(BIN)/fedcollm models --fetch qwen2.5-coder-0.5b qwen2.5-coder-1.5b
	$(BIN)/python benchmarks/demo_profile.py --json runs/bench/demo.json --plot runs/bench/demo.png

clean:
	rm -rf $(VENV) runs

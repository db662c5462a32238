# The README's commands. Each target sets up what it needs first.
#   make demo   create .venv, install, run the main job (a sweep on a 3-worker local fleet)
#   make test   create .venv, install, lint + type-check + run the whole test suite (it
#               installs Debian's chromium for the dashboard's browser tests: make browser)
#   make market-demo   a training-market competition on a local fleet (examples/market_demo.py)
#   make pipeline-demo   knowledge distillation on a disaggregated pipeline (examples/pipeline_demo.py)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch first, so nothing pulls a multi-GB CUDA build. Elsewhere, point
# TORCH_INDEX at https://download.pytorch.org/whl/cpu (or your CUDA index) if you like.
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
STAMP  := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=
# Test processes (pytest-xdist): much of the suite waits on live processes, so 3 cut its
# wall time on a 2-core machine (a whole run: 830 s of pytest against 912 s with 2).
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 3

.PHONY: setup demo market-demo pipeline-demo test test-fast lint browser bench clean

# Byte-compiled once here, so that each of the hundreds of Python processes a run or the
# tests start does not compile trainfleet again: imports read a .pyc even where
# PYTHONDONTWRITEBYTECODE=1 stops them writing one (a coordinator's start: 0.2 s less CPU;
# the test suite's 550 Python processes: about 3% of its CPU). Incremental: only changed
# files are compiled again.
setup: $(STAMP)
	@$(BIN)/python -m compileall -q -j0 src tests bench examples

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

demo: setup
	$(BIN)/python examples/demo.py

market-demo: setup
	$(BIN)/python examples/market_demo.py

pipeline-demo: setup
	$(BIN)/python examples/pipeline_demo.py

lint: setup
	$(BIN)/ruff check src tests examples bench
	$(BIN)/ruff format --check src tests examples bench
	$(BIN)/mypy

# The dashboard's browser tests drive Debian's chromium (Playwright's own download is not
# used). Installs it when missing: as root, else through passwordless sudo, else says how.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q chromium; \
		elif sudo -n true 2>/dev/null; then \
			sudo -n apt-get update -q && sudo -n apt-get install -y -q chromium; \
		else echo "chromium is missing: run 'sudo apt-get install -y chromium', then make test"; \
			exit 1; fi; \
	fi

test: lint browser
	$(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench.queue
	$(BIN)/python -m bench.data
	$(BIN)/python -m bench.chaos
	$(BIN)/python -m bench.diloco
	$(BIN)/python -m bench.diloco_link
	$(BIN)/python -m bench.diloco_churn
	$(BIN)/python -m bench.verify
	$(BIN)/python -m bench.features

clean:
	rm -rf $(VENV) .demo .market-demo .pipeline-demo .trainfleet .pytest_cache .ruff_cache .mypy_cache

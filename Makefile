# FlowForge: thin targets over plain scripts.
PYTHON ?= python3
PREFIX ?= $(HOME)/.local
PYTEST_VERSION = 8.3.5
VENV = .venv

# pytest from this Python if it has it; otherwise a pinned copy in .venv.
PYTEST_PYTHON = if $(PYTHON) -c 'import pytest' 2>/dev/null; then py=$(PYTHON); else \
	  [ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV); \
	  $(VENV)/bin/python -c 'import pytest' 2>/dev/null || \
	    $(VENV)/bin/python -m pip install --quiet pytest==$(PYTEST_VERSION); \
	  py=$(VENV)/bin/python; fi
RUN_PYTEST = $(PYTEST_PYTHON); $$py -m pytest

.PHONY: test soak demo bench bench-full bench-peers lint install readme pages

# The whole suite in two pytest processes (TEST_JOBS=N: N, at most one per core; 1: a single one).
test:
	@$(PYTEST_PYTHON); $$py tools/run_tests.py

# The reliability tests again, at soak scale (FLOWFORGE_SOAK=1): 2,000+ kills.
soak:
	@export FLOWFORGE_SOAK=1; $(RUN_PYTEST) -q -s tests/test_crash.py tests/test_queue.py \
	  tests/test_concurrency.py tests/test_hook.py tests/test_ledger.py tests/test_disk_full.py

demo:
	@$(PYTHON) tools/demo.py

# The performance targets: a table of medians beside targets; exit 1 when a row is MISSED
# or FAILED.  bench: the quick shapes (minutes); bench-full adds 15 years, 500 users x 24
# months and 1M entries.  BENCH_RUNS=N changes the rounds per row.
bench:
	@$(PYTHON) tools/bench.py

bench-full:
	@$(PYTHON) tools/bench.py --full

# FlowForge, Watson (installed into .venv if missing) and Timewarrior (`timew` on PATH,
# skipped with a reason otherwise) on identical data; prints the ratios.
bench-peers:
	@$(PYTHON) tools/bench_peers.py

# ruff and vermin (3.9 compatibility) come from .venv; FlowForge never needs them.
lint:
	@[ -x $(VENV)/bin/python ] || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/python -c 'import ruff, vermin' 2>/dev/null || \
	  $(VENV)/bin/python -m pip install --quiet ruff vermin
	$(VENV)/bin/python -m ruff check --select E,F,W,B --ignore B904,B905 --line-length 110 flowforge.py plugins tests tools
	$(VENV)/bin/vermin --target=3.9- --no-tips --violations flowforge.py plugins

install:
	./install.sh --prefix $(PREFIX)

readme:
	$(PYTHON) tools/readme_reference.py --write

# The README's screenshots (docs/*.png) and the printed invoice, in headless Chromium.
pages:
	$(PYTHON) tools/pages.py

# The two commands of the README:  `make demo`  and  `make test`.
# Both create ./.venv on first use (torch first, from the CPU wheel where one is served, so no
# other package can pull a CUDA build), then reuse it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/leadre demo

test: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache

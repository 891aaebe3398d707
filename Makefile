# Sidekey — the two commands in README.md, plus lint and bench.
# Works on a fresh Debian machine with Python 3.11: system packages are installed when
# missing (as root, or through sudo), Python packages go into .venv.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: soak fuzz all demo test lint pytest bench bench-openssl bench-callgrind system-deps bench-deps spire chart-tools compat-tools clean

all: test

$(STAMP): pyproject.toml
	@scripts/system-deps.sh base
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,fast]'
	@touch $@

system-deps:
	@scripts/system-deps.sh base

bench-deps:
	@scripts/system-deps.sh bench

# SPIRE server and agent for the identity tests, built once into ~/.cache/sidekey (~11 min).
spire:
	@scripts/build-spire.sh

# The Helm chart's checks: helm built once into ~/.cache/sidekey (~4 min of 2 idle cores),
# checkov in a venv of its own there (it pins packaging<24, which pytest cannot take).
chart-tools:
	@scripts/build-helm.sh
	@PYTHON=$(PYTHON) scripts/install-checkov.sh

# The driver matrix's Go, Node.js and Java clients (tests/compat), built once into
# ~/.cache/sidekey/compat-<hash> (about 2 min of 2 idle cores from empty caches).
compat-tools:
	@scripts/build-compat.sh >/dev/null

demo: $(STAMP)
	$(BIN)/python demo/run_demo.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict broker adapters
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile

pytest: $(STAMP) system-deps spire chart-tools compat-tools
	$(BIN)/pytest -q -ra

test: lint pytest

bench: $(STAMP) bench-deps
	$(BIN)/python bench/run.py

# The same bench with every process on OpenSSL 3.5 (built once into .cache/, ~3 min).
bench-openssl: $(STAMP) bench-deps
	scripts/build-openssl.sh
	BENCH_OPENSSL=.cache/openssl-3.5.7 $(BIN)/python bench/run.py

# The broker's instructions per operation under valgrind: repeatable on a noisy machine.
bench-callgrind: $(STAMP) bench-deps
	BENCH_CALLGRIND=1 $(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info

# The long runs, never part of `make test`: a soak of DURATION seconds (tests/soak.py) and
# the coverage-guided fuzz targets, FUZZ_TIME seconds each (tests/fuzz/).
# SOAK_ARGS: e.g. '--loads churn' (python -m tests.soak --help).
DURATION ?= 1800
SOAK_ARGS ?=
soak: $(STAMP) system-deps
	nice -n 10 $(BIN)/python -m tests.soak --duration $(DURATION) $(SOAK_ARGS)

FUZZ_TIME ?= 60
FUZZ_RUNS ?= -1
fuzz: $(STAMP)
	$(BIN)/pip install --quiet 'atheris>=2.3'
	nice -n 10 $(BIN)/python -m tests.fuzz.run --time $(FUZZ_TIME) --runs $(FUZZ_RUNS)

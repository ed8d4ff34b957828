# modgud — make demo | make test | make check | make bench
# Finds a Python >= 3.12 by itself (.ci/find-python) and builds .venv (modgud) and
# .venv-synapse (real Synapse, modgud's Synapse module and synapse-http-antispam, for the
# end-to-end tests and the demo).

SHELL := /bin/bash
VENV := .venv
SYNAPSE_VENV := .venv-synapse
PY := $(VENV)/bin/python
SYNAPSE_VERSION ?= 1.163.2
ANTISPAM_VERSION ?= 0.5.1
PYTEST_ARGS ?=

.PHONY: all venv synapse deps demo test check lint typecheck unit e2e bench soak fuzz clean

all: check

$(VENV)/.stamp: pyproject.toml
	@py=$$(.ci/find-python) || exit 1; \
	  echo "using $$py ($$($$py --version))"; \
	  [ -x $(PY) ] || $$py -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(VENV)/.stamp

$(SYNAPSE_VENV)/.stamp: Makefile
	@py=$$(.ci/find-python) || exit 1; \
	  [ -x $(SYNAPSE_VENV)/bin/python ] || $$py -m venv $(SYNAPSE_VENV)
	$(SYNAPSE_VENV)/bin/python -m pip install -q 'matrix-synapse[postgres,redis]==$(SYNAPSE_VERSION)' 'synapse-http-antispam==$(ANTISPAM_VERSION)'
	@touch $@

# modgud's Synapse module, installed the way the README tells operators to (its build
# carries rules/ and the shared parts of proxy_addons/, so it is redone when they change).
MODULE_SOURCES := $(wildcard synapse_module/*.py synapse_module/*.toml synapse_module/modgud_synapse/*.py rules/*.py proxy_addons/*.py)
$(SYNAPSE_VENV)/.module-stamp: $(SYNAPSE_VENV)/.stamp $(MODULE_SOURCES)
	$(SYNAPSE_VENV)/bin/pip install -q './synapse_module[postgresql]'
	@rm -rf synapse_module/build synapse_module/*.egg-info
	@touch $@

synapse: $(SYNAPSE_VENV)/.stamp $(SYNAPSE_VENV)/.module-stamp

## nginx, Prometheus, PostgreSQL and Redis from Debian's packages, when missing (as root; else
## says what to install).
deps:
	@.ci/system-deps

## The demo: a real Synapse behind modgud, a second Synapse, scripted federation traffic.
demo: venv synapse
	MODGUD_SYNAPSE_PYTHON=$(abspath $(SYNAPSE_VENV))/bin/python $(PY) -m proxy_addons.testbed.demo

## The full suite: lint, types, unit tests, end-to-end tests against real Synapse.
test: check synapse deps
	MODGUD_SYNAPSE_PYTHON=$(abspath $(SYNAPSE_VENV))/bin/python $(PY) -m pytest -q -m e2e $(PYTEST_ARGS)

## Fast checks: ruff, mypy (strict on rules/), unit and addon tests.
check: lint typecheck unit

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy --strict rules
	$(VENV)/bin/mypy proxy_addons
	$(VENV)/bin/mypy synapse_module/modgud_synapse synapse_module/setup.py

unit: venv
	$(PY) -m pytest -q -m 'not e2e and not slow' $(PYTEST_ARGS)

## Benchmarks (figures in docs/BENCHMARKS.md): matching, signatures, memory, the pipeline,
## a 1-PDU /send's latency at the edge, a real Synapse behind modgud against behind nginx,
## the store's writer on SQLite and on PostgreSQL, the history audit of a 10,000-event room.
## Ends with one table of every figure against its target.
bench: venv synapse deps
	export MODGUD_SYNAPSE_PYTHON=$(abspath $(SYNAPSE_VENV))/bin/python; \
	  export BENCH_RESULTS=$$(mktemp); \
	  $(PY) -m tests.bench.matching && $(PY) -m tests.bench.signatures && \
	  $(PY) -m tests.bench.memory && $(PY) -m tests.bench.run && $(PY) -m tests.bench.latency && \
	  $(PY) -m tests.bench.synapse && $(PY) -m tests.bench.store && $(PY) -m tests.bench.history && \
	  $(PY) -m tests.bench.results $$BENCH_RESULTS

## Fuzz (docs/RELIABILITY.md): every parser and addon, a fixed seed, 4,000 cases per test
## (over 100,000 in all); `make check` runs the same tests with 100 derandomized cases each.
fuzz: venv
	MODGUD_FUZZ_EXAMPLES=$${MODGUD_FUZZ_EXAMPLES:-4000} $(PY) -m pytest -q -p no:cacheprovider \
	  tests/fuzz --hypothesis-seed=$${FUZZ_SEED:-20261123}

## Soak (docs/RELIABILITY.md): 10 minutes at 80 % of the measured maximum against a real
## Synapse with scenario traffic; fails on any error, lost message or memory growth.
soak: venv synapse
	MODGUD_SYNAPSE_PYTHON=$(abspath $(SYNAPSE_VENV))/bin/python $(PY) -m tests.bench.soak

clean:
	rm -rf $(VENV) $(SYNAPSE_VENV) .pytest_cache .mypy_cache .ruff_cache

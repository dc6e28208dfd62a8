# lockstep: `make demo` runs the main job end to end on the embedded lab;
# `make test` runs the whole test suite. Both set everything up themselves
# (Debian packages, the venv, the guest image) and are safe to run again.

VENV   ?= .venv
PY     := $(VENV)/bin/python
LOCKSTEP := $(VENV)/bin/lockstep
PYTEST_ARGS ?=

.PHONY: all setup image lint test test-unit test-integration demo bench proto proto-check clean lab-down

all: test

setup:
	@scripts/setup.sh

image: setup
	@$(LOCKSTEP) lab image

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy
	$(PY) -m lockstep.rpc.gen --check

# Unit and protocol tests first (seconds), then the real lab (minutes).
test: setup image lint
	@scripts/pytest.sh $(PYTEST_ARGS)

test-unit: setup
	@scripts/pytest.sh -m "not integration" $(PYTEST_ARGS)

test-integration: setup image
	@scripts/pytest.sh -m integration $(PYTEST_ARGS)

demo: setup image
	@$(PY) -m lockstep.lab.demo

bench: setup image
	$(PY) -m bench $(BENCH_ARGS)

proto: setup
	$(PY) -m lockstep.rpc.gen

proto-check: setup
	$(PY) -m lockstep.rpc.gen --check

lab-down:
	-@$(LOCKSTEP) lab down

clean: lab-down
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache src/*.egg-info

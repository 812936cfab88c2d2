# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

# Testcontainers' reaper image cannot be pulled without a registry; the fixtures stop their own containers.
export TESTCONTAINERS_RYUK_DISABLED ?= true
# The locally built PostgreSQL image (tests/images/build.sh) when there is one, else the official image.
LOCAL_PG_IMAGE := switcher-test/postgres:15-jit
SWITCHER_TEST_PG_IMAGE ?= $(shell docker image inspect $(LOCAL_PG_IMAGE) >/dev/null 2>&1 && echo $(LOCAL_PG_IMAGE))
ifneq ($(SWITCHER_TEST_PG_IMAGE),)
export SWITCHER_TEST_PG_IMAGE
endif

.PHONY: test test-embedded lint demo bench docker-up package-check clean

$(BIN)/.installed: pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

lint: $(BIN)/.installed
	$(BIN)/ruff check switcher db tests bench examples
	$(BIN)/ruff format --check switcher db tests bench examples
	$(BIN)/mypy --strict switcher

# Everything: PostgreSQL from SWITCHER_TEST_DATABASE_URL, else a container, else embedded.
test: lint
	$(BIN)/python -m pytest

# The tests of what PostgreSQL decides (SQL, locks, the outbox, migrations) again on the embedded server
# (PostgreSQL 18), whatever `make test` used; the CLI, Docker and webhook tests do not depend on its version.
DATABASE_TESTS := tests/test_switch.py tests/test_async_door.py tests/test_concurrency.py \
	tests/test_outbox.py tests/test_drainer.py tests/test_hardening.py tests/test_migrations.py \
	tests/test_scale.py tests/test_bad_input.py tests/test_placement.py tests/test_history.py
test-embedded: $(BIN)/.installed
	SWITCHER_TEST_PG=embedded $(BIN)/python -m pytest -m "not docker" $(DATABASE_TESTS)

# The wheel and the sdist as users get them (tests/package-check.sh).
package-check: $(BIN)/.installed
	tests/package-check.sh

# A Docker engine and the local PostgreSQL image (installs docker.io when missing; needs root for that).
docker-up:
	tests/images/docker-up.sh

# The whole job on an embedded PostgreSQL (or SWITCHER_DATABASE_URL), with real processes; seconds.
demo: $(BIN)/.installed
	$(BIN)/switcher demo

bench: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info build dist

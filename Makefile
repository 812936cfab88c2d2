# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test lint demo bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

lint: $(BIN)/.installed
	$(BIN)/ruff check switcher db tests bench
	$(BIN)/ruff format --check switcher db tests bench
	$(BIN)/mypy --strict switcher

test: lint
	$(BIN)/python -m pytest

demo: $(BIN)/.installed
	@echo "make demo: the end-to-end demo (switcher demo) is not built yet (issue #4)." >&2
	@exit 2

bench: $(BIN)/.installed
	$(BIN)/python bench/switch.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

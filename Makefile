# Set-up is part of every target: `.venv` is created when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: demo test bench lint clean

$(VENV)/.installed-%: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-examples
	$(VENV)/bin/keras-microtune demo -o build/demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow" tests

bench: $(VENV)/.installed-test
	$(PY) -m benchmarks.run_all

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check keras_microtune tests benchmarks examples
	$(VENV)/bin/ruff format --check keras_microtune tests benchmarks examples

clean:
	rm -rf build .pytest_cache

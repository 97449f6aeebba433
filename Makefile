# The two commands a user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is installed on its own first, pinned to the CPU build these machines carry; the project's
# own range (torch>=2.11) is then already satisfied and pip pulls no multi-GB CUDA build; naming it again
# with the project keeps the extras (GPTQModel) from upgrading it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,export]" "$(TORCH_SPEC)"
	touch $@

demo: setup
	$(PY) -m zqat_peft.cli demo

# The real model and data are fetched first (once; cached), so the end-to-end tests on them run too.
test: setup
	$(PY) -m zqat_peft.cli fetch
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info

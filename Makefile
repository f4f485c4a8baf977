# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv (CPU torch 2.13.0 first, then the package with its extras) on first use.
VENV := .venv
PY ?= $(VENV)/bin/python
EXTRAS := dev,hf,wandb,tensorboard,recipes

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

.PHONY: install demo test lint
install: $(VENV)/.installed

demo: install
	$(PY) -m recipes.demo

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

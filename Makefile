# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SPEC ?= launch/specs/demo.json

.PHONY: venv demo test lint services bench clean-services

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/pixpro submit --executor local --follow $(SPEC)

services: venv
	bash cluster/slurm/setup.sh
	PYTHON=$(PY) bash cluster/s3/moto.sh start

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: services lint
	$(PY) -m pytest -q

bench: venv
	$(PY) benches/run_all.py

clean-services:
	-bash cluster/slurm/stop.sh
	-bash cluster/s3/moto.sh stop

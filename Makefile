# Two commands do everything on a fresh machine:
#   make demo   creates .venv, installs, runs the flow on the bundled demo photos
#   make test   creates .venv, installs, runs ruff and the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first, pinned: a CPU wheel on machines without CUDA packages at hand, the
# CUDA build from PyPI on a Linux GPU box. Everything else then sees it installed.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(PY) -m flows.train_subject demo/photos --token t0k3n --workdir work/demo \
		--caption-model builtin:tiny-blip --base-model builtin:tiny-sd15 --config demo/config.json

lint: install
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) work .pytest_cache .ruff_cache .hypothesis

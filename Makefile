# Two commands for a newcomer (see README): `make train` and `make test`. Both set up .venv first if needed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A CPU build of torch: on the project's machines pip takes this version from local disk in seconds.
TORCH  ?= torch==2.13.0
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: setup train test bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# A real training run on the embedded simulator with the default configuration (add overrides with ARGS="...").
train: setup
	$(PY) launch.py $(ARGS)

# Everything CI runs: the whole test suite (server/GPU tests skip themselves when those are absent).
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/av-td3 bench $(ARGS)

clean-venv:
	rm -rf $(VENV)

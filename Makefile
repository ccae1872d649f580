# Two commands for a newcomer (see README): `make train` and `make test`. Both set up .venv first if needed:
# `make train` installs what training (and validate/compare) needs, `make test` adds the development extras
# (CARLA client, wandb, mlflow, launcher plugins, Stable-Baselines3, pytest, ruff, mypy).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
# A CPU build of torch: on the project's machines pip takes this version from local disk in seconds.
TORCH  ?= torch==2.13.0
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: setup setup-dev train test bench clean-venv FORCE

setup: $(VENV)/.installed-train
setup-dev: $(VENV)/.installed-dev

# The torch spec last installed: a TORCH= different from it re-runs the set-up (TORCH="torch==2.5.1" on an existing
# .venv installs that build instead of silently keeping the old one).
$(VENV)/.torch: FORCE
	@mkdir -p $(VENV)
	@[ "$$(cat $@ 2>/dev/null)" = "$(TORCH)" ] || echo "$(TORCH)" > $@

$(VENV)/.installed-train: pyproject.toml Makefile $(VENV)/.torch
	python3 -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-train
	$(PIP) -e '.[dev]'
	touch $@

# A real training run on the embedded simulator with the default configuration (add overrides with ARGS="...").
train: setup
	$(PY) launch.py $(ARGS)

# Everything CI runs: the linter and the type checker (both configured in pyproject.toml), then the whole test suite
# (server/GPU tests skip themselves when those are absent). Each step fails the target.
LINT_PATHS := av_td3 tests scripts launch.py
test: setup-dev
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m mypy av_td3
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Compares against Stable-Baselines3, a development extra.
bench: setup-dev
	$(VENV)/bin/av-td3 bench $(ARGS)

clean-venv:
	rm -rf $(VENV)

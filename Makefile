# One-command setup and test. `make test` creates .venv (Python 3.11), installs every
# dependency from requirements*.txt (skipped when nothing changed), and runs pytest.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.r2former-installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: venv test lint bench demo parity clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing dependencies into $(VENV) (log: $(VENV)/install.log)"
	@$(PIP) install -r requirements-dev.txt > $(VENV)/install.log 2>&1 || (tail -40 $(VENV)/install.log; exit 1)
	@$(PIP) install --no-deps --no-build-isolation -e . >> $(VENV)/install.log 2>&1 || (tail -40 $(VENV)/install.log; exit 1)
	@touch $(STAMP)

# Lint (ruff.toml: a small explicit rule set) and type checks (setup.cfg [mypy]: r2former_core, r2former_ros);
# both must report zero findings. `make test` runs them first.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --cache-dir $(VENV)/.mypy_cache

test: lint
	$(PY) -m pytest test $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/model_speed.py

# The whole pipeline on a synthetic street (r2former_ros/demo.py): synth map + query bags, build_map,
# localize + demo_evaluator in their own processes, query bag played; numbers and plots in demo_out/.
demo: $(STAMP)
	$(PY) -m r2former_ros.demo --out demo_out $(DEMO_ARGS)

parity: $(STAMP)
	$(VENV)/bin/r2former check-parity ../shared/official_ref

clean:
	rm -rf $(VENV) build *.egg-info

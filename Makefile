# Two commands set everything up on a fresh machine; each creates the virtual environment it needs.
#   make demo   - the main job on the embedded default (local Ray, MLflow on SQLite, synthetic corpus)
#   make test   - the test suite (real local Ray, MLflow, S3 via moto; no GPU needed)
#   make lock   - regenerate the locks after changing dependencies in pyproject.toml (see README)
# Every install comes from the locks, exact versions with hashes: requirements.lock (what the
# package needs, also what infra/Dockerfile installs) and requirements-dev.lock (that plus the
# test and lint tools). pyproject.toml keeps the ranges for people installing into their own env.
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements-dev.lock
LOCKED := $(VENV)/.locked-$(shell sha1sum $(LOCK) | cut -c1-12)
STAMP := $(VENV)/.installed-$(shell cat $(LOCK) pyproject.toml | sha1sum | cut -c1-12)
UV_VERSION := 0.13.9
LOCK_TOOL := build/lock-tool

.PHONY: demo test test-slow test-all lint format bench install clean ui-check lock doctor

# A fresh venv every time the lock changes: nothing left over from an earlier resolution.
$(LOCKED): $(LOCK)
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-deps --require-hashes -r $(LOCK)
	touch $@

# The project itself, editable, built with the locked setuptools (no download).
$(STAMP): $(LOCKED) pyproject.toml
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

doctor: $(STAMP)
	$(VENV)/bin/sertune doctor

# Resolves for Linux, macOS and Windows, Python >= 3.11, the CUDA torch build on Linux (PyPI's
# default), and pins pip/setuptools/wheel too so the project itself builds without the network.
lock:
	python3 -m venv $(LOCK_TOOL)
	$(LOCK_TOOL)/bin/pip install -q "uv==$(UV_VERSION)"
	printf 'pip\nsetuptools>=70\nwheel\n' > $(LOCK_TOOL)/build.in
	$(LOCK_TOOL)/bin/uv pip compile pyproject.toml $(LOCK_TOOL)/build.in --universal \
		--python-version 3.11 --generate-hashes --custom-compile-command "make lock" \
		-o requirements.lock
	$(LOCK_TOOL)/bin/uv pip compile pyproject.toml $(LOCK_TOOL)/build.in --extra dev --universal \
		--python-version 3.11 --generate-hashes --custom-compile-command "make lock" \
		-c requirements.lock -o requirements-dev.lock

demo: $(STAMP)
	$(VENV)/bin/sertune demo

# The suite in two tiers: `make test` (CI, under 30 min on 2 cores) runs every feature end to end;
# `make test-slow` the long fault drills, strategy variants and benchmark commands (marked `slow`,
# ~35 min); both
# before a release: `make test-all`.
test: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(VENV)/bin/sertune bench train --device cpu
	$(VENV)/bin/sertune bench search --trials 8

# The MLflow UI in a real browser on its own (make test runs it too): Playwright (in the lock)
# drives Debian's Chromium (apt-get install chromium); screenshots land in ui-check/.
ui-check: $(STAMP)
	@command -v chromium >/dev/null || { echo "ui-check needs Chromium: apt-get install chromium"; exit 2; }
	SERTUNE_UI_SHOTS=$(CURDIR)/ui-check $(PY) -m pytest -q -m browser tests/sertune/test_ui.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# Two commands set everything up on a fresh machine; each creates the virtual environment it needs.
#   make demo   - the main job on the embedded default (local Ray, MLflow on SQLite, synthetic corpus)
#   make test   - the test suite (real local Ray, MLflow, S3 via moto; no GPU needed)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: demo test lint format bench install clean ui-check

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sertune demo

test: $(STAMP)
	$(PY) -m pytest -q

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

# The MLflow UI in a real browser: Playwright drives Debian's Chromium (apt-get install chromium);
# screenshots land in ui-check/.
ui-check: $(STAMP)
	@command -v chromium >/dev/null || { echo "ui-check needs Chromium: apt-get install chromium"; exit 2; }
	$(PY) -m pip install -q "playwright>=1.40"
	SERTUNE_UI_SHOTS=$(CURDIR)/ui-check $(PY) -m pytest -q -m browser tests/sertune/test_ui.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# The two commands a newcomer needs:
#   make run    create .venv if missing, then run the DVC pipeline on the reference data
#   make test   create .venv if missing, then run the test suite (every layer; what CI runs)
# and, while working:
#   make test-fast   the unit layer only (tests/unit: no training, no ../shared/data), in about a minute
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

# Nothing phones home.
export DVC_NO_ANALYTICS := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: run test test-fast env clean-env

env: $(STAMP)

# Reinstalls only when the dependency list changes.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	dvc repro

# The report's browser test drives Debian's Chromium; a browser is never downloaded.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; }; \
	else echo "note: the browser test needs Debian's chromium (sudo apt-get install chromium)"; fi

test: $(STAMP) $(CHROMIUM)
	$(VENV)/bin/python -m pytest

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m unit tests/unit

clean-env:
	rm -rf $(VENV)

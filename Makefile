# Build and test the book.
#
#   make book    execute every notebook and build the HTML into _build/html
#   make test    unit tests, notebooks (nbval), book build, browser test, PDF
#   make pdf     the whole book as one PDF, _build/pdf/flow-matching.pdf (needs Chromium)
#   make bench   benchmarks (bench/run.py)
#   make clean   remove build outputs (keeps .venv and .cache)
#
# `make venv` (run by book and test) creates .venv from requirements.txt and
# fetches MathJax into _static/mathjax, so that pages render math offline.

PYTHON    ?= python3.11
VENV      := .venv
BIN       := $(VENV)/bin
JB        := $(BIN)/jupyter-book
PYTEST    := $(BIN)/python -m pytest
HTML      := _build/html
NOTEBOOKS := $(wildcard chapters/*.ipynb)
# The preface is executed (and checked by nbval) in the fresh Colab-like runtime of
# tests/test_fresh_runtime.py, so the main nbval run leaves it out.
NBVAL_NOTEBOOKS := $(filter-out chapters/00_preface.ipynb,$(NOTEBOOKS))
BUILD     := $(JB) build . --all -W -n --keep-going

# MathJax 3, from the npm registry, served from _static/mathjax (gitignored).
MATHJAX_VERSION := 3.2.2
MATHJAX   := _static/mathjax/tex-chtml.js

# A fresh "Colab-like" runtime for tests/test_fresh_runtime.py: only what a
# Colab runtime gives that we rely on, plus a local wheelhouse holding what
# installing cfmlib there adds (and setuptools, to build it), so that the test
# itself never needs the network.
COLAB_VENV     := .venv-colab
COLAB_PACKAGES := torch numpy matplotlib scipy ipykernel
WHEELHOUSE     := .cache/wheels

.PHONY: venv colab-venv book test bench clean pdf

venv: $(VENV)/.stamp $(MATHJAX)

# setup.py builds the C assignment solver into cfmlib/ (an optional extension): a changed C source
# re-runs the editable install, which rebuilds it.
$(VENV)/.stamp: requirements.txt pyproject.toml setup.py cfmlib/_assign.c cfmlib/_assign_kernels.h
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet -e . --no-deps
	touch $@

$(MATHJAX):
	mkdir -p .cache/mathjax _static/mathjax
	cd .cache/mathjax && npm pack --silent mathjax@$(MATHJAX_VERSION) && tar xzf mathjax-$(MATHJAX_VERSION).tgz
	cd .cache/mathjax/package/es5 && cp -r --parents tex-chtml.js input/tex/extensions \
	    output/chtml/fonts/woff-v2 a11y ui $(CURDIR)/_static/mathjax/

colab-venv: $(COLAB_VENV)/.stamp

$(COLAB_VENV)/.stamp: requirements.txt pyproject.toml Makefile
	rm -rf $(COLAB_VENV) $(WHEELHOUSE)
	$(PYTHON) -m venv $(COLAB_VENV)
	$(COLAB_VENV)/bin/pip install --quiet -c requirements.txt $(COLAB_PACKAGES)
	$(COLAB_VENV)/bin/pip install --quiet --dry-run --report .cache/colab-install.json -c requirements.txt .
	$(COLAB_VENV)/bin/python -c 'import json; report = json.load(open(".cache/colab-install.json")); \
	    print("\n".join("%(name)s==%(version)s" % i["metadata"] for i in report["install"] if i["metadata"]["name"] != "cfmlib"))' \
	    > .cache/colab-wheels.txt
	$(COLAB_VENV)/bin/pip download --quiet --no-deps -d $(WHEELHOUSE) -c requirements.txt -r .cache/colab-wheels.txt setuptools
	touch $@

# Execute every notebook (forced) and build the HTML; a failing cell, a broken
# reference or a missing citation fails the build.
book: venv
	$(BUILD)

# The PDF edition, from the notebooks' stored outputs (nothing is executed, and
# `make book` is not needed first): the book as one page (Sphinx's singlehtml
# builder, into _build/singlehtml), printed by the system's headless Chromium
# (tools/pdf.py) into _build/pdf/flow-matching.pdf, which is copied into
# _build/html when the HTML book is there (its landing page links to it).
pdf: venv
	BOOK_EXECUTE=off $(BUILD) --builder singlehtml
	$(BIN)/python tools/pdf.py $(PDF_FLAGS)

# Order matters, and each notebook is executed once:
#   1. unit tests, tools checks, the fresh-runtime test, and nbval, which
#      executes every chapter and compares its `# NBVAL_CHECK_OUTPUT` cells;
#   2. the HTML is built from the notebooks' stored outputs (no execution),
#      with the same -W -n checks as `make book`;
#   3. the built pages of step 2 are opened in headless Chromium;
#   4. the PDF is printed (`make pdf`; without Chromium it says so and skips) and checked.
test: venv colab-venv
	$(PYTEST) tests $(NBVAL_NOTEBOOKS) --ignore=tests/test_book_html.py --ignore=tests/test_pdf.py \
	    --nbval-lax --nbval-current-env --nbval-cell-timeout=1800 \
	    --nbval-sanitize-with tests/nbval_sanitize.cfg
	BOOK_EXECUTE=off $(BUILD)
	$(PYTEST) tests/test_book_html.py
	$(MAKE) pdf PDF_FLAGS=--optional
	$(PYTEST) tests/test_pdf.py

bench: venv
	$(BIN)/pip install --quiet --no-deps -r bench/requirements.txt
	$(BIN)/python bench/run.py

clean:
	rm -rf _build .pytest_cache .hypothesis

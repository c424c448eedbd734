# The two commands a newcomer needs (see README.md):
#   make demo   install everything, train the DCGAN on Fashion-MNIST, write the report
#   make test   install everything, run the tests
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install data browser demo test docs docs-serve coverage bench clean

# torch is pinned and installed first: a bare `torch` requirement would pull several GB of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed data browser

# Fashion-MNIST and the EmojiOne icons (`--data emoji`) from Debian's packages when we can (root on
# Debian); otherwise imagegen downloads Fashion-MNIST, `make demo` falls back to the built-in shapes
# dataset and says so, and `--data emoji` says which package it needs.
DATA_PACKAGES = $(if $(wildcard /usr/share/datasets/fashion-mnist),,dataset-fashion-mnist) \
	$(if $(wildcard /usr/share/rubygems-integration/all/gems/gemojione-*),,ruby-gemojione)
data:
	@if [ -z "$(strip $(DATA_PACKAGES))" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DATA_PACKAGES) >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DATA_PACKAGES) >/dev/null 2>&1; } || \
		echo "note: could not install $(strip $(DATA_PACKAGES)); imagegen will try to download Fashion-MNIST"; \
	fi

# Debian's chromium for the browser test (Playwright drives it; it never downloads a browser of its own).
browser:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } || \
		echo "note: could not install chromium; the browser test needs /usr/bin/chromium"; \
	fi

demo: install
	$(VENV)/bin/imagegen demo

# The tests whose outcome depends on trained weights (marker `trained`) run under a lower instruction set
# than this machine's, as on a CPU without AVX-512 (most laptops) or without AVX2 and FMA: float rounding
# and the kernels chosen differ there, and such a test must hold on every CPU, not only on the one it was
# tuned on. They run in that pass only: twice (natively, then lowered) took CI on a 2-core AVX2 machine to
# 25 minutes, over its 20. The tests that check that an image's bits do not depend on its batch (marker
# `rounding`, about a minute) run in both passes. PyTorch reads ATEN_CPU_CAPABILITY, oneDNN (convolutions)
# ONEDNN_MAX_CPU_ISA and MKL (matmul) MKL_ENABLE_INSTRUCTIONS. On an AVX2 machine only oneDNN and MKL go
# down (to AVX, without FMA, which changes the rounding of every convolution and matmul): taking ATen to
# its scalar `default` level as well made that pass 1.6 times as long (11 minutes against 7).
LOWER_ISA ?= $(shell if grep -qw avx512f /proc/cpuinfo 2>/dev/null; \
	then echo "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"; \
	else echo "ONEDNN_MAX_CPU_ISA=AVX MKL_ENABLE_INSTRUCTIONS=AVX"; fi)

# Test modules run side by side, one per core (pytest-xdist; --dist loadscope keeps a module's tests, and
# so its fixtures, in one worker), each worker with its share of torch threads (tests/conftest.py), the
# slowest modules first (conftest.SLOWEST_FIRST, in place of xdist's own order: most tests first).
XDIST ?= -n auto --dist loadscope --no-loadscope-reorder

test: install
	$(PY) -m pytest -q $(XDIST) -m "not trained"
	@echo "second pass, the tests marked trained or rounding under $(LOWER_ISA):"
	env $(LOWER_ISA) $(PY) -m pytest -q $(XDIST) -m "trained or rounding"

# Line coverage of imagegen/ by the suite (in-process code; commands the tests start as subprocesses
# are not counted). Serial, so that one process holds all the data.
coverage: install
	$(PY) -m coverage run -m pytest -q -p no:xdist
	$(PY) -m coverage report --skip-covered

# The docs site (mkdocs.yml, docs/): the generated reference pages are rewritten from the code first, then
# `mkdocs build --strict` fails on any warning (a broken link or anchor, a page missing from the nav).
docs: $(VENV)/.installed
	$(PY) -m imagegen.reference
	$(VENV)/bin/mkdocs build --strict
	@echo "the site is in site/ (open site/index.html, or run make docs-serve)"

docs-serve: $(VENV)/.installed
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8001

bench: install
	$(PY) benchmarks/train_speed.py
	$(PY) benchmarks/families.py

clean:
	rm -rf $(VENV) runs site .pytest_cache .coverage

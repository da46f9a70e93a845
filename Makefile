# moelab: `make demo` runs the offline comparison, `make test` runs the test suite.
# Both create .venv on first use (torch pinned by constraints.txt: an unpinned torch pulls CUDA builds).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet -c constraints.txt
# No model hub: everything below runs from package-provided assets (see ../shared/assets.md).
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test bench lint clean gpu-check gpu-wheels

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e ".[dev,sweep]"
	$(OFFLINE) $(PY) scripts/fetch_assets.py
	touch $@

# The demo: the six methods on SmolLM2-135M with the offline commonsense data (protocol in
# conf/experiment/offline_commonsense.yaml), then the comparison table and the expert activation maps.
DEMO_DIR := logs/demo/$(shell date +%Y-%m-%d_%H-%M-%S)
# Jobs side by side, one torch thread each: on 2 cores two single-threaded jobs train 1.4x faster than
# one job on two threads. More cores: `make demo DEMO_JOBS=6`.
DEMO_JOBS ?= 2

demo: setup
	$(OFFLINE) $(PY) scripts/train.py experiment=offline_commonsense hydra.sweep.dir=$(DEMO_DIR) \
		hydra/launcher=joblib hydra.launcher.n_jobs=$(DEMO_JOBS)
	$(OFFLINE) $(PY) scripts/compare.py $(DEMO_DIR)
	$(OFFLINE) $(PY) scripts/plot_expert_maps.py $(DEMO_DIR)/*/
	@echo "[moelab] demo finished: $(DEMO_DIR)"
	@echo "    table            $(DEMO_DIR)/comparison.md (and .csv, .tex)"
	@echo "    figures          $(DEMO_DIR)/learning_curves.png, accuracy.png (and .pdf)"
	@echo "    expert maps      $(DEMO_DIR)/expert_maps.png, and <run>/plots/ per run"
	@echo "    runs             $(DEMO_DIR)/<job>_<method>-seed<seed>/results.json"
	@echo "    W&B (offline)    $(DEMO_DIR)/<job>/wandb/  (upload: wandb sync <folder>)"

test: setup
	$(OFFLINE) $(PY) -m pytest -q

bench: setup
	$(OFFLINE) $(PY) scripts/bench.py

# The accelerator path in one prepared run (on a GPU machine; `--dry-run` runs the same steps on the CPU).
gpu-check:
	bash scripts/gpu_check.sh

# Wheels of the packages a GPU machine without network lacks (Hydra, lm-eval, ...), into .whl/ (< 64 MiB).
gpu-wheels: setup
	$(PY) scripts/gpu_wheels.py --dest .whl

lint: setup
	$(PY) -m ruff check src scripts tests

clean:
	rm -rf $(VENV) logs bench_results gpu_check_out

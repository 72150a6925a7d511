# make demo   - set up .venv from nothing and run the demo end to end
# make test   - set up .venv from nothing and run the offline test suite
# make bench  - run every benchmark in benchmarks/, JSON under benchmarks/results/
#
# torch is installed before the package. timm needs torchvision, and the only
# torchvision wheel that imports on these CPU machines is paired with torch 2.14.1
# (both lie on the local disk). On a GPU machine pick your own build, e.g.
#   make test TORCH_SPEC="torch==2.5.1 torchvision==0.20.1 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@if $(PY) -c "import torch, torchvision" 2>/dev/null; then \
		echo "torch already importable: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "installing $(TORCH_SPEC)"; $(PY) -m pip install -q $(TORCH_SPEC); \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/synesthesia demo pipelines/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# every benchmarks/bench_*.py and probe_*.py, each writing benchmarks/results/<name>.json (git-ignored);
# a failing one does not stop the others, and makes the target fail at the end, naming it
bench: $(STAMP)
	@mkdir -p benchmarks/results
	@failed=""; for b in benchmarks/bench_*.py benchmarks/probe_*.py; do \
		echo "== $$b"; \
		$(PY) $$b --json-out benchmarks/results/$$(basename $$b .py).json || failed="$$failed $$b"; \
	done; \
	if [ -n "$$failed" ]; then echo "failed:$$failed" >&2; exit 1; fi; \
	echo "results: benchmarks/results/"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks examples
	$(VENV)/bin/ruff format src tests benchmarks examples

clean:
	rm -rf $(VENV) results shards/*/ benchmarks/results

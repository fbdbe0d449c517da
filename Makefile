# unirep: `make demo` and `make test` are the two commands a new user runs (README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.unirep-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export MPLBACKEND ?= Agg

.PHONY: setup test demo bench clean

setup: $(STAMP)

# Re-runs only when the dependency files change; a second `make setup` is instant.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel "setuptools<81"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,teachers]"
	$(BIN)/python -m unirep._torchvision_compat install
	$(BIN)/python -c "import timm, mace, torchvision, torch_geometric, e3nn; print('environment ok: torch', __import__('torch').__version__)"
	@touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

# The core toy flow (~1 min), then the two backends' quick starts (a few minutes each on a laptop CPU; the first
# run also trains the project's own small teachers and makes the molecular data, cached for later runs).
demo: setup
	$(BIN)/unirep-train experiment=toy
	$(BIN)/unirep-train experiment=vision/quickstart
	$(BIN)/unirep-train experiment=molecular/quickstart

bench: setup
	@for s in scripts/bench_*.py; do echo "== $$s"; $(BIN)/python $$s || exit 1; done

clean:
	rm -rf $(VENV) outputs

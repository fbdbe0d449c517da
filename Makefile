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
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,teachers,proteins,so3lr]"
	$(BIN)/python -m unirep._torchvision_compat install
	$(BIN)/python -c "import timm, mace, torchvision, torch_geometric, e3nn; print('environment ok: torch', __import__('torch').__version__)"
	@touch $(STAMP)

test: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

# Six visible stages: the core toy flow (~1 min); the vision teacher, made once (MAE, ~6 CPU minutes) and skipped
# when its file exists; the teacher's features of the vision training set, precomputed once into shards; the vision
# quick start; the molecular teacher (the small foundation MACE, made once); the molecular quick start.
TEACHER := data/vision/teacher_vit_digits.safetensors
# where stage 3 writes the teacher features and stage 4 reads them (++: set whether or not the recipe has the key)
VISION_FEATURES := ++task.teacher_cache_dir=data/cache/vision/teacher
# the demo's training stages start afresh on every run (a rerun after a config change would otherwise be refused)
FRESH := trainer.resume=none trainer.overwrite=true

demo: setup
	@echo "== stage 1: toy flow matching (unirep-train experiment=toy)"
	$(BIN)/unirep-train experiment=toy $(FRESH)
	@echo "== stage 2: vision teacher ($(TEACHER); made by unirep-train experiment=vision/teacher_mae if missing)"
	@test -f $(TEACHER) && echo "$(TEACHER) exists: skipped" || $(BIN)/unirep-train experiment=vision/teacher_mae
	@echo "== stage 3: teacher features of the vision training set (unirep-features experiment=vision/quickstart)"
	$(BIN)/unirep-features experiment=vision/quickstart $(VISION_FEATURES)
	@echo "== stage 4: vision quick start (unirep-train experiment=vision/quickstart)"
	$(BIN)/unirep-train experiment=vision/quickstart $(VISION_FEATURES) $(FRESH)
	@echo "== stage 5: molecular teacher (data/molecular/foundation_quick; made by unirep-train experiment=molecular/foundation_quick if missing)"
	@test -d data/molecular/foundation_quick && echo "data/molecular/foundation_quick exists: skipped" || $(BIN)/unirep-train experiment=molecular/foundation_quick
	@echo "== stage 6: molecular quick start (unirep-train experiment=molecular/quickstart)"
	$(BIN)/unirep-train experiment=molecular/quickstart $(FRESH)

bench: setup
	@for s in scripts/bench_*.py; do echo "== $$s"; $(BIN)/python $$s || exit 1; done

clean:
	rm -rf $(VENV) outputs

# protocache: `make demo` (installs, then extracts the embedded digits set) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROTOCACHE := $(VENV)/bin/protocache
# faiss-cpu and faiss-gpu are alternative extras: `make setup FAISS=gpu` on a CUDA machine.
FAISS ?= cpu
EXTRAS ?= $(FAISS),test,lite,report

DATASET ?= digits
ROOT ?=
BACKBONE ?= tf_efficientnet_lite0
OUT ?= cache/$(DATASET)_$(BACKBONE).zarr
EXTRACT_ARGS ?=
BENCH_ARGS ?= --quick

.PHONY: setup test demo extract bench clean

# Idempotent: the stamp is rebuilt only when pyproject.toml changes.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

test: setup
	$(PY) -m pytest -q

DEMO_STORE := cache/digits_tf_efficientnet_lite0.zarr
demo: setup
	$(PROTOCACHE) extract --dataset digits --out $(DEMO_STORE)
	$(PROTOCACHE) verify $(DEMO_STORE)
	$(PROTOCACHE) info $(DEMO_STORE)
	$(PROTOCACHE) fit-head linear --store $(DEMO_STORE) --out runs/digits-linear --no-progress
	$(PROTOCACHE) fit-head protoquant --store $(DEMO_STORE) --out runs/digits-protoquant --no-progress
	@$(PY) -c "import json; a = {h: json.load(open(f'runs/digits-{h}/metrics.json'))['test_accuracy'] for h in ('linear', 'protoquant')}; print(f\"digits test accuracy: linear probe {a['linear']:.4f}, ProtoQuant {a['protoquant']:.4f} ({100 * (a['protoquant'] - a['linear']):+.1f} points)\")"
	$(PROTOCACHE) explain runs/digits-protoquant --out runs/digits-protoquant-report
	@echo "open runs/digits-protoquant-report/index.html"

bench: setup
	$(PROTOCACHE) bench $(BENCH_ARGS)

extract: setup
	$(PROTOCACHE) extract --dataset $(DATASET) $(if $(ROOT),--root $(ROOT)) --backbone $(BACKBONE) --out $(OUT) $(EXTRACT_ARGS)
	$(PROTOCACHE) info $(OUT)

clean:
	rm -rf cache runs

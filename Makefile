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

.PHONY: setup test demo extract clean

# Idempotent: the stamp is rebuilt only when pyproject.toml changes.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PROTOCACHE) extract --dataset digits --out cache/digits_tf_efficientnet_lite0.zarr
	$(PROTOCACHE) verify cache/digits_tf_efficientnet_lite0.zarr
	$(PROTOCACHE) info cache/digits_tf_efficientnet_lite0.zarr

extract: setup
	$(PROTOCACHE) extract --dataset $(DATASET) $(if $(ROOT),--root $(ROOT)) --backbone $(BACKBONE) --out $(OUT) $(EXTRACT_ARGS)
	$(PROTOCACHE) info $(OUT)

clean:
	rm -rf cache

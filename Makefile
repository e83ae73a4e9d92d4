# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
RANKS  ?= 8
# The CPU build of torch; on GPU clusters install your own CUDA torch first (see README).
TORCH_PIN ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.disdl-installed

.PHONY: demo test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install whenever the package metadata changes.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[mpich,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mpirun -n $(RANKS) $(BIN)/python -m disdl_mpi.run --out results/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf results data .pytest_cache

# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
RANKS  ?= 8
# The CPU build of torch; on GPU clusters install your own CUDA torch first (see README).
TORCH_PIN ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.disdl-installed

.PHONY: demo test install clean fashion-mnist

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

# Fashion-MNIST (70,000 real 28x28 images) from Debian's archive, where apt is available.
fashion-mnist:
	@test -d /usr/share/datasets/fashion-mnist || { \
	  command -v apt-get >/dev/null || { echo "no apt-get: put the four IDX files in a folder and pass --source-dir"; exit 2; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist; }
	@ls /usr/share/datasets/fashion-mnist

clean:
	rm -rf results data .pytest_cache

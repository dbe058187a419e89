# Two commands: `make demo` (set up, prepare a data set, train on the CPU, write a sample grid)
# and `make test` (set up, run the whole test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned and installed first: an unpinned torch pulls a multi-GB CUDA build on Linux.
# On a GPU machine, pick the build for your CUDA version, e.g. make demo TORCH="torch==2.13.0 --index-url ..."
TORCH ?= torch==2.13.0

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: install
	test -f data/shapes/manifest.json || \
		$(BIN)/python -m engine.data.prepare shapes data/shapes --num 4096 --image-size 16 --shard-size 512
	$(BIN)/python -m engine.train configs/tiny.yaml
	@echo "Look at runs/tiny/samples.png (generated shapes) and runs/tiny/loss.png (the loss curve)."

test: install
	$(BIN)/python -m pytest tests benchmarks --benchmark-disable -q -n 2

bench: install
	$(BIN)/python -m pytest benchmarks --benchmark-only

clean:
	rm -rf $(VENV) runs data/shapes .pytest_cache .benchmarks

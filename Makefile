# Two commands: `make demo` (set up, prepare a data set, train on the CPU, write a sample grid)
# and `make test` (set up, run the whole test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned and installed first: an unpinned torch pulls a multi-GB CUDA build on Linux.
# On a GPU machine, pick the build for your CUDA version, e.g. make demo TORCH="torch==2.13.0 --index-url ..."
TORCH ?= torch==2.13.0

.PHONY: install demo test bench gpu-carry gpu-check clean

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
	$(BIN)/python -m pytest tests benchmarks --benchmark-disable -q -n 3 --durations=20

bench: install
	$(BIN)/python -m pytest benchmarks --benchmark-only

# What a bare GPU machine (Python 3.12, torch, Triton; no package index) lacks, into .gpu-carry/ (git-ignored):
# carry that folder, then run the command benchmarks/gpu_check.py's help shows. See docs/gpus.md, "On a GPU".
CARRY := .gpu-carry
GPU_WHEELS := ema-pytorch==0.8.3 webdataset==1.0.2 braceexpand==0.1.7 diffusers==0.42.1 importlib-metadata==10.2.0 \
	lazy-importer==0.1.0 huggingface-hub==1.33.0 safetensors==0.8.0
gpu-carry:
	mkdir -p $(CARRY)/wheels
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(CARRY)/wheels $(GPU_WHEELS)
	cp ../shared/data/cifar10-train.tar.gz $(CARRY)/
	du -sh $(CARRY)

# On the GPU machine, from the repository root, with .gpu-carry carried (OUT: where the results go)
OUT ?= gpu-check
gpu-check:
	python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $(CARRY)/wheels/*.whl
	PYTHONPATH=/tmp/site:. python3 -m benchmarks.gpu_check $(OUT)

clean:
	rm -rf $(VENV) runs data/shapes .pytest_cache .benchmarks

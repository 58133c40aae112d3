# equiav-dali: every target runs with $(PY). By default that is the project's venv, which `setup`
# creates from requirements.txt; `make <target> PY=python3` uses another interpreter and skips set-up
# (the GPU machine has no network and brings its own torch/timm/DALI).
PY ?= .venv/bin/python
VENV_STAMP := .venv/.installed-$(shell md5sum requirements.txt 2>/dev/null | cut -c1-12)
ifeq ($(PY),.venv/bin/python)
SETUP := $(VENV_STAMP)
else
SETUP :=
endif

# Synthetic dataset defaults (override: make synth SYNTH_OUT=... CLIPS=...)
SYNTH_OUT ?= runs/synth
CLIPS ?= 200
CLASSES ?= 10
SEED ?= 0
SECONDS ?= 10
FORMAT ?= all

.PHONY: setup test lint format demo synth shard check preview pretrain pretrain-demo finetune \
	evaluate retrieval bench bench-loader bench-step bench-e2e bench-scaling bench-startup \
	bench-profile bench-fbank bench-report gpu-wheels help
help:
	@echo "targets: setup test lint format demo synth shard check preview pretrain pretrain-demo"
	@echo "         finetune evaluate retrieval bench bench-loader bench-step bench-e2e"
	@echo "         bench-scaling bench-startup bench-profile bench-fbank bench-report gpu-wheels"
	@echo "(see README.md)"

# Training: CONFIG picks the preset, NPROC the processes per node (default: all local GPUs, or
# one process without a GPU); extra `--set key=value` overrides go in ARGS.
NPROC ?= $(shell $(PY) -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
PRETRAIN_CONFIG ?= configs/pretrain_audioset.yaml
FINETUNE_CONFIG ?= configs/finetune_as20k.yaml
ARGS ?=

setup: $(SETUP)

# The GPU machine (bench/GPU-SESSIONS.md) has no network and lacks PyAV and soundfile: their
# Python 3.12 wheels (and soundfile's cffi, pycparser) go into .whl, which a device call carries.
# This machine is fresh each session, so run it before each GPU session's first call.
GPU_WHEELS ?= av==18.1.0 soundfile==0.13.1 cffi==2.1.1 pycparser==3.12
gpu-wheels:
	rm -rf .whl && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	ls -l .whl

# Idempotent: the stamp names the requirements' hash, so a second run does nothing and a changed
# requirements.txt reinstalls.
$(VENV_STAMP): requirements.txt
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip
	.venv/bin/python -m pip install -q -r requirements.txt
	rm -f .venv/.installed-* && touch $@

test: $(SETUP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q tests

lint: $(SETUP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(SETUP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

synth: $(SETUP)
	$(PY) -m equiav.data.synth --out $(SYNTH_OUT) --clips $(CLIPS) --classes $(CLASSES) \
		--seed $(SEED) --seconds $(SECONDS) --video-format $(FORMAT)

# WebDataset shards of the synthetic training list (make synth first).
SHARD_OUT ?= runs/synth-shards
SHARD_SIZE ?= 100
shard: $(SETUP)
	$(PY) -m equiav.data.shard $(SYNTH_OUT)/train.json --out $(SHARD_OUT) --shard-size $(SHARD_SIZE) \
		--weights $(SYNTH_OUT)/weights.csv

check: $(SETUP)
	$(PY) -m equiav.data.check $(SYNTH_OUT)/train.json --label-csv $(SYNTH_OUT)/class_labels_indices.csv \
		--weights $(SYNTH_OUT)/weights.csv

demo: $(SETUP)
	$(PY) -m equiav.demo --config configs/demo.yaml

preview: $(SETUP)
	$(PY) -m dali_pipelines.preview $(SYNTH_OUT)/train.json --mode pretrain --out runs/preview

pretrain: $(SETUP)
	$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) train.py pretrain \
		--config $(PRETRAIN_CONFIG) $(ARGS)

# A short pretraining on the synthetic data (generated if missing), CPU-sized.
pretrain-demo: $(SETUP)
	$(PY) -m equiav.demo --config configs/demo.yaml --stage pretrain $(ARGS)

finetune: $(SETUP)
	$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) train.py finetune \
		--config $(FINETUNE_CONFIG) $(ARGS)

# make evaluate CKPT=runs/x/checkpoints/best.pt DATA=data/AudioSet_20K/test.json LABELS=...
CKPT ?=
DATA ?=
LABELS ?= $(dir $(DATA))class_labels_indices.csv
evaluate: $(SETUP)
	$(PY) evaluate.py --checkpoint $(CKPT) --data $(DATA) --label-csv $(LABELS) $(ARGS)

retrieval: $(SETUP)
	$(PY) evaluate.py retrieval --checkpoint $(CKPT) --data $(DATA) $(ARGS)

bench: bench-loader bench-step bench-e2e bench-scaling bench-startup bench-report

bench-loader: $(SETUP)
	$(PY) -m bench.loader $(ARGS)

bench-step: $(SETUP)
	$(PY) -m bench.step $(ARGS)

bench-e2e: $(SETUP)
	$(PY) -m bench.end_to_end $(ARGS)

bench-scaling: $(SETUP)
	$(PY) -m bench.scaling $(ARGS)

# Start-up and host memory of a rank's loader for a 2M-clip list (~6 minutes, ~2 GB here).
bench-startup: $(SETUP)
	$(PY) -m bench.startup $(ARGS)

bench-profile: $(SETUP)
	$(PY) -m bench.profile $(ARGS)

# The device stage's filterbank alone by backend (Triton IEEE / tf32x3, torch); for a GPU.
bench-fbank: $(SETUP)
	$(PY) -m bench.fbank $(ARGS)

bench-report: $(SETUP)
	$(PY) -m bench.report

# finqa-trl — every command a user runs. `make help` lists them.
SHELL := /bin/bash

# The virtual environment every target runs in; `make VENV= ...` uses the current python instead.
VENV ?= .venv
# torch is installed first and on its own: a bare `torch` requirement can pull a build that does not
# fit the machine. 2.13.0 is the CUDA build on Linux/PyPI and the CPU build where a local CPU wheel
# is configured; override with e.g. TORCH="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128".
TORCH ?= torch==2.13.0

RECIPE ?= smoke
ACCELERATE_CONFIG ?= single_gpu
NUM_GPUS ?= 1
SPLIT ?= test
OUTPUT_DIR ?= outputs/$(RECIPE)
ARGS ?=
EVAL_ARGS ?=

ifeq ($(strip $(VENV)),)
PY := python
STAMP :=
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
endif

.PHONY: help install demo test lint data recipes train train-slurm eval merge report matrix bench clean

help:
	@echo "make demo                      train the smoke recipe on the bundled fixture, evaluate, print metrics (CPU, offline)"
	@echo "make test                      lint + unit/integration tests"
	@echo "make data [FINQA_DIR=data/finqa]   download + verify the official FinQA splits"
	@echo "make recipes                   list the training recipes"
	@echo "make train RECIPE=qlora-3b [ACCELERATE_CONFIG=deepspeed_zero3] [NUM_GPUS=2] [ARGS='--learning_rate 5e-5']"
	@echo "                               (CPU, two processes: ACCELERATE_CONFIG=cpu_ddp NUM_GPUS=2)"
	@echo "make train-slurm RECIPE=lora-3b SBATCH_ARGS='--nodes 2 --gpus-per-node 8'   several machines (docs/multi-gpu.md)"
	@echo "make eval RECIPE=qdora-3b [SPLIT=test] [NUM_GPUS=2] [EVAL_ARGS='--batch_size 64']"
	@echo "make merge RECIPE=qdora-3b     merge the adapter into a standalone bf16 model"
	@echo "make report                    results table (markdown) + bar chart from outputs/*/metrics_*.json"
	@echo "make matrix NUM_GPUS=2 MATRIX_ARGS='--model M --data_dir D'   every multi-GPU launch vs one GPU"
	@echo "make bench FINQA_DIR=... LLAMA3_TOKENIZER=...   training/eval throughput vs plain TRL (GPU)"
	@echo "make install                   the .venv every target uses (VENV= for the current environment)"
	@echo "make lint                      ruff only"
	@echo "make clean                     remove outputs/demo and the pytest/ruff caches"

install: $(STAMP)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: $(STAMP)
	$(PY) -m ruff check finqa_trl tests
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check finqa_trl tests

data: $(STAMP)
	$(PY) -m finqa_trl.data download --dir $(or $(FINQA_DIR),data/finqa)

recipes: $(STAMP)
	@$(PY) -m finqa_trl.recipes list

train: $(STAMP)
	@$(PY) -m finqa_trl.recipes check $(RECIPE)
	$(PY) -m accelerate.commands.launch --config_file accelerate_configs/$(ACCELERATE_CONFIG).yaml \
	  --num_processes $(NUM_GPUS) -m finqa_trl.train --config recipes/$(RECIPE).yaml \
	  --output_dir $(OUTPUT_DIR) $(ARGS)

# Several machines under SLURM (docs/multi-gpu.md); e.g. SBATCH_ARGS="--nodes 2 --gpus-per-node 8".
train-slurm: $(STAMP)
	RECIPE=$(RECIPE) ACCELERATE_CONFIG=$(or $(filter-out single_gpu,$(ACCELERATE_CONFIG)),multi_gpu) \
	  OUTPUT_DIR=$(OUTPUT_DIR) ARGS="$(ARGS)" PYTHON=$(PY) sbatch $(SBATCH_ARGS) scripts/slurm_train.sbatch

# One process, or one per GPU (torchrun; without GPUs the processes share the CPU through gloo). Rank 0
# merges the ranks' shards into the one predictions file a single process would have written.
EVAL_LAUNCH = $(if $(filter-out 1,$(strip $(NUM_GPUS))),-m torch.distributed.run --standalone --nproc_per_node $(NUM_GPUS))

eval: $(STAMP)
	$(PY) $(EVAL_LAUNCH) -m finqa_trl.predict --model $(OUTPUT_DIR) --split $(SPLIT) $(EVAL_ARGS)

merge: $(STAMP)
	$(PY) -m finqa_trl.merge $(OUTPUT_DIR) --output $(OUTPUT_DIR)/merged

report: $(STAMP)
	$(PY) -m finqa_trl.report

# Each accelerate config x {lora, qdora} on NUM_GPUS GPUs against one GPU at the same global batch
# (finqa_trl/matrix.py); e.g. MATRIX_ARGS="--model SmolLM2-135M-Instruct.Q4_1.gguf --data_dir $FINQA_DIR".
matrix: $(STAMP)
	$(PY) -m finqa_trl.matrix --num_gpus $(if $(filter-out 1,$(NUM_GPUS)),$(NUM_GPUS),2) $(MATRIX_ARGS)

# Needs a CUDA GPU, the real FinQA data (FINQA_DIR) and the Llama 3 tokenizer folder (LLAMA3_TOKENIZER).
bench: $(STAMP)
	$(PY) -m finqa_trl.bench --data_dir $(FINQA_DIR) --tokenizer $(LLAMA3_TOKENIZER) --eval $(BENCH_ARGS)

demo: $(STAMP)
	$(PY) -m finqa_trl.train --config recipes/smoke.yaml --output_dir outputs/demo
	@echo "demo: the smoke model memorises its 12 train examples (proof that train -> generate -> parse -> score agree);"
	@echo "demo: a 2-layer random-init model cannot generalise, so expect ~0 on test. Real results: README.md."
	$(PY) -m finqa_trl.predict --model outputs/demo --split train --overwrite
	$(PY) -m finqa_trl.predict --model outputs/demo --split test --overwrite

clean:
	rm -rf outputs/demo .pytest_cache .ruff_cache

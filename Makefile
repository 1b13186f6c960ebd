# Every target sets itself up on a fresh machine: `make train` is all a newcomer types.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch's version (the development machines provide its CPU wheel locally); GPU machines bring their own.
TORCH_VERSION ?= 2.13.0
# where torch comes from: empty, the package index (PyPI's Linux wheel is the CUDA build); the CPU build:
# make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
CONFIG ?= gptforge/train/configs/shakespeare_char_cpu.toml
OUT ?= out/shakespeare_char_cpu
ARGS ?=

.PHONY: install train speedrun finetune sample test test-all bench bench-full gpu-suite gpu-rehearse lint clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -e ".[dev]"
	touch $@

train: install
	$(PY) -m gptforge.train --config $(CONFIG) --out_dir=$(OUT) --overwrite $(ARGS)

# val loss <= 1.89 on Tiny Shakespeare in under 50 s on 2 CPU cores; the time is from the command's start
speedrun: install
	$(PY) -m gptforge.train --config gptforge/train/configs/speedrun_cpu.toml --out_dir=out/speedrun_cpu --overwrite $(ARGS)

# the lecture's second stage on 2 CPU cores in under 10 minutes: pre-train (or reuse that model), SFT on
# a task, RL against its checker; the held-out accuracy after each (ARGS="--seeds 1,2,3" for a spread)
finetune: install
	$(PY) -m gptforge.train.finetune.lifecycle --out_dir=out/finetune $(ARGS)

sample: install
	$(PY) -m gptforge.gpt.sample --out_dir=$(OUT) $(ARGS)

# Tests run in parallel, one worker per core (pytest-xdist); a test module stays on one worker, so
# its module-scoped fixtures (a prepared dataset, reference runs, the AOT compile) are built once.
TEST_WORKERS ?= auto
TEST_FLAGS := -q -n $(TEST_WORKERS) --dist loadscope --durations=15

test: install
	$(PY) -m pytest $(TEST_FLAGS) $(ARGS)

# Everything, the slow parity grids and the AOT compile of every autotune configuration included.
test-all: install
	$(PY) -m pytest $(TEST_FLAGS) -m "slow or not slow" $(ARGS)

# make bench: every benchmark briefly (fewer rounds; single and DDP only), in under 3 minutes on 2 cores.
# make bench-full: the long side-by-side runs too (all rounds, FSDP and DeepSpeed, the large corpus) and the AOT
# report. Timings on a machine shared with other work are not to be trusted: the tables warn where they see it.
bench: install
	mkdir -p .benchmarks
	GPT_BENCH_FULL=0 $(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-json=.benchmarks/latest.json $(ARGS)

bench-full: install
	mkdir -p .benchmarks
	-$(PY) -m gptforge.kernels.aot   # registers, spills and shared memory of every Triton kernel, sm_80 and sm_90
	GPT_BENCH_FULL=1 $(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-json=.benchmarks/full.json $(ARGS)

# The GPU image brings its own torch and triton (and may have no package index): no venv here.
gpu-suite:
	$(PYTHON) benchmarks/gpu_suite.py $(ARGS)

# The GPU suite's machinery on the CPU at toy sizes (Triton through its interpreter).
gpu-rehearse: install
	$(PY) benchmarks/gpu_suite.py --rehearse $(ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf .pytest_cache .ruff_cache .benchmarks *.egg-info
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

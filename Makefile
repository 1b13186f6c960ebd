# Every target sets itself up on a fresh machine: `make train` is all a newcomer types.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch (it lies on the development machines' disk); GPU machines bring their own.
TORCH_VERSION ?= 2.13.0
CONFIG ?= gptforge/train/configs/shakespeare_char_cpu.toml
OUT ?= out/shakespeare_char_cpu
ARGS ?=

.PHONY: install train speedrun sample test test-all bench gpu-suite gpu-rehearse lint clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==$(TORCH_VERSION)
	$(PY) -m pip install -e ".[dev]"
	touch $@

train: install
	$(PY) -m gptforge.train --config $(CONFIG) --out_dir=$(OUT) --overwrite $(ARGS)

# val loss <= 1.89 on Tiny Shakespeare in under 50 s on 2 CPU cores; the time is from the command's start
speedrun: install
	$(PY) -m gptforge.train --config gptforge/train/configs/speedrun_cpu.toml --out_dir=out/speedrun_cpu --overwrite $(ARGS)

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

bench: install
	mkdir -p .benchmarks
	-$(PY) -m gptforge.kernels.aot   # registers, spills and shared memory of every Triton kernel, sm_80 and sm_90
	$(PY) -m pytest benchmarks -q -p no:cacheprovider --benchmark-json=.benchmarks/latest.json $(ARGS)

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

# Two commands do everything on a fresh machine:
#   make train   - set up, prepare the embedded corpus, train a small GPT, print a sample
#   make test    - set up and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install train sample test bench gpu-check clean

# The venv is (re)built when the packaging changes. torch is installed first so the
# extension build (setup.py) can see it without build isolation.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "setuptools>=69" wheel
	$(PY) -m pip install -q "torch>=2.11" "ninja>=1.11"
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $@

install: $(STAMP)

train: install
	$(PY) -m gpt.train config/train_default.py
	$(PY) -m gpt.sample --out_dir=out-default --num_samples=1 --max_new_tokens=300

test: install
	$(PY) -m pytest -q

# The CPU-sized benchmark suite (kernels, end-to-end, design sweep; < 10 min on 2 cores).
# `make bench BENCH_ARGS=--gpu-suite` runs the full GPU suite instead.
bench: install
	$(PY) -m bench all $(BENCH_ARGS)

# The GPU runbook: offline install with the machine's Python, the whole test suite and the
# GPU benchmarks, all into bench/results/<gpu>-<date>/ (see bench/gpu_check.py).
gpu-check:
	$(PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

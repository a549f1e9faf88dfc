# Two commands do everything on a fresh machine:
#   make train   - set up, prepare the embedded corpus, train a small GPT, print a sample
#   make test    - set up and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install train sample test inspect bench gpu-check clean

# The venv is (re)built when the packaging changes. torch is installed first so the
# extension build (setup.py) can see it without build isolation. openai-whisper is installed
# only for the copy of GPT-2's BPE ranks it ships (GPT-2 BPE offline, gpt/tokenizer.py), so
# without its dependencies (numba, llvmlite, ...), which pyproject.toml cannot express.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "setuptools>=69" wheel
	$(PY) -m pip install -q "torch>=2.11" "ninja>=1.11"
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	$(PY) -m pip install -q --no-build-isolation --no-deps "openai-whisper==20250625"
	touch $@

install: $(STAMP)

train: install
	$(PY) -m gpt.train config/train_default.py
	$(PY) -m gpt.sample --out_dir=out-default --num_samples=1 --max_new_tokens=300

test: install
	$(PY) -m pytest -q

# Look inside the `make train` model (out-default/) on a line of its corpus, with every
# experiment of gpt.inspect: ablation of each head and MLP, and patching the clean `f(x`
# into the corrupted `f[x`, measured on logit(')') - logit(']'). Plots and inspect.json go
# into inspect-default/ (see README "Look inside a trained model").
inspect: install
	$(PY) -m gpt.inspect --init_from=out-default --out_dir=inspect-default --ablate=True \
		--start='Return f(x' --corrupt='Return f[x' --tokens="(')', ']')"

# The CPU-sized benchmark suite (kernels, end-to-end, design sweep; < 10 min on 2 cores).
# `make bench BENCH_ARGS=--gpu-suite` runs the full GPU suite instead.
bench: install
	$(PY) -m bench all $(BENCH_ARGS)

# The GPU runbook, with the machine's Python: offline install, GPT-2 training (beside
# nanoGPT's train.py from .nanogpt/ or --nanogpt), the attention and LayerNorm /
# cross-entropy headlines, the GPU conformance suite and tests, then the rest, within a
# time budget (default 480 s: one command of a 15-minute rental), into
# bench/results/<gpu>-<date>-<HHMM>/ (see bench/gpu/check.py). Arguments pass:
#   make gpu-check GPU_CHECK_ARGS=--dry-run            # the plan and its estimates, no GPU needed
#   make gpu-check GPU_CHECK_ARGS="--budget 240 --skip train attention memory"  # a second call
gpu-check:
	$(PYTHON) bench/gpu/check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

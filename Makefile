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
	# SAM 3 and what it imports (torchvision, timm) go to a private directory the export puts on sys.path only
	# inside export/sam3_compat.py's context: torchvision beside CPU torch breaks transformers imports elsewhere.
	# The pinned list and the directory (sys.prefix/sam3-site) are sam3_compat's: one source.
	$(PY) -m conceptseg_edge.export.sam3_compat
	$(PY) -c "import torch, sam2, onnxruntime; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

# Strict skips: only TensorRT/GPU tests may skip; anything else skipping fails the run.
test: $(STAMP)
	CONCEPTSEG_STRICT_SKIPS=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# The embedded ConceptSeg-Tiny bundle (`conceptseg-edge train tiny-default --bundle ...` rebuilds it).
BUNDLE ?= conceptseg_edge/assets/conceptseg_tiny

demo: $(STAMP)
	@echo "== 1/2 ConceptSeg-Tiny on held-out CI / CD / CR samples (route, IoU, latency per stage and route)"
	$(CLI) demo --bundle $(BUNDLE) --out $(OUT)
	@echo "== 2/2 every route of the bundle, timed (p50/p90/p99 per stage)"
	$(CLI) bench $(BUNDLE) --route all --runs 10 --warmup 2 --json $(OUT)/bench.json --png $(OUT)/bench.png
	@echo "== wrote $(OUT)/grid.png, $(OUT)/demo.json, $(OUT)/bench.json, $(OUT)/bench.png"

clean:
	rm -rf $(VENV) out build *.egg-info

# anomalyd — the two commands: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; set TORCH=torch on a CUDA machine for the default wheel.
TORCH ?= torch==2.13.0
# faiss-cpu for the tests and `search: faiss`; on a CUDA box with faiss-gpu: make EXTRAS=dev,faiss-gpu
EXTRAS ?= dev,faiss-cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test demo lint bench-latency bench-peer bench-soak clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check anomalyd tests bench
	$(BIN)/mypy anomalyd bench

# DEMO_PLC=opcua: the daemon serves OPC UA and the simulated PLC is its client.
DEMO_PLC ?= s7

demo: $(STAMP)
	$(BIN)/python -m anomalyd.demo --plc $(DEMO_PLC)

bench-latency: $(STAMP)
	test -d var/bottle || $(BIN)/anomalyd fit --good ../shared/data/mvtec_bottle/train/good --out var/bottle
	$(BIN)/python bench/latency.py --bundle var/bottle --images ../shared/data/mvtec_bottle/test/good --json var/latency_cpu.json

bench-soak: $(STAMP)
	$(BIN)/python bench/soak.py --json var/soak.json

clean:
	rm -rf $(VENV) var .pytest_cache

# anomalib's PatchCore as a peer, in its own environment (torch 2.14.1 + torchvision from local disk here).
.venv-peer/.installed:
	$(PYTHON) -m venv .venv-peer
	.venv-peer/bin/python -m pip install -q --upgrade pip
	.venv-peer/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	.venv-peer/bin/python -m pip install -q anomalib
	touch .venv-peer/.installed

bench-peer: $(STAMP) .venv-peer/.installed
	$(BIN)/python bench/peer_anomalib.py --peer-python .venv-peer/bin/python

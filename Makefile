# anomalyd — the two commands: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch with faiss-cpu (the tests and `search: faiss`) and OpenVINO (`engine: openvino`).
# On a CUDA machine one recipe per CUDA major, so torch, TensorRT and faiss agree with the driver
# (docs/deployment.md):
#   make venv CUDA=12    driver R525+: torch from PyTorch's cu128 index, TensorRT cu12, faiss-gpu-cu12
#   make venv CUDA=13    driver R580+: PyPI's torch (CUDA 13), TensorRT cu13, torch search on the GPU
CUDA ?=
ifeq ($(CUDA),12)
TORCH ?= torch
TORCH_INDEX ?= --index-url https://download.pytorch.org/whl/cu128 --extra-index-url https://pypi.org/simple
EXTRAS ?= dev,gpu-cu12
else ifeq ($(CUDA),13)
TORCH ?= torch
EXTRAS ?= dev,gpu-cu13
else ifneq ($(CUDA),)
$(error CUDA=$(CUDA): 12 or 13 (or empty for the CPU))
endif
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev,faiss-cpu,openvino
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast test-py310 demo lint bench-latency bench-peer bench-soak clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	@$(MAKE) --no-print-directory test-py310

# The fast layer alone: in-process specifications with stand-ins for the model and the camera (no process
# started, no network run; tests/conftest.py says how the layers are kept apart). Under a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e and not model" tests

# Python 3.10 (JetPack 6's) as well: the subset that covers fit, score, eval and the daemon end to end,
# in its own venv. Found as python3.10 or under pyenv; skipped, saying so, where there is none. There is
# no CPU build of torch for 3.10 on this project's machines, so it takes PyPI's (a CUDA build, ~4.6 GB).
PY310 ?= $(shell python3.10 -c 'import sys; print(sys.executable)' 2>/dev/null || \
	(v=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.10' | tail -1); \
	 [ -n "$$v" ] && "$$(pyenv root)/versions/$$v/bin/python3.10" -c 'import sys; print(sys.executable)'))
TORCH310 ?= torch==2.13.0
# NumPy 1.x as well, as NVIDIA's JetPack 6 torch wheels are built against it (pip then takes an OpenCV
# that supports it): this leg is Python 3.10 with NumPy 1.26, the other NumPy 2.
NUMPY310 ?= numpy<2
VENV310 ?= .venv-py310
COMPAT_TESTS ?= tests/test_cli_flow.py tests/test_model.py tests/test_daemon.py tests/test_bundle_guard.py \
	tests/test_records_guard.py tests/test_internal_faults.py

test-py310:
	@if [ -z "$(PY310)" ]; then echo "test-py310: SKIPPED: no Python 3.10 here (python3.10 or pyenv)"; exit 0; fi; \
	set -e; \
	if [ ! -f $(VENV310)/.installed ] || [ pyproject.toml -nt $(VENV310)/.installed ]; then \
	  $(PY310) -m venv $(VENV310); \
	  $(VENV310)/bin/python -m pip install -q --upgrade pip; \
	  $(VENV310)/bin/python -m pip install -q "$(TORCH310)"; \
	  $(VENV310)/bin/python -m pip install -q -e ".[$(EXTRAS)]" "$(NUMPY310)"; \
	  touch $(VENV310)/.installed; \
	fi; \
	echo "test-py310: $$($(VENV310)/bin/python --version), numpy $$($(VENV310)/bin/python -c 'import numpy; print(numpy.__version__)') on $(COMPAT_TESTS)"; \
	$(VENV310)/bin/python -m pytest -q $(COMPAT_TESTS)

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
	rm -rf $(VENV) $(VENV310) var .pytest_cache

# anomalib's PatchCore as a peer, in its own environment (torch 2.14.1 + torchvision from local disk here).
.venv-peer/.installed:
	$(PYTHON) -m venv .venv-peer
	.venv-peer/bin/python -m pip install -q --upgrade pip
	.venv-peer/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	.venv-peer/bin/python -m pip install -q anomalib
	touch .venv-peer/.installed

bench-peer: $(STAMP) .venv-peer/.installed
	$(BIN)/python bench/peer_anomalib.py --peer-python .venv-peer/bin/python

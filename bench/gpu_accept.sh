#!/usr/bin/env bash
# GPU acceptance on a lent machine with CUDA torch: bench/gpu_accept.py, the latency
# table and the GPU-marked tests, with everything written to $OUT.
#   .carry/whl      wheels the GPU image lacks (pydantic, structlog, the Lite0 weights, …)
#   .carry/bundle   a bundle fitted here (anomalyd fit)
#   .carry/frames   full-size frames (e.g. mvtec_bottle/test/good)
# Exit status: that of gpu_accept.py (0 accepted, 1 a failure, 2 no GPU).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .carry/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# The lent H200 has torch with CUDA but no TensorRT or faiss-GPU: those are listed as missing, the torch
# CUDA paths are required.
python3 bench/gpu_accept.py --bundle .carry/bundle --images .carry/frames --out "$OUT/gpu_accept" \
  --require "${REQUIRE:-torch-fp32,torch-fp16,graph}" 2>&1 | tee "$OUT/gpu_accept.log"
status=${PIPESTATUS[0]}
python3 bench/latency.py --bundle .carry/bundle --images .carry/frames --runs 200 --json "$OUT/latency_gpu.json" \
  2>&1 | tee "$OUT/latency_gpu.log"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_engines.py 2>&1 | tee "$OUT/pytest_gpu.log"
exit "$status"

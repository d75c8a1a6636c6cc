"""anomalyd: visual inspection daemon (PatchCore anomaly detection for the production line)."""

import os

# OpenMP threads (torch, faiss) that spin while idle steal the few cores of an
# edge PC from each other and from ONNX Runtime: measured p99 110 ms spinning vs
# 25 ms passive on 2 cores. It must be set before torch or faiss is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

"""Engines: run the extractor (torch, ONNX Runtime, TensorRT) and the search (faiss, torch)."""

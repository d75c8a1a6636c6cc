"""Names a bundle and its ONNX graph share with the engines (kept light: no torch, no onnx)."""

EXTRACTOR_ONNX = "extractor.onnx"
INPUT_NAME = "images"
OUTPUT_NAME = "features"

"""rdedge export: training run -> bundle (ONNX parts, TensorRT engines, manifest.json). Imports training and runtime."""

"""Offline export of a model folder to deployable graphs (ONNX, TensorRT), verified numerically."""

"""Export: checkpoints → ONNX (→ quantized ONNX → TensorRT) bundles, each part validated against torch."""

"""Export stage: DeiT checkpoint -> verified ONNX (fused attention), fp16 variant, and TensorRT engines."""

"""Compression passes, one family per module; each is an onnx-ir pass configured by one plan step."""

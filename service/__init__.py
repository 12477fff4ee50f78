"""The HTTP service and web form over onnx_ops: uploads, persistent jobs in isolated worker processes."""

"""Inference engines (TensorRT on GPU, ONNX Runtime on CPU) behind one interface.

Empty until the AI pre-read stage lands; kept so the architecture's layout is whole.
"""

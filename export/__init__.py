"""ONNX export, LoRA merge, bundle writing and verification (`emoq export`).

Builds on emoq_serve; emoq_serve never imports this package (it reaches `emoq export` through
the `emoq.commands` entry point).
"""

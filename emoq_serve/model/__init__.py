"""The bundled PyTorch model: frozen HuBERT, the EmoQ-Former, heads, losses and the LLM side.

Submodules are imported directly (`emoq_serve.model.former`, ...) so that light users such as
the prompt builder do not pull in the whole model stack.
"""

"""The gRPC serving layer: `emoq serve`.

config.py (ServerConfig) -> validation.py (requests to Utterances) -> service.py (the servicer,
status mapping) -> app.py (server lifecycle: health, reflection, TLS/tokens, drain on SIGTERM),
with metrics.py (Prometheus) and auth.py (TLS credentials, bearer tokens). The engine behind it
is any `emoq_serve.executors.types.Recognizer`, fed through `emoq_serve.engine.batcher`.
"""

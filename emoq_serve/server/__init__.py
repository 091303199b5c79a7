"""The gRPC serving layer: `emoq serve`.

A request's way through it: `validation` (protobuf messages checked and decoded to Utterances)
and, for a stream, `streams` (one call's state between its messages) -> `service` (the servicer)
or, in VOICE_ACTIVITY mode, `conversation` (one result per speech segment) -> `scoring` (what
both call: `transcripts` decides the transcript, the shared batcher scores it) -> a status from
`status` on failure. Around it: `config` (ServerConfig), `cli` (its flags), `app` (lifecycle:
health, reflection, drain on SIGTERM), `auth` (TLS, bearer tokens), `limits` (server-wide stream
and audio bounds), `telemetry` (Prometheus). The engine behind it is any
`emoq_serve.executors.types.Recognizer`, fed through `emoq_serve.engine.batcher`.
"""

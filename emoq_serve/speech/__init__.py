"""Speech processing before emotion scoring, for audio that arrives as one long stream or
without a transcript.

Modules: `vad` (Silero VAD on onnxruntime, batched across streams), `segmenter` (a stream cut
into speech segments from the VAD's decisions), `asr` (faster-whisper transcripts for audio sent
without one).
"""

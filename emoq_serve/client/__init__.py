"""The client side: `EmotionClient` (api.py) and the `emoq client` command (cli.py).

Every `emoq` invocation imports `register` to build its parser, so this module stays light:
grpc, numpy and the generated stubs load only when a client is used. `EmotionClient` and
`EmotionResult` are importable from here all the same (resolved on first access).
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("client", help="send audio files to an `emoq serve` server and print the emotions")
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav, flac, ...; any rate, mixed to mono)")
    p.add_argument("--server", default="127.0.0.1:50051", help="host:port of the server (or a gRPC target such as dns:///name:port); several front doors "
                        "as ip:port,ip:port,... get the calls round-robin")
    p.add_argument("--text", default="", help="transcript of the utterance(s)")
    p.add_argument("--speaker", default=None, help="speaker name for the prompt")
    p.add_argument("--stream", action="store_true", help="use StreamingRecognize instead of Recognize")
    p.add_argument("--conversation", action="store_true",
                   help="stream each file as a conversation (VOICE_ACTIVITY): one result per speech segment, as a timeline")
    p.add_argument("--segment-texts", default=None, metavar="JSON",
                   help="with --conversation: send the turns' transcripts of a generated conversation.json by time range")
    p.add_argument("--chunk-ms", type=float, default=100.0, help="stream chunk length")
    p.add_argument("--realtime", action="store_true", help="send stream chunks at the audio's speed")
    p.add_argument("--interim", action="store_true", help="ask for interim results while streaming")
    p.add_argument("--json", action="store_true", help="one JSON object per result instead of a table")
    p.add_argument("--timeout", type=float, default=60.0, help="per-call deadline in seconds (all retries included; with --conversation --realtime, after the recording's own length)")
    # Default and range as api.DEFAULT_RETRIES and MAX_RETRIES (not imported: this module stays light).
    p.add_argument("--retries", type=int, default=3, choices=range(5), metavar="{0..4}",
                   help="retry a call ended UNAVAILABLE or RESOURCE_EXHAUSTED up to this many times, with "
                        "exponential backoff (0 = off); a stream is retried only before its first result")
    p.add_argument("--token", default=None, help="bearer token (or $EMOQ_TOKEN)")
    p.add_argument("--tls-ca", default=None, help="PEM root certificate: connect with TLS")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-key", default=None, help="PEM client key (mutual TLS)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from emoq_serve.client.cli import main

    return main(args)


def __getattr__(name: str) -> Any:
    if name in ("EmotionClient", "EmotionResult"):
        from emoq_serve.client import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

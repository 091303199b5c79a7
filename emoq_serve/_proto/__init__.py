"""Generated gRPC stubs for `protos/emoq/v1/emoq.proto` (made by `emoq_serve.protos_build`).

The `*_pb2*.py` files are not committed (they pin the grpcio/protobuf versions they were
generated with); this module re-exports them and says how to make them when they are missing.
"""

try:
    from emoq_serve._proto import emoq_pb2, emoq_pb2_grpc
except ImportError as exc:  # pragma: no cover - exercised only on a fresh checkout
    raise ImportError(
        "the gRPC stubs in emoq_serve/_proto/ are missing or stale: run `make setup` "
        f"(or `python -m emoq_serve.protos_build`) ({exc})"
    ) from exc

__all__ = ["emoq_pb2", "emoq_pb2_grpc"]

"""Rebuilding a gRPC method handler around a new behaviour, for the server interceptors."""

from __future__ import annotations

import grpc


def kind(handler: grpc.RpcMethodHandler) -> str:
    """`unary_unary`, `unary_stream`, `stream_unary` or `stream_stream`."""
    requests = "stream" if handler.request_streaming else "unary"
    return f"{requests}_{'stream' if handler.response_streaming else 'unary'}"


def rebuild(handler: grpc.RpcMethodHandler, behaviour, request_deserializer=None) -> grpc.RpcMethodHandler:
    """A handler of the same kind and serializers whose behaviour is `behaviour` (an async
    generator function when responses stream, a coroutine function otherwise)."""
    make = getattr(grpc, f"{kind(handler)}_rpc_method_handler")
    return make(
        behaviour,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )

"""Requests that do not parse end INVALID_ARGUMENT, not UNKNOWN: a server interceptor."""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError

from protocol.handlers import kind, rebuild


class _Malformed:
    """What a request that does not parse becomes, for the handler to refuse."""


MALFORMED = _Malformed()


class _Refused(Exception):
    """Raised where a malformed request is read; the call is aborted where the handler runs."""


class RefuseMalformed(grpc.aio.ServerInterceptor):
    """Bytes that are not the method's message (wire format corrupt, invalid UTF-8 in a string)
    end the call INVALID_ARGUMENT; gRPC would answer UNKNOWN, the status of a server bug."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def deserialize(data: bytes):
            try:
                return parse(data)
            except DecodeError:
                return MALFORMED

        behavior = getattr(handler, kind(handler))
        guarded = self._guard(behavior, handler.request_streaming, handler.response_streaming)
        return rebuild(handler, guarded, deserialize)

    @staticmethod
    def _guard(behavior, request_streaming: bool, response_streaming: bool):
        # A handler may read its request stream from another task (the controller's Connect
        # does) while its own task sends; aborting from the reader would race that send
        # (TOO_MANY_OPERATIONS). The reader raises instead and the handler's task aborts.
        async def refuse(context):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not a well-formed message")

        async def checked(requests):
            async for request in requests:
                if request is MALFORMED:
                    raise _Refused
                yield request

        def arguments(request, context):
            return (checked(request) if request_streaming else request), context

        if response_streaming:

            async def streaming(request, context):
                if request is MALFORMED:
                    await refuse(context)
                try:
                    async for response in behavior(*arguments(request, context)):
                        yield response
                except _Refused:
                    await refuse(context)

            return streaming

        async def unary(request, context):
            if request is MALFORMED:
                await refuse(context)
            try:
                return await behavior(*arguments(request, context))
            except _Refused:
                await refuse(context)

        return unary

"""RefuseMalformed on a real grpc.aio server: requests that do not parse end INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from service_threads import LoopThread

from protocol.malformed import RefuseMalformed
from protocol.v1 import controller_pb2 as cpb

BIG = 4 << 20  # past HTTP/2 flow-control windows: the send stays pending until the client reads
NOT_A_REPORT = b"\n\x02v2\x12\xff\xff"


async def read_elsewhere_while_sending(requests, context):
    """The shape of the controller's Connect: requests are read in a task of their own while
    the handler's task is sending."""

    async def read():
        async for _ in requests:
            pass

    reader = asyncio.ensure_future(read())
    try:
        yield b"x" * BIG
        await reader
        yield b"done"
    finally:
        reader.cancel()


async def read_here(requests, context):
    count = 0
    async for _ in requests:
        count += 1
    return str(count).encode()


@pytest.fixture(scope="module")
def channel():
    loop = LoopThread()
    options = [("grpc.max_send_message_length", 2 * BIG), ("grpc.max_receive_message_length", 2 * BIG)]

    async def start():
        server = grpc.aio.server(interceptors=[RefuseMalformed()], options=options)
        handlers = {
            "Stream": grpc.stream_stream_rpc_method_handler(
                read_elsewhere_while_sending, cpb.VerifierReport.FromString
            ),
            "Unary": grpc.stream_unary_rpc_method_handler(read_here, cpb.VerifierReport.FromString),
        }
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop.run(start())
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
        yield ch
    loop.run(server.stop(0))
    loop.stop()


def test_a_malformed_request_read_in_another_task_during_a_send_ends_invalid_argument(channel):
    call = channel.stream_stream("/t.T/Stream")(iter([NOT_A_REPORT]), timeout=10)
    time.sleep(0.3)  # the server has read the bad request while its first response is unsent
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert "well-formed" in err.value.details()


def test_a_malformed_request_in_a_client_stream_ends_invalid_argument(channel):
    good = cpb.VerifierReport(verifier_id="v").SerializeToString()
    assert channel.stream_unary("/t.T/Unary")(iter([good, good]), timeout=10) == b"2"
    with pytest.raises(grpc.RpcError) as err:
        channel.stream_unary("/t.T/Unary")(iter([good, NOT_A_REPORT, good]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

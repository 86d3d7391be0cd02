"""The Proposer service over real gRPC: n-gram drafts, state with length checks, bad input."""

from __future__ import annotations

import grpc
import pytest
from service_threads import LoopThread

from proposer_svc.server import ProposerConfig, ProposerServer
from protocol.serving import ServerConfig
from protocol.v1 import proposer_pb2 as pb
from protocol.v1 import proposer_pb2_grpc as pb_grpc


@pytest.fixture
def proposer():
    loop = LoopThread()
    server = ProposerServer(ProposerConfig(server=ServerConfig(port=0), max_k=4, max_requests=3))
    loop.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield server, pb_grpc.ProposerStub(channel)
    channel.close()
    loop.run(server.stop(0))
    loop.stop()


def item(request_id, new, total, k=3, full=False):
    return pb.ProposeItem(request_id=request_id, new_token_ids=new, total_length=total, k=k, full_context=full)


def exchange(stub, *requests):
    return list(stub.Propose(iter(requests), timeout=10))


def test_drafts_continue_the_context_and_track_state(proposer):
    _, stub = proposer
    first, second = exchange(
        stub,
        pb.ProposeRequest(step_id=1, items=[item("a", [1, 2, 3, 1, 2], 5, full=True)]),
        pb.ProposeRequest(step_id=2, items=[item("a", [3], 6)]),
    )
    assert first.step_id == 1 and first.results[0].status == pb.PROPOSE_STATUS_OK
    assert list(first.results[0].draft_token_ids) == [3, 1, 2]  # "1 2" was followed by 3 1 2
    assert list(second.results[0].draft_token_ids) == [1, 2, 3]
    assert second.results[0].known_length == 6 and not second.results[0].draft_probs


def test_unknown_and_mismatched_requests_ask_for_resync(proposer):
    _, stub = proposer
    unknown, ok, mismatch, gone, resent = exchange(
        stub,
        pb.ProposeRequest(items=[item("x", [5], 9)]),
        pb.ProposeRequest(items=[item("b", [1, 2], 2, full=True)]),
        pb.ProposeRequest(items=[item("b", [3, 4], 7)]),
        pb.ProposeRequest(items=[item("b", [5], 5)]),  # the mismatch dropped the state
        pb.ProposeRequest(items=[item("b", [1, 2, 3, 4], 4, full=True)]),
    )
    assert unknown.results[0].status == pb.PROPOSE_STATUS_UNKNOWN_REQUEST
    assert ok.results[0].status == pb.PROPOSE_STATUS_OK
    assert mismatch.results[0].status == pb.PROPOSE_STATUS_LENGTH_MISMATCH
    assert mismatch.results[0].known_length == 2
    assert gone.results[0].status == pb.PROPOSE_STATUS_UNKNOWN_REQUEST
    assert resent.results[0].status == pb.PROPOSE_STATUS_OK and resent.results[0].known_length == 4


def test_released_and_least_recently_used_states_are_dropped(proposer):
    server, stub = proposer
    exchange(stub, pb.ProposeRequest(items=[item(r, [1], 1, full=True) for r in "pqrs"]))
    assert len(server.servicer.store) == 3  # max_requests: "p" was evicted
    [reply] = exchange(stub, pb.ProposeRequest(items=[item("p", [2], 2)], released_request_ids=["q"]))
    assert reply.results[0].status == pb.PROPOSE_STATUS_UNKNOWN_REQUEST
    assert len(server.servicer.store) == 2


@pytest.mark.parametrize(
    "request_, field",
    [
        (pb.ProposeRequest(), "items"),
        (pb.ProposeRequest(items=[item("a", [1], 1, k=5, full=True)]), "items[0].k"),
        (pb.ProposeRequest(items=[item("a", [1], 1, full=True), item("b", [1], 1, k=-1, full=True)]), "items[1].k"),
        (pb.ProposeRequest(items=[item("", [1], 1, full=True)]), "items[0].request_id"),
        (pb.ProposeRequest(items=[item("a", [1, 2, 3], 2, full=True)]), "items[0].total_length"),
        (pb.ProposeRequest(items=[item("a", [1], 1, full=True), item("a", [1], 1, full=True)]), "items[1].request_id"),
    ],
)
def test_bad_input_gets_invalid_argument_and_the_server_keeps_serving(proposer, request_, field):
    _, stub = proposer
    with pytest.raises(grpc.RpcError) as err:
        exchange(stub, request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    [ok] = exchange(stub, pb.ProposeRequest(items=[item("z", [1, 1], 2, full=True)]))
    assert ok.results[0].status == pb.PROPOSE_STATUS_OK

"""The Proposer service over real gRPC: n-gram drafts, state with length checks, bad input."""

from __future__ import annotations

import queue
import urllib.request

import grpc
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families
from service_threads import LoopThread, wait_for

from proposer_svc.server import ProposerConfig, ProposerServer
from protocol.security import ClientTLS, ServerTLS
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


class Stream:
    """One open Propose stream (as a verifier keeps one per replica): a request in, its reply out."""

    def __init__(self, stub):
        self._requests: queue.Queue = queue.Queue()
        self._replies = stub.Propose(iter(self._requests.get, None), timeout=30)

    def send(self, request: pb.ProposeRequest) -> pb.ProposeResponse:
        self._requests.put(request)
        return next(self._replies)

    def close(self) -> None:
        self._requests.put(None)
        assert list(self._replies) == []


def test_released_and_least_recently_used_states_are_dropped(proposer):
    server, stub = proposer
    stream = Stream(stub)
    stream.send(pb.ProposeRequest(items=[item(r, [1], 1, full=True) for r in "pqrs"]))
    assert len(server.servicer.store) == 3  # max_requests: "p" was evicted
    reply = stream.send(pb.ProposeRequest(items=[item("p", [2], 2)], released_request_ids=["q"]))
    assert reply.results[0].status == pb.PROPOSE_STATUS_UNKNOWN_REQUEST
    assert len(server.servicer.store) == 2
    assert server.servicer.store.evicted["capacity"] == 1
    stream.close()


def test_request_ids_belong_to_their_stream_and_go_with_it(proposer):
    """Two verifiers may both send request "a"; a stream that ends (its verifier went, or dropped
    it after a failure and resyncs on a new one) releases what it held."""
    server, stub = proposer
    first, second = Stream(stub), Stream(stub)
    first.send(pb.ProposeRequest(items=[item("a", [1, 2, 3, 1, 2], 5, full=True)]))
    other = second.send(pb.ProposeRequest(items=[item("a", [7], 6)]))
    assert other.results[0].status == pb.PROPOSE_STATUS_UNKNOWN_REQUEST  # not the first stream's "a"
    second.send(pb.ProposeRequest(items=[item("a", [9, 8, 9], 3, full=True)]))
    mine = first.send(pb.ProposeRequest(items=[item("a", [3], 6)]))
    assert mine.results[0].status == pb.PROPOSE_STATUS_OK and list(mine.results[0].draft_token_ids) == [1, 2, 3]
    assert len(server.servicer.store) == 2 and len(server.servicer.streams) == 2
    first.close()
    wait_for(lambda: len(server.servicer.store) == 1)
    assert server.servicer.store.evicted["owner"] == 1
    second.close()
    wait_for(lambda: len(server.servicer.store) == 0 and not server.servicer.streams)


def test_states_idle_past_their_time_are_dropped(proposer):
    server, stub = proposer
    store = server.servicer.store
    now = [0.0]
    store.clock, store.idle_s = (lambda: now[0]), 5.0
    stream = Stream(stub)
    stream.send(pb.ProposeRequest(items=[item("old", [1], 1, full=True)]))
    now[0] = 4.0
    stream.send(pb.ProposeRequest(items=[item("new", [1], 1, full=True)]))
    now[0] = 6.0
    assert store.expire() == 1 and len(store) == 1 and store.evicted["idle"] == 1
    reply = stream.send(pb.ProposeRequest(items=[item("old", [2], 2)]))
    assert reply.results[0].status == pb.PROPOSE_STATUS_UNKNOWN_REQUEST
    stream.close()


def test_metrics_count_states_streams_and_evictions(unused_tcp_port):
    loop = LoopThread()
    config = ProposerConfig(server=ServerConfig(port=0, metrics_port=unused_tcp_port), max_requests=2)
    server = ProposerServer(config)
    loop.run(server.start())
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stream = Stream(pb_grpc.ProposerStub(channel))
        stream.send(pb.ProposeRequest(items=[item(r, [1, 2], 2, full=True) for r in "abc"]))
        text = urllib.request.urlopen(f"http://127.0.0.1:{unused_tcp_port}/metrics", timeout=5).read().decode()
        samples = {(s.name, tuple(s.labels.values())): s.value for f in text_string_to_metric_families(text)
                   for s in f.samples}  # fmt: skip
        assert samples[("smartspec_proposer_states", ())] == 2
        assert samples[("smartspec_proposer_streams", ())] == 1
        assert samples[("smartspec_proposer_states_evicted_total", ("capacity",))] == 1
        assert samples[("smartspec_proposer_resyncs_total", ())] == 3
        assert samples[("smartspec_proposer_exchange_seconds_count", ())] == 1
        stream.close()
    loop.run(server.stop(0))
    loop.stop()


@pytest.mark.parametrize(
    "request_, field",
    [
        (pb.ProposeRequest(), "items"),
        (pb.ProposeRequest(items=[item("a", [1], 1, k=5, full=True)]), "items[0].k"),
        (pb.ProposeRequest(items=[item("a", [1], 1, full=True), item("b", [1], 1, k=-1, full=True)]), "items[1].k"),
        (pb.ProposeRequest(items=[item("", [1], 1, full=True)]), "items[0].request_id"),
        (pb.ProposeRequest(items=[item("a", [1, 2, 3], 2, full=True)]), "items[0].total_length"),
        (pb.ProposeRequest(items=[item("a", [1], 1, full=True), item("a", [1], 1, full=True)]), "items[1].request_id"),
        (pb.ProposeRequest(items=[item("a", [1, -2], 2, full=True)]), "items[0].new_token_ids"),
    ],
)
def test_bad_input_gets_invalid_argument_and_the_server_keeps_serving(proposer, request_, field):
    _, stub = proposer
    with pytest.raises(grpc.RpcError) as err:
        exchange(stub, request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    [ok] = exchange(stub, pb.ProposeRequest(items=[item("z", [1, 1], 2, full=True)]))
    assert ok.results[0].status == pb.PROPOSE_STATUS_OK


def test_only_listed_verifier_certificates_may_draft(tmp_path):
    """mTLS: a client certificate whose identity is on --verifier-identities-file drafts; one
    from the same CA that is not listed gets UNAUTHENTICATED."""
    ca = trustme.CA()

    def pair(name: str, identity: str) -> tuple[str, str]:
        cert = ca.issue_cert(identity)
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(tmp_path / f"{name}.key"))
        return str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key")

    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "verifiers").write_text("verifier.smartspec\n")
    tls = ServerTLS(*pair("server", "localhost"), str(tmp_path / "ca.pem"))
    config = ProposerConfig(server=ServerConfig(port=0, tls=tls), verifier_identities_file=str(tmp_path / "verifiers"))
    loop = LoopThread()
    server = ProposerServer(config)
    loop.run(server.start())
    try:
        request = pb.ProposeRequest(step_id=1, items=[item("r", [1, 2, 3, 1, 2], 5)])
        for name, identity, expected in [
            ("v", "verifier.smartspec", None),
            ("x", "other.smartspec", "UNAUTHENTICATED"),
        ]:
            client = ClientTLS(str(tmp_path / "ca.pem"), *pair(name, identity))
            with client.channel(f"localhost:{server.port}") as channel:
                try:
                    (reply,) = exchange(pb_grpc.ProposerStub(channel), request)
                    assert expected is None and reply.step_id == 1
                except grpc.RpcError as err:
                    assert err.code().name == expected
    finally:
        loop.run(server.stop(0))
        loop.stop()

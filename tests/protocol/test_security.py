"""TLS, mTLS, certificate rotation and bearer tokens, on a real controller server over real
sockets, with certificates from a test CA (trustme)."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_threads import LoopThread

from controller.cost_model import TOKEN_KNOTS
from controller_svc.server import Controller, ControllerConfig
from protocol.auth import guard
from protocol.controller import cost_from_pb, policy_from_pb
from protocol.security import ClientTLS, ServerTLS, bearer
from protocol.serving import ServerConfig
from protocol.v1 import controller_pb2 as pb
from protocol.v1 import controller_pb2_grpc as pb_grpc


class ControllerThread(LoopThread):
    def __init__(self, **config):
        super().__init__()
        self.controller = Controller(ControllerConfig(**config))
        self.run(self.controller.start())
        self.address = f"localhost:{self.controller.port}"

    def close(self):
        self.run(self.controller.stop())
        self.stop()


@pytest.fixture
def start():
    threads = []

    def make(**config) -> ControllerThread:
        config.setdefault("server", ServerConfig(port=0))
        threads.append(ControllerThread(**config))
        return threads[-1]

    yield make
    for t in threads:
        t.close()


def write_pair(ca: trustme.CA, tmp_path, name: str, *identities: str, common_name=None) -> tuple[str, str]:
    cert = ca.issue_cert(*(identities or ("localhost", "127.0.0.1")), common_name=common_name)
    cert_path, key_path = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert.private_key_pem.write_to_path(str(key_path))
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_path), append=True)
    return str(cert_path), str(key_path)


def write_ca(ca: trustme.CA, tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def healthy(address: str, tls: ClientTLS = ClientTLS(), timeout: float = 5.0) -> grpc.StatusCode:
    with tls.channel(address) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def test_tls_server_refuses_plaintext_and_serves_a_client_that_trusts_its_ca(start, tmp_path):
    ca = trustme.CA()
    cert, key = write_pair(ca, tmp_path, "server")
    server = start(server=ServerConfig(port=0, tls=ServerTLS(cert, key)))
    assert healthy(server.address, timeout=2) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
    assert healthy(server.address, ClientTLS(write_ca(trustme.CA(), tmp_path, "other")), 2) != grpc.StatusCode.OK
    assert healthy(server.address, ClientTLS(write_ca(ca, tmp_path, "ca"))) == grpc.StatusCode.OK


def test_mtls_refuses_a_client_without_a_certificate_from_its_client_ca(start, tmp_path):
    ca, clients = trustme.CA(), trustme.CA()
    cert, key = write_pair(ca, tmp_path, "server")
    server = start(server=ServerConfig(port=0, tls=ServerTLS(cert, key, write_ca(clients, tmp_path, "clients"))))
    trust = write_ca(ca, tmp_path, "ca")
    assert healthy(server.address, ClientTLS(trust), 2) != grpc.StatusCode.OK  # no client certificate
    stranger = write_pair(trustme.CA(), tmp_path, "stranger")
    assert healthy(server.address, ClientTLS(trust, *stranger), 2) != grpc.StatusCode.OK
    member = write_pair(clients, tmp_path, "member")
    assert healthy(server.address, ClientTLS(trust, *member)) == grpc.StatusCode.OK


def test_rotated_certificate_files_are_served_without_a_restart(start, tmp_path):
    old, new = trustme.CA(), trustme.CA()
    cert, key = write_pair(old, tmp_path, "server")
    server = start(server=ServerConfig(port=0, tls=ServerTLS(cert, key)))
    trusts_old, trusts_new = ClientTLS(write_ca(old, tmp_path, "old")), ClientTLS(write_ca(new, tmp_path, "new"))
    assert healthy(server.address, trusts_old) == grpc.StatusCode.OK
    assert healthy(server.address, trusts_new, 2) != grpc.StatusCode.OK
    time.sleep(0.01)  # a new modification time, whatever the file system's resolution
    write_pair(new, tmp_path, "server")  # the Secret rotates: same paths, new contents
    assert healthy(server.address, trusts_new) == grpc.StatusCode.OK  # the next handshake uses them
    assert healthy(server.address, trusts_old, 2) != grpc.StatusCode.OK


def test_bad_tls_settings_are_named():
    with pytest.raises(ValueError, match="--tls-key"):
        ServerTLS("cert.pem").credentials()
    with pytest.raises(ValueError, match="--tls-client-ca needs"):
        ServerTLS(tls_client_ca="ca.pem").credentials()
    with pytest.raises(ValueError, match="--tls-client-key"):
        ClientTLS("ca.pem", "cert.pem").credentials()


def test_tokens_guard_set_policy_and_connect_and_leave_health_open(start, tmp_path):
    admin, verifier = tmp_path / "admin", tmp_path / "verifier"
    admin.write_text("# rotated monthly\nadmin-secret\n")
    verifier.write_text("verifier-secret\n")
    server = start(admin_tokens_file=str(admin), verifier_tokens_file=str(verifier))
    request = pb.SetPolicyRequest(mode=pb.POLICY_MODE_FIXED, k=2)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ControllerStub(channel)
        refusals = [(None, "UNAUTHENTICATED"), ("guess", "UNAUTHENTICATED"), ("verifier-secret", "PERMISSION_DENIED")]
        for token, code in refusals:
            with pytest.raises(grpc.RpcError) as err:
                stub.SetPolicy(request, timeout=5, metadata=bearer(token))
            assert err.value.code().name == code and "secret" not in err.value.details()
        assert stub.SetPolicy(request, timeout=5, metadata=bearer("admin-secret")).k == 2
        assert stub.GetPolicy(pb.GetPolicyRequest(), timeout=5, metadata=bearer("verifier-secret")).k == 2

        def connect(token):
            reports = iter([pb.VerifierReport(verifier_id="v")])
            return next(iter(stub.Connect(reports, timeout=5, metadata=bearer(token))))

        with pytest.raises(grpc.RpcError) as err:  # a stream is refused the same way
            connect("admin-secret")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert connect("verifier-secret").policy.k == 2
    assert healthy(server.address) == grpc.StatusCode.OK  # probes carry no token
    # The token file is re-read when it changes: the old token stops working.
    time.sleep(0.01)
    admin.write_text("new-admin-secret\n")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ControllerStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.SetPolicy(request, timeout=5, metadata=bearer("admin-secret"))
        assert stub.SetPolicy(request, timeout=5, metadata=bearer("new-admin-secret")).k == 2


def test_certificate_identities_hold_roles_beside_tokens(start, tmp_path):
    """mTLS identities on allow-lists: a subject alternative name or the common name holds a
    role; an identity on no list holds none; a token still works; the lists are re-read."""
    ca = trustme.CA()
    cert, key = write_pair(ca, tmp_path, "server")
    admins, verifiers, tokens = tmp_path / "admins", tmp_path / "verifiers", tmp_path / "tokens"
    admins.write_text("# operators\nops.smartspec\n")
    verifiers.write_text("verifier-0.smartspec\nverifier-by-cn\n")
    tokens.write_text("admin-secret\n")
    server = start(
        server=ServerConfig(port=0, tls=ServerTLS(cert, key, write_ca(ca, tmp_path, "clients"))),
        admin_identities_file=str(admins),
        verifier_identities_file=str(verifiers),
        admin_tokens_file=str(tokens),
    )
    trust = write_ca(ca, tmp_path, "ca")

    def client(*identities, common_name=None) -> ClientTLS:
        return ClientTLS(trust, *write_pair(ca, tmp_path, identities[0], *identities, common_name=common_name))

    ops, verifier = client("ops.smartspec"), client("verifier-0.smartspec")
    by_cn, stranger = client("unlisted.smartspec", common_name="verifier-by-cn"), client("stranger.smartspec")
    request = pb.SetPolicyRequest(mode=pb.POLICY_MODE_FIXED, k=3)

    def call(tls: ClientTLS, method: str, token=None):
        with tls.channel(server.address, "localhost") as channel:
            stub = pb_grpc.ControllerStub(channel)
            try:
                if method == "Connect":
                    reports = iter([pb.VerifierReport(verifier_id="v")])
                    next(iter(stub.Connect(reports, timeout=5, metadata=bearer(token))))
                else:
                    message = request if method == "SetPolicy" else pb.GetPolicyRequest()
                    getattr(stub, method)(message, timeout=5, metadata=bearer(token))
            except grpc.RpcError as err:
                assert "smartspec" not in err.details()  # refusals name no identity
                return err.code().name
        return "OK"

    assert call(ops, "SetPolicy") == "OK" and call(ops, "GetPolicy") == "OK"
    assert call(verifier, "SetPolicy") == "PERMISSION_DENIED"
    assert call(verifier, "Connect") == "OK" and call(by_cn, "Connect") == "OK"
    assert call(verifier, "GetPolicy") == "OK"
    assert call(stranger, "SetPolicy") == "UNAUTHENTICATED" and call(stranger, "Connect") == "UNAUTHENTICATED"
    assert call(stranger, "SetPolicy", token="admin-secret") == "OK"
    assert healthy(server.address, stranger) == grpc.StatusCode.OK
    with admins.open("a") as f:  # the list is re-read when it changes
        f.write("stranger.smartspec\n")
    assert call(stranger, "SetPolicy") == "OK"


def test_identities_are_refused_without_client_certificates_or_entries(tmp_path):
    listed, empty = tmp_path / "identities", tmp_path / "empty"
    listed.write_text("ops.smartspec\n")
    empty.write_text("# none yet\n")
    config = ControllerConfig(server=ServerConfig(port=0), admin_identities_file=str(listed))
    with pytest.raises(ValueError, match="--admin-identities-file needs --tls-client-ca"):
        asyncio.run(Controller(config).start())  # refused before anything listens
    with pytest.raises(ValueError, match="no identities"):
        guard({"s.S": ("admin",)}, identities={"admin": str(empty)}, client_ca="ca.pem")


def test_without_token_files_the_controller_stays_open(start):
    server = start()
    with grpc.insecure_channel(server.address) as channel:
        reply = pb_grpc.ControllerStub(channel).SetPolicy(pb.SetPolicyRequest(mode=pb.POLICY_MODE_OFF), timeout=5)
    assert reply.mode == pb.POLICY_MODE_OFF


def good_policy(**changes) -> pb.Policy:
    msg = pb.Policy(mode=pb.POLICY_MODE_SMARTSPEC, k_max=8, acceptance_prior=0.6, version=3)
    for name, value in changes.items():
        setattr(msg, name, value)
    return msg


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"mode": 42}, "mode"),
        ({"mode": pb.POLICY_MODE_FIXED, "k": 0}, "k"),
        ({"mode": pb.POLICY_MODE_FIXED, "k": 99}, "k"),
        ({"k_max": 1000}, "k_max"),
        ({"k_max": 0}, "k_max"),
        ({"acceptance_prior": math.nan}, "acceptance_prior"),
        ({"acceptance_prior": 1.5}, "acceptance_prior"),
    ],
)
def test_pushed_policy_values_out_of_bounds_are_refused(changes, field):
    policy_from_pb(good_policy())  # the unchanged one is fine
    with pytest.raises(ValueError, match=field):
        policy_from_pb(good_policy(**changes))


def test_pushed_costs_that_no_step_could_take_are_dropped():
    knots = [10.0] * len(TOKEN_KNOTS)

    def cost(**changes) -> pb.CostModel:
        fields = dict(verify_token_knots=TOKEN_KNOTS, verify_ms_at_knots=knots, draft_step_ms=1.0, num_steps=300)
        return pb.CostModel(**{**fields, **changes})

    assert cost_from_pb(cost()) is not None
    assert cost_from_pb(cost(verify_ms_per_request=-0.5)) is not None  # a fitted slope may lean down
    for bad in ({"draft_step_ms": -1.0}, {"verify_ms_at_knots": [math.inf] * len(TOKEN_KNOTS)},
                {"verify_ms_per_kv_token": math.nan}, {"proposer_rtt_ms": math.nan}):  # fmt: skip
        assert cost_from_pb(cost(**bad)) is None, bad


def test_probes_reach_health_on_a_plaintext_port_that_serves_nothing_else(start, tmp_path, unused_tcp_port):
    """Kubelet gRPC probes cannot speak TLS: --health-port answers them in plaintext, with the
    same health status as the TLS port, and serves no other service."""
    ca = trustme.CA()
    cert, key = write_pair(ca, tmp_path, "server")
    server = start(server=ServerConfig(port=0, health_port=unused_tcp_port, tls=ServerTLS(cert, key)))
    probe = f"127.0.0.1:{unused_tcp_port}"
    assert healthy(probe) == grpc.StatusCode.OK
    with grpc.insecure_channel(probe) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.ControllerStub(channel).GetPolicy(pb.GetPolicyRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    server.run(server.controller.health.enter_graceful_shutdown())
    with grpc.insecure_channel(probe) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

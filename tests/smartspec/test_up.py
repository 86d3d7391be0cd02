"""`smartspec up`'s process list (the processes themselves run in tests/e2e/test_stack.py)."""

from __future__ import annotations

import argparse

import pytest

from smartspec import up


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    up.add_arguments(parser)
    return parser.parse_args(argv)


def test_proposers_come_first_and_get_one_thread_by_default():
    procs = [cmd for cmd, _ in up.commands(parse("--replicas", "2"))]
    roles = [cmd[3] for cmd in procs]
    assert roles == ["proposer", "proposer", "controller", "verifier"]
    for cmd in procs[:2]:
        assert cmd[cmd.index("--threads") + 1] == "1"
    verifier = procs[-1]
    assert verifier[verifier.index("--proposer") + 1] == "127.0.0.1:50061,127.0.0.1:50062"


def test_proposer_threads_can_be_raised():
    procs = [cmd for cmd, _ in up.commands(parse("--ngram", "--proposer-threads", "2"))]
    assert procs[0][procs[0].index("--threads") + 1] == "2"
    assert "--threads" not in up.commands(parse("--proposer-threads", "0"))[0][0]  # torch's default: all cores
    assert "--ngram" in procs[0]


def test_device_dtype_and_draft_confidence_reach_the_processes():
    procs = [
        cmd for cmd, _ in up.commands(parse("--device", "cuda", "--dtype", "bfloat16", "--draft-min-confidence", "0.4"))
    ]
    for cmd in (procs[0], procs[-1]):  # the draft proposer and the verifier
        assert cmd[cmd.index("--device") + 1] == "cuda" and cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert procs[0][procs[0].index("--min-confidence") + 1] == "0.4"
    assert "--min-confidence" not in up.commands(parse("--ngram"))[0][0]
    with pytest.raises(ValueError, match="needs a draft model"):
        up.commands(parse("--ngram", "--draft-min-confidence", "0.4"))


def test_tls_gives_every_process_its_certificate_and_the_verifier_a_client_one(tmp_path):
    from smartspec.certs import local_ca

    certs = {"ca": tmp_path / "ca.pem", **local_ca(tmp_path, ["smartspec", "client"])}
    procs = [cmd for cmd, _ in up.commands(parse("--ngram"), certs)]
    cert, key = (str(p) for p in certs["smartspec"])
    for cmd in procs:
        assert cmd[cmd.index("--tls-cert") + 1] == cert and cmd[cmd.index("--tls-key") + 1] == key
        assert cmd[cmd.index("--tls-client-ca") + 1] == str(certs["ca"])  # mTLS: every server asks
    verifier = procs[-1]
    assert verifier[verifier.index("--tls-ca") + 1] == str(certs["ca"])
    assert verifier[verifier.index("--tls-client-cert") + 1] == cert
    assert all("--tls-cert" not in cmd for cmd, _ in up.commands(parse("--ngram")))  # plaintext by default
    assert (tmp_path / "client.key").stat().st_mode & 0o077 == 0  # keys readable by their owner only

"""Service settings from SMARTSPEC_<FLAG> environment variables, through the real `smartspec` parser.

Kubernetes hands the services their settings as environment variables (a ConfigMap read with
`envFrom`); these tests pin down what a variable means next to the command line."""

from __future__ import annotations

import argparse
import re

import pytest

from protocol.serving import ENV_PREFIX, env_name
from smartspec.cli import NOT_FLAGS, EnvArgumentParser, build_parser

SERVICES = ("verifier", "proposer", "controller")


@pytest.fixture
def env(monkeypatch):
    """The environment with no SMARTSPEC_* variable but those the test sets (conftest's cache stays)."""
    import os

    for name in list(os.environ):
        if name.startswith(ENV_PREFIX) and name not in NOT_FLAGS:
            monkeypatch.delenv(name)

    def set_(**variables: str) -> None:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)

    return set_


def parse(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(list(args))


def refused(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        parse(*args)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def service_parser(name: str) -> EnvArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_env_name_is_the_flag_in_upper_case_with_underscores():
    assert env_name("--max-num-seqs") == "SMARTSPEC_MAX_NUM_SEQS"
    assert env_name("--tls-client-ca") == "SMARTSPEC_TLS_CLIENT_CA"


@pytest.mark.parametrize(
    ("service", "variable", "value", "dest", "expected"),
    [
        ("verifier", "SMARTSPEC_MAX_NUM_SEQS", "8", "max_num_seqs", 8),
        ("verifier", "SMARTSPEC_KV_WATERMARK", "0.25", "kv_watermark", 0.25),
        ("verifier", "SMARTSPEC_MODEL", "/models/target", "model", "/models/target"),
        (
            "verifier",
            "SMARTSPEC_PROPOSER",
            "dns:p.ns.svc.cluster.local:50061",
            "proposer",
            "dns:p.ns.svc.cluster.local:50061",
        ),
        ("verifier", "SMARTSPEC_MAX_MODEL_LEN", "4096", "max_model_len", 4096),
        ("proposer", "SMARTSPEC_DEVICE", "cuda", "device", "cuda"),
        ("controller", "SMARTSPEC_POLICY", "smartspec:4", "policy", "smartspec:4"),
        ("controller", "SMARTSPEC_PUSH_INTERVAL_S", "2.5", "push_interval_s", 2.5),
    ],
)
def test_variable_sets_the_flag_converted_by_its_type(env, service, variable, value, dest, expected):
    env(**{variable: value})
    extra = ["--ngram"] if service == "proposer" else []
    assert getattr(parse(service, *extra), dest) == expected


def test_settings_reach_the_service_config(env):
    from verifier_svc.server import VerifierConfig

    env(SMARTSPEC_MAX_NUM_SEQS="8", SMARTSPEC_DEVICE="cuda", SMARTSPEC_PORT="6000")
    config = VerifierConfig.from_args(parse("verifier"))
    assert (config.scheduler.max_num_seqs, config.placement.device, config.server.port) == (8, "cuda", 6000)


def test_command_line_wins(env):
    env(SMARTSPEC_MAX_NUM_SEQS="8", SMARTSPEC_POLICY="off")
    args = parse("verifier", "--max-num-seqs", "3", "--policy=fixed:2")
    assert (args.max_num_seqs, args.policy) == (3, "fixed:2")


def test_command_line_wins_over_a_bad_value(env):
    # A broken ConfigMap value can be overridden by a flag while it is fixed.
    env(SMARTSPEC_MAX_NUM_SEQS="lots")
    assert parse("verifier", "--max-num-seqs", "3").max_num_seqs == 3


def test_bad_value_names_the_flag_and_the_variable(env, capsys):
    env(SMARTSPEC_MAX_NUM_SEQS="lots")
    err = refused(capsys, "verifier")
    assert "--max-num-seqs" in err and "SMARTSPEC_MAX_NUM_SEQS" in err and "'lots'" in err


def test_bad_float_names_the_flag_and_the_variable(env, capsys):
    env(SMARTSPEC_GRACE_SECONDS="30s")
    err = refused(capsys, "controller")
    assert "--grace-seconds" in err and "SMARTSPEC_GRACE_SECONDS" in err


def test_unset_variables_leave_the_defaults(env):
    assert parse("verifier").max_num_seqs == 64
    assert parse("controller").policy == "smartspec"


@pytest.mark.parametrize(
    ("text", "value"), [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("no", False)]
)
def test_switch_takes_true_or_false(env, text, value):
    env(SMARTSPEC_FULL_HEAD=text)
    assert parse("proposer", "--draft", "smollm2-draft").full_head is value


@pytest.mark.parametrize("text", ["on", "2", "", "truthy"])
def test_switch_refuses_anything_else_naming_the_variable(env, capsys, text):
    env(SMARTSPEC_FULL_HEAD=text)
    err = refused(capsys, "proposer", "--draft", "smollm2-draft")
    assert "SMARTSPEC_FULL_HEAD" in err and "true/false" in err


def test_switch_on_the_command_line_wins(env):
    env(SMARTSPEC_FULL_HEAD="true")
    assert parse("proposer", "--draft", "d", "--no-full-head").full_head is False


@pytest.mark.parametrize("service", SERVICES)
def test_unknown_variable_is_an_error_naming_it(env, capsys, service):
    env(SMARTSPEC_MAX_NUM_SEQ="8")
    extra = ["--ngram"] if service == "proposer" else []
    err = refused(capsys, service, *extra)
    assert "SMARTSPEC_MAX_NUM_SEQ names no flag" in err


def test_unknown_variable_suggests_the_close_one(env, capsys):
    env(SMARTSPEC_MAX_NUM_SEQ="8")
    assert "did you mean SMARTSPEC_MAX_NUM_SEQS?" in refused(capsys, "verifier")


def test_another_services_variable_is_unknown(env, capsys):
    # The verifier has --max-num-seqs, the controller has not: a ConfigMap meant for one is no use to the other.
    env(SMARTSPEC_MAX_NUM_SEQS="8")
    assert "SMARTSPEC_MAX_NUM_SEQS names no flag" in refused(capsys, "controller")


def test_every_unknown_variable_is_named(env, capsys):
    env(SMARTSPEC_FOO="1", SMARTSPEC_BAR="2")
    err = refused(capsys, "verifier")
    assert "SMARTSPEC_FOO names no flag" in err and "SMARTSPEC_BAR names no flag" in err
    assert "did you mean" not in err, "nothing is close to these"


@pytest.mark.parametrize("service", SERVICES)
def test_variables_read_elsewhere_are_allowed(env, service, tmp_path):
    env(SMARTSPEC_CACHE_DIR=str(tmp_path), SMARTSPEC_LOG_LEVEL="DEBUG")
    extra = ["--ngram"] if service == "proposer" else []
    assert parse(service, *extra).log_level == "DEBUG"


def test_log_level_flag_wins(env):
    env(SMARTSPEC_LOG_LEVEL="DEBUG")
    assert parse("--log-level", "WARNING", "controller").log_level == "WARNING"


def test_other_commands_ignore_service_variables(env):
    # A shell with a service's settings exported must not change what a client does.
    env(SMARTSPEC_TLS_CA="/nowhere/ca.pem", SMARTSPEC_NOT_A_FLAG="1")
    args = parse("generate", "hello")
    assert args.tls_ca is None


def test_proposer_draft_from_the_environment(env):
    env(SMARTSPEC_DRAFT="smollm2-draft")
    args = parse("proposer")
    assert (args.draft, args.ngram) == ("smollm2-draft", False)


def test_proposer_ngram_from_the_environment(env):
    env(SMARTSPEC_NGRAM="true")
    args = parse("proposer")
    assert (args.draft, args.ngram) == (None, True)


def test_proposer_kind_on_the_command_line_replaces_the_environments(env):
    env(SMARTSPEC_NGRAM="true")
    args = parse("proposer", "--draft", "smollm2-draft")
    assert (args.draft, args.ngram) == ("smollm2-draft", False)
    env(SMARTSPEC_NGRAM="false", SMARTSPEC_DRAFT="smollm2-draft")
    args = parse("proposer", "--ngram")
    assert (args.draft, args.ngram) == (None, True)


def test_proposer_kind_set_twice_in_the_environment_is_an_error(env, capsys):
    env(SMARTSPEC_NGRAM="1", SMARTSPEC_DRAFT="smollm2-draft")
    err = refused(capsys, "proposer")
    assert "SMARTSPEC_NGRAM" in err and "SMARTSPEC_DRAFT" in err


def test_proposer_still_needs_a_kind(env, capsys):
    env(SMARTSPEC_NGRAM="false")
    assert "--ngram" in refused(capsys, "proposer")


def test_proposer_kind_both_on_the_command_line_is_still_an_error(env, capsys):
    env(SMARTSPEC_DRAFT="smollm2-draft")
    assert "not allowed with" in refused(capsys, "proposer", "--ngram", "--draft", "x")


@pytest.mark.parametrize("service", SERVICES)
def test_help_names_every_variable(env, capsys, monkeypatch, service):
    monkeypatch.setenv("COLUMNS", "400")  # one line per flag: names are not broken across lines
    with pytest.raises(SystemExit) as exit_:
        parse(service, "--help")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    parser = service_parser(service)
    flags = {
        option: action
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and not option.startswith("--no-") and option != "--help"
    }
    assert len(flags) > 10
    for flag in flags:
        # The flag's entry: its line, and the next when a long flag pushes its help there.
        entry = re.search(rf"^  {re.escape(flag)}\b[^\n]*(\n {{3,}}[^\n]*)?", text, re.M)
        assert entry, f"--help lists no {flag}"
        assert f"[env {env_name(flag)}]" in entry[0], f"--help gives no variable for {flag}: {entry[0]!r}"
    assert "SMARTSPEC_<FLAG>" in text


def test_the_parser_can_be_used_again(env, monkeypatch):
    # Defaults taken from the environment belong to one parse, not to the parser.
    parser = build_parser()
    env(SMARTSPEC_MAX_NUM_SEQS="8")
    assert parser.parse_args(["verifier"]).max_num_seqs == 8
    env(SMARTSPEC_MAX_NUM_SEQS="9")
    assert parser.parse_args(["verifier"]).max_num_seqs == 9
    monkeypatch.delenv("SMARTSPEC_MAX_NUM_SEQS")
    assert parser.parse_args(["verifier"]).max_num_seqs == 64
    env(SMARTSPEC_DRAFT="d")
    assert parser.parse_args(["proposer"]).draft == "d"
    monkeypatch.delenv("SMARTSPEC_DRAFT")
    assert parser.parse_args(["proposer", "--ngram"]).draft is None


def test_plain_parser_reads_nothing(monkeypatch):
    monkeypatch.setenv("SMARTSPEC_X", "1")
    parser = EnvArgumentParser(prog="p")
    parser.add_argument("--x", type=int, default=0)
    assert parser.parse_args([]).x == 0


def test_choices_are_checked(monkeypatch, capsys):
    monkeypatch.setenv("T_MODE", "c")
    parser = EnvArgumentParser(prog="p", env_prefix="T_")
    parser.add_argument("--mode", choices=["a", "b"], default="a")
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert "T_MODE" in capsys.readouterr().err
    monkeypatch.setenv("T_MODE", "b")
    assert parser.parse_args([]).mode == "b"


def test_required_flag_may_come_from_the_environment(monkeypatch):
    parser = EnvArgumentParser(prog="p", env_prefix="T_")
    parser.add_argument("--name", required=True)
    monkeypatch.setenv("T_NAME", "x")
    assert parser.parse_args([]).name == "x"
    monkeypatch.delenv("T_NAME")
    with pytest.raises(SystemExit):
        parser.parse_args([])

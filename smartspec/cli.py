"""The `smartspec` command."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Iterable

from protocol.serving import ENV_PREFIX, LOG_LEVEL_ENV, NOT_FLAGS, env_name

_TRUE, _FALSE = frozenset({"true", "1", "yes"}), frozenset({"false", "0", "no"})


def _switch(action: argparse.Action) -> bool:
    return isinstance(action, argparse.BooleanOptionalAction | argparse._StoreConstAction)


def _settable(action: argparse.Action) -> bool:
    """Whether one string can stand for the flag: a switch, or a flag taking one value."""
    return _switch(action) or (isinstance(action, argparse._StoreAction) and action.nargs in (None, "?"))


def _naming(var: str, text: str, convert):
    """`convert` (a flag's type), whose error for the environment's `text` names `var` as well as the flag."""

    def parse(value):
        try:
            return convert(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            if value is not text:
                raise
            why = f": {e}" if isinstance(e, argparse.ArgumentTypeError) else ""
            raise argparse.ArgumentTypeError(f"invalid {parse.__name__} value {text!r} from {var}{why}") from e

    parse.__name__ = getattr(convert, "__name__", repr(convert))
    return parse


class EnvArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose flags may also come from the environment when it has an `env_prefix`
    (without one it is a plain ArgumentParser): PREFIX + the flag's name (upper case, dashes as
    underscores) is the flag's default, so the command line still wins, and the value is converted
    by the flag's own type, so it means what the flag would. Switches take true/false, 1/0, yes/no.

    Manifests set a service's settings by name this way (a ConfigMap read with `envFrom`), which
    is why a variable with the prefix that names no flag is an error rather than ignored: a typo
    in a key would otherwise silently leave the setting at its default. `env_ignore`: variables
    with the prefix that something other than the flags reads.

    Of flags that exclude each other (`add_mutually_exclusive_group`), one given on the command
    line replaces any the environment sets; the environment may set only one of them."""

    def __init__(self, *args, env_prefix: str | None = None, env_ignore: Iterable[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.env_prefix, self.env_ignore = env_prefix, frozenset(env_ignore)

    def env_flags(self) -> dict[str, argparse.Action]:
        """Variable name -> the flag it sets; each flag's help names its variable."""
        flags = {}
        if self.env_prefix is None:
            return flags
        for action in self._actions:
            names = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
            if not names or not _settable(action):
                continue
            var = env_name(names[0], self.env_prefix)
            flags[var] = action
            if action.help is not argparse.SUPPRESS and var not in (action.help or ""):
                action.help = f"{action.help} [env {var}]" if action.help else f"[env {var}]"
        return flags

    def format_help(self) -> str:
        self.env_flags()
        return super().format_help()

    def _from_env(self, action: argparse.Action, var: str, text: str):
        if not _switch(action):
            return text  # argparse converts a string default with the flag's type
        word = text.strip().lower()
        if word not in _TRUE | _FALSE:
            self.error(f"{var}={text!r} is not a boolean (true/false, 1/0, yes/no)")
        if isinstance(action, argparse.BooleanOptionalAction):
            return word in _TRUE
        return action.const if word in _TRUE else action.default

    def parse_known_args(self, args=None, namespace=None):
        if self.env_prefix is None:
            return super().parse_known_args(args, namespace)
        flags = self.env_flags()
        environ = {k: v for k, v in os.environ.items() if k.startswith(self.env_prefix)}
        exclusive = {a for g in self._mutually_exclusive_groups for a in g._group_actions}
        saved = [(a, a.default, a.required, a.type) for a in flags.values()]
        saved_groups = [(g, g.required) for g in self._mutually_exclusive_groups]
        applied, deferred = [], {}
        try:
            for var, action in flags.items():
                if var not in environ:
                    continue
                value = self._from_env(action, var, environ[var])
                if action in exclusive:
                    # Applied after parsing, once it is known whether the command line chose.
                    if value != action.default:
                        deferred[action] = (var, value)
                    continue
                action.default, action.required = value, False
                if isinstance(value, str) and action.type is not None:
                    action.type = _naming(var, value, action.type)
                applied.append(action)
            for group in self._mutually_exclusive_groups:
                if any(a in deferred for a in group._group_actions):
                    group.required = False
            namespace, extras = super().parse_known_args(args, namespace)
        finally:
            for action, default, required, kind in saved:
                action.default, action.required, action.type = default, required, kind
            for group, required in saved_groups:
                group.required = required
        for action in applied:
            if action.choices is not None and getattr(namespace, action.dest) not in action.choices:
                var = next(v for v, a in flags.items() if a is action)
                self.error(f"{var}={environ[var]!r}: not one of {', '.join(map(str, action.choices))}")
        for group in self._mutually_exclusive_groups:
            chosen = [a for a in group._group_actions if a in deferred]
            given = any(getattr(namespace, a.dest, a.default) != a.default for a in group._group_actions)
            if not chosen or given:
                continue
            if len(chosen) > 1:
                self.error(f"{' and '.join(deferred[a][0] for a in chosen)} exclude each other")
            action = chosen[0]
            var, value = deferred[action]
            if isinstance(value, str) and action.type is not None:
                try:
                    value = _naming(var, value, action.type)(value)
                except argparse.ArgumentTypeError as e:
                    self.error(f"argument {'/'.join(action.option_strings)}: {e}")
            setattr(namespace, action.dest, value)
        unknown = sorted(set(environ) - set(flags) - self.env_ignore)
        if unknown:
            problems, start = [], len(self.env_prefix)
            for var in unknown:
                # Compared without the prefix, which every name shares.
                close = difflib.get_close_matches(var[start:], [f[start:] for f in flags], n=1)
                hint = f" (did you mean {self.env_prefix}{close[0]}?)" if close else ""
                problems.append(f"{var} names no flag{hint}")
            self.error("; ".join(problems))
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    from controller_svc.server import ControllerConfig
    from proposer_svc.server import ProposerConfig
    from smartspec import bench, client, ctl, simulate, up
    from verifier_svc.server import VerifierConfig

    parser = argparse.ArgumentParser(prog="smartspec", description="LLM serving with goodput-driven speculation.")
    parser.add_argument(
        "--log-level",
        default=os.environ.get(LOG_LEVEL_ENV, "INFO"),
        help=f"DEBUG | INFO | WARNING | ERROR [env {LOG_LEVEL_ENV}]",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=EnvArgumentParser)
    # Only the services read their settings from the environment (Kubernetes sets them from a
    # ConfigMap): a client, or `up`, started from a shell that has some set keeps its own flags.
    service = {
        "env_prefix": ENV_PREFIX,
        "env_ignore": NOT_FLAGS,
        "epilog": f"Each flag may also be set by the environment variable shown with it, "
        f"{ENV_PREFIX}<FLAG> (upper case, dashes as underscores); the command line wins. "
        f"Any other {ENV_PREFIX}* variable is an error.",
    }
    VerifierConfig.add_arguments(sub.add_parser("verifier", help="serve the target model (Generation API)", **service))
    ProposerConfig.add_arguments(sub.add_parser("proposer", help="serve draft proposals (Proposer API)", **service))
    ControllerConfig.add_arguments(
        sub.add_parser("controller", help="serve the goodput controller (Controller API)", **service)
    )
    ctl.add_arguments(sub.add_parser("ctl", help="read or change the controller's policy"))
    client.add_arguments(sub.add_parser("generate", help="stream one completion from a running server"))
    bench.add_arguments(sub.add_parser("bench", help="load-test a running server"))
    up.add_arguments(
        sub.add_parser("up", help="start the local stack: proposer replicas, the controller and a verifier")
    )
    simulate.add_arguments(
        sub.add_parser("simulate", help="a rate x policy sweep on a virtual clock, from a measured cost profile")
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "verifier":
        from verifier_svc.server import main as serve_main

        return serve_main(args)
    if args.command == "proposer":
        from proposer_svc.server import main as proposer_main

        return proposer_main(args)
    if args.command == "controller":
        from controller_svc.server import main as controller_main

        return controller_main(args)
    if args.command == "ctl":
        from smartspec.ctl import run

        return run(args)
    if args.command == "generate":
        from smartspec.client import run

        return run(args)
    if args.command == "up":
        from smartspec.up import run

        return run(args)
    if args.command == "simulate":
        from smartspec.simulate import run

        return run(args)
    if args.rates or args.policies:
        from smartspec.sweep import run
    else:
        from smartspec.bench import run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

"""The `smartspec` command."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from controller_svc.server import ControllerConfig
    from proposer_svc.server import ProposerConfig
    from smartspec import bench, client, ctl, simulate, up
    from verifier_svc.server import VerifierConfig

    parser = argparse.ArgumentParser(prog="smartspec", description="LLM serving with goodput-driven speculation.")
    parser.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING | ERROR")
    sub = parser.add_subparsers(dest="command", required=True)
    VerifierConfig.add_arguments(sub.add_parser("verifier", help="serve the target model (Generation API)"))
    ProposerConfig.add_arguments(sub.add_parser("proposer", help="serve draft proposals (Proposer API)"))
    ControllerConfig.add_arguments(sub.add_parser("controller", help="serve the goodput controller (Controller API)"))
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

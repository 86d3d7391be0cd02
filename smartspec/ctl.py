"""`smartspec ctl`: read or change the controller's policy at run time."""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from controller.policy import Mode, Policy
from protocol.controller import MODE_FROM_PB, MODE_TO_PB
from protocol.v1 import controller_pb2 as pb
from protocol.v1 import controller_pb2_grpc as pb_grpc
from smartspec import dial


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--controller", default="127.0.0.1:50071", help="host:port of the controller")
    dial.add_arguments(parser, "file holding an admin token of the controller (--admin-tokens-file)")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("get", help="print the policy in force")
    setter = sub.add_parser("set", help="change the policy")
    setter.add_argument("policy", help="off | fixed:K | smartspec[:KMAX] | smartspec-uniform[:KMAX]")


def set_request(text: str) -> pb.SetPolicyRequest:
    policy = Policy.parse(text)
    k_max = policy.k_max if policy.mode in (Mode.SMARTSPEC, Mode.UNIFORM) else 0
    return pb.SetPolicyRequest(mode=MODE_TO_PB[policy.mode], k=policy.k, k_max=k_max)


def describe(policy: pb.Policy) -> dict:
    cost = policy.cost_model
    return {
        "mode": MODE_FROM_PB.get(policy.mode, "unspecified"),
        "k": policy.k,
        "k_max": policy.k_max,
        "version": policy.version,
        "acceptance_prior": round(policy.acceptance_prior, 4),
        "cost_model": {
            "steps_fitted": cost.num_steps,
            "verify_relative_error": round(cost.verify_relative_error, 4),
            "verify_ms_at_tokens": {
                int(t): round(ms, 2) for t, ms in zip(cost.verify_token_knots, cost.verify_ms_at_knots) if t <= 512
            },
            "verify_ms_per_request": round(cost.verify_ms_per_request, 4),
            "verify_ms_per_kv_token": round(cost.verify_ms_per_kv_token, 6),
            "draft_step_ms": round(cost.draft_step_ms, 3),
            "draft_ms_per_token": round(cost.draft_ms_per_token, 3),
            "proposer_rtt_ms": round(cost.proposer_rtt_ms, 3),
        },
    }


def run(args: argparse.Namespace) -> int:
    try:
        request = set_request(args.policy) if args.action == "set" else None
    except ValueError as e:
        print(f"smartspec ctl: {e}", file=sys.stderr)
        return 2
    how = dial.from_args(args)
    with how.channel(args.controller) as channel:
        stub = pb_grpc.ControllerStub(channel)
        try:
            if request:
                reply = stub.SetPolicy(request, timeout=10, metadata=how.metadata)
            else:
                reply = stub.GetPolicy(pb.GetPolicyRequest(), timeout=10, metadata=how.metadata)
        except grpc.RpcError as e:
            print(f"smartspec ctl: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(json.dumps(describe(reply), indent=1))
    return 0

"""`smartspec generate`: streams one completion from a running server to the terminal."""

from __future__ import annotations

import argparse
import sys
import time

import grpc

from protocol.v1 import generation_pb2 as pb
from protocol.v1 import generation_pb2_grpc as pb_grpc
from smartspec import dial
from smartspec.bench import parse_speculation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="prompt text")
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of the Generation service")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--speculation", default="auto", help="off | auto | fixed:K")
    parser.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    dial.add_arguments(parser, "file holding the API key the server asks for")


def build_request(args: argparse.Namespace) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=args.temperature, top_k=args.top_k)
    if args.top_p is not None:
        sampling.top_p = args.top_p
    if args.seed is not None:
        sampling.seed = args.seed
    return pb.GenerateRequest(
        prompt_text=args.prompt,
        chat=args.chat,
        sampling=sampling,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        speculation=parse_speculation(args.speculation),
    )


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    first = None
    last: pb.GenerateResponse | None = None
    how = dial.from_args(args)
    with how.channel(args.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        try:
            for chunk in stub.Generate(build_request(args), timeout=args.timeout, metadata=how.metadata):
                if first is None and chunk.token_ids:
                    first = time.perf_counter()
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
        except grpc.RpcError as err:
            print(f"\nerror: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    total = time.perf_counter() - start
    sys.stdout.write("\n")
    if last is not None:
        n = last.usage.completion_tokens
        ttft = (first or time.perf_counter()) - start
        tpot = (total - ttft) / (n - 1) * 1e3 if n > 1 else 0.0
        reason = pb.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        spec = last.speculation
        drafts = (
            f", drafts accepted {spec.accepted_tokens}/{spec.proposed_tokens}"
            f" (mean {spec.mean_accepted_length:.2f} tokens/step)"
            if spec.proposed_tokens
            else ""
        )
        print(
            f"[{n} tokens, finish={reason}, ttft={ttft * 1e3:.0f} ms, tpot={tpot:.1f} ms, total={total:.2f} s{drafts}]",
            file=sys.stderr,
        )
    return 0

"""`smartspec bench`: an open-loop load generator for the Generation service.

Requests arrive on a Poisson (or gamma) schedule whatever the server's pace, so
queueing shows up in the latencies instead of slowing the client down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import grpc
import numpy as np
from tqdm import tqdm

from protocol.v1 import generation_pb2 as pb
from protocol.v1 import generation_pb2_grpc as pb_grpc
from smartspec import dial, plots
from smartspec.dial import Dial
from smartspec.openai_load import OpenAITarget
from smartspec.prompts import load_prompts
from smartspec.report import RequestRecord, StreamClock, format_table, summarize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default="127.0.0.1:50051",
        help="host:port of the Generation service (with --endpoint openai: of the HTTP API, or its URL)",
    )
    parser.add_argument(
        "--endpoint",
        choices=("grpc", "openai"),
        default="grpc",
        help="the front door to drive: smartspec.v1 gRPC or the OpenAI-compatible HTTP API (--http-port)",
    )
    parser.add_argument(
        "--rate", type=positive_float, default=2.0, help="mean requests per second; 'inf' sends them all at once"
    )
    parser.add_argument("--num-requests", type=_positive_int, default=32)
    parser.add_argument(
        "--prompts",
        default=None,
        help="'builtin' (chat, code, rewrites; the default), 'grounded' (rewrites of a given "
        "passage) or a ShareGPT-style JSON file",
    )
    parser.add_argument("--max-new-tokens", type=_positive_int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    parser.add_argument("--speculation", type=_speculation_arg, default="auto", help="off | auto | fixed:K")
    parser.add_argument("--seed", type=int, default=0, help="seed of arrivals, prompt order and sampling")
    parser.add_argument(
        "--burstiness",
        type=positive_float,
        default=1.0,
        help="gamma shape of inter-arrival times; 1 is Poisson, below 1 is burstier",
    )
    parser.add_argument("--output", default="results/bench.json", help="JSON results; PNGs go next to it")
    sweep = parser.add_argument_group("sweep (rates x policies, the latency-vs-rate figure)")
    sweep.add_argument("--rates", default=None, help="comma-separated request rates; turns on the sweep")
    sweep.add_argument(
        "--policies",
        default=None,
        help="comma-separated policies, e.g. off,fixed:1,fixed:3,fixed:5,smartspec,smartspec-uniform "
        "(turns on the sweep)",
    )
    sweep.add_argument("--repeats", type=_positive_int, default=3, help="runs per (rate, policy); medians reported")
    sweep.add_argument(
        "--controller",
        default=None,
        help="host:port of the controller that sets each policy (needed for smartspec policies)",
    )
    sweep.add_argument(
        "--controller-token-file", default=None, help="file holding an admin token of the controller, to set policies"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    dial.add_arguments(parser, "file holding the API key the server asks for")


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _speculation_arg(text: str) -> str:
    try:
        parse_speculation(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def parse_speculation(text: str) -> pb.Speculation:
    """Map "off", "auto" or "fixed:K" onto the request's speculation override."""
    if text == "auto":
        return pb.Speculation(mode=pb.SPECULATION_MODE_AUTO)
    if text == "off":
        return pb.Speculation(mode=pb.SPECULATION_MODE_OFF)
    name, _, k = text.partition(":")
    if name == "fixed" and k.isdigit() and int(k) > 0:
        return pb.Speculation(mode=pb.SPECULATION_MODE_FIXED, k=int(k))
    raise ValueError(f"speculation must be off, auto or fixed:K with K >= 1, got {text!r}")


def arrival_times(num_requests: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send offsets in seconds, starting at 0, with gamma gaps of mean 1/rate.

    Shape `burstiness` with scale 1/(rate*burstiness) keeps the mean fixed while
    shape 1 gives Poisson arrivals and smaller shapes give clumps and lulls.
    """
    if num_requests <= 0 or not rate > 0 or not burstiness > 0:
        raise ValueError("num_requests, rate and burstiness must be > 0")
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = np.random.default_rng([seed, 0])
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num_requests - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def prompt_order(prompts: list[str], num_requests: int, seed: int = 0) -> list[str]:
    """Shuffled passes over the prompts, so each is used about equally often."""
    if not prompts:
        raise ValueError("need at least one prompt")
    rng = np.random.default_rng([seed, 1])
    order: list[str] = []
    while len(order) < num_requests:
        order.extend(prompts[i] for i in rng.permutation(len(prompts)))
    return order[:num_requests]


def build_request(
    prompt: str, max_new_tokens: int, temperature: float, chat: bool, speculation: pb.Speculation, seed: int
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt_text=prompt,
        chat=chat,
        sampling=pb.SamplingParams(temperature=temperature, seed=seed),
        max_new_tokens=max_new_tokens,
        speculation=speculation,
        trace_speculation=True,  # the acceptance trace a simulation can replay
    )


async def _send(
    stub: pb_grpc.GenerationStub, request: pb.GenerateRequest, record: RequestRecord, start: float, metadata=()
) -> None:
    clock = StreamClock(record, start)
    try:
        async for chunk in stub.Generate(request, metadata=metadata):
            record.request_id = record.request_id or chunk.request_id
            clock.tokens_arrived(len(chunk.token_ids))
            if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                _record_last_chunk(record, chunk)
    except grpc.aio.AioRpcError as e:
        record.error = e.code().name
    clock.ended()


def _record_last_chunk(record: RequestRecord, chunk: pb.GenerateResponse) -> None:
    record.finish_reason = pb.FinishReason.Name(chunk.finish_reason)
    record.prompt_tokens = chunk.usage.prompt_tokens
    record.completion_tokens = chunk.usage.completion_tokens
    record.rounds = [(r.k, r.proposed, r.accepted) for r in chunk.speculation.rounds]
    record.proposed_tokens = chunk.speculation.proposed_tokens
    record.accepted_tokens = chunk.speculation.accepted_tokens
    record.server_timings = {
        "queue_ms": chunk.timings.queue_ms,
        "ttft_ms": chunk.timings.time_to_first_token_ms,
        "e2e_ms": chunk.timings.e2e_ms,
    }


async def run_benchmark(
    target: str,
    prompts: list[str],
    rate: float,
    num_requests: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    chat: bool = False,
    speculation: str = "auto",
    seed: int = 0,
    burstiness: float = 1.0,
    progress: bool = True,
    how: Dial = Dial(),
    endpoint: str = "grpc",
) -> dict:
    spec = parse_speculation(speculation)
    offsets = arrival_times(num_requests, rate, burstiness, seed)
    chosen = prompt_order(prompts, num_requests, seed)
    records = [RequestRecord(index=i, prompt_chars=len(p)) for i, p in enumerate(chosen)]
    bar = tqdm(total=num_requests, desc="bench", unit="req", disable=not progress)

    async def one(send, i: int, start: float) -> None:
        sampling_seed = (seed * num_requests + i) % 2**64  # reproducible sampling, distinct per request
        request = build_request(chosen[i], max_new_tokens, temperature, chat, spec, sampling_seed)
        await send(request, records[i], start)
        bar.update(1)

    async def schedule(send) -> None:
        start = time.perf_counter()
        tasks = []
        for i, offset in enumerate(offsets):
            # Sleep to an absolute time so that time spent sending does not skew the schedule.
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            tasks.append(asyncio.create_task(one(send, i, start)))
        await asyncio.gather(*tasks)

    if endpoint == "openai":
        async with OpenAITarget(target, how) as http:
            await schedule(http.send)
    else:
        async with how.aio_channel(target) as channel:
            stub = pb_grpc.GenerationStub(channel)
            await schedule(lambda request, record, start: _send(stub, request, record, start, how.metadata))
    bar.close()
    ends = [r.send_s + r.e2e_ms / 1e3 for r in records]
    config = {
        "target": target,
        "endpoint": endpoint,
        "rate": rate if math.isfinite(rate) else "inf",
        "num_requests": num_requests,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "chat": chat,
        "speculation": speculation,
        "seed": seed,
        "burstiness": burstiness,
        "num_prompts": len(prompts),
    }
    return {
        "config": config,
        "summary": summarize(records, max(ends) - min(r.send_s for r in records)),
        "requests": [asdict(r) for r in records],
    }


def run(args: argparse.Namespace) -> int:
    """One load run; the sweep flags are `smartspec.sweep.run`'s."""
    result = asyncio.run(
        run_benchmark(
            target=args.target,
            prompts=load_prompts(args.prompts),
            rate=args.rate,
            num_requests=args.num_requests,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            chat=args.chat,
            speculation=args.speculation,
            seed=args.seed,
            burstiness=args.burstiness,
            progress=not args.no_progress,
            how=dial.from_args(args),
            endpoint=args.endpoint,
        )
    )
    print(format_table(result["summary"]))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    plots.latencies(result["requests"], output.with_suffix(".png"))
    print(f"wrote {output} and {output.with_suffix('.png')}")
    return 0 if result["summary"]["errors"] == 0 else 1

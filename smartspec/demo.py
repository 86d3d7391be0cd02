"""A side-by-side look at speculation: each prompt with speculation off, then on.

    python -m smartspec.demo --target 127.0.0.1:50051 [--k 4] [--max-new-tokens 96]

Prints one row per prompt (latency and time per token, draft acceptance, and
whether both runs produced the same greedy text, as they must).
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc

from protocol.v1 import generation_pb2 as pb
from protocol.v1 import generation_pb2_grpc as pb_grpc

PROMPTS = [  # input-grounded and code prompts, where earlier text predicts later text
    (
        "rewrite",
        "Rewrite the following sentence in the past tense, keeping every other word:\n"
        "The engineer opens the dashboard, checks the latency of every request, and writes a short "
        "note about the cache.\n",
    ),
    ("code", "def mean(values):\n    return sum(values) / len(values)\n\n\ndef variance(values):\n"),
    ("list", "Continue the list: Monday, Tuesday, Wednesday,"),
    ("chat", "Explain in two sentences what a KV cache is."),
]


def run_once(stub, text: str, chat: bool, k: int, max_new_tokens: int) -> dict:
    mode = pb.Speculation(mode=pb.SPECULATION_MODE_FIXED, k=k) if k else pb.Speculation(mode=pb.SPECULATION_MODE_OFF)
    start = time.perf_counter()
    chunks = list(
        stub.Generate(
            pb.GenerateRequest(prompt_text=text, chat=chat, max_new_tokens=max_new_tokens, speculation=mode),
            timeout=600,
        )
    )
    seconds = time.perf_counter() - start
    last = chunks[-1]
    return {
        "text": "".join(c.text for c in chunks),
        "seconds": seconds,
        "tokens": last.usage.completion_tokens,
        "proposed": last.speculation.proposed_tokens,
        "accepted": last.speculation.accepted_tokens,
        "per_step": last.speculation.mean_accepted_length,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="127.0.0.1:50051")
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step when speculating")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args(argv)
    print(
        f"{'prompt':8} {'tokens':>6} {'off: s':>7} {'ms/tok':>7} {'on: s':>7} {'ms/tok':>7} {'speedup':>7} "
        f"{'accepted':>10} {'tok/step':>8}  same text"
    )
    ok = True
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for name, text in PROMPTS:
            chat = name == "chat"
            off = run_once(stub, text, chat, 0, args.max_new_tokens)
            on = run_once(stub, text, chat, args.k, args.max_new_tokens)
            same = off["text"] == on["text"]
            ok &= same
            print(
                f"{name:8} {on['tokens']:>6} {off['seconds']:>7.2f} {1e3 * off['seconds'] / off['tokens']:>7.1f} "
                f"{on['seconds']:>7.2f} {1e3 * on['seconds'] / on['tokens']:>7.1f} "
                f"{off['seconds'] / on['seconds']:>6.2f}x {on['accepted']:>4}/{on['proposed']:<5} "
                f"{on['per_step']:>8.2f}  {'yes' if same else 'NO'}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Greedy acceptance of a draft model against SmolLM2-135M-Instruct.

For each held-out prompt the target (SmolLM2, float32) decodes greedily for
``--new-tokens`` tokens.  The draft is then run teacher-forced over prompt + target
continuation, giving at each position the draft's greedy proposal given the target's
prefix.  Because greedy verification accepts a draft token only when it equals the
target's token, a proposal chain that is still being accepted always has the target's
prefix, so this reproduces speculative decoding exactly:

* ``a`` = P(draft argmax == target argmax | target prefix), the per-token acceptance
  rate in tested-tokens counting (accepted / (accepted + rejections));
* for k = 1..5, a simulated run of speculative decoding over the continuation: drafts
  accepted while equal to the target's tokens, +1 bonus/corrected token per step; it
  reports mean tokens per step, accepted/proposed, and accepted/tested.

Code prompts are the first lines of functions from the held-out stdlib files (those
``train_draft`` never trains on); chat prompts use SmolLM2's chat template.

The draft proposes as it is served: over its head vocabulary when it has one
(``proposer_svc/head_vocab.py``); ``acceptance_a_full_vocab`` is the same over the
whole vocabulary, and ``head_vocab_coverage`` the share of target tokens inside it.

    python -m training.eval_draft --draft drafting/models/smollm2-draft
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from drafting import head_vocab
from training.data import read, stdlib_files
from training.selfgen import functions

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for writing clean code.",
    "How do I read a file line by line in Python?",
]


def code_prompts(n: int, lines: int = 3) -> list[str]:
    """First `lines` lines of functions (>= 6 lines long) from held-out stdlib files, round-robin."""
    per_file = [[fn.head for fn in functions(read(f), lines)] for f in stdlib_files()[1]]
    out, i = [], 0
    while len(out) < n and any(i < len(p) for p in per_file):
        out.extend(p[i] for p in per_file if i < len(p))
        i += 1
    return out[:n]


def simulate(match: list[bool], k: int) -> dict:
    """Speculative decoding with proposal length k over one continuation (greedy verify)."""
    n, p = len(match), 0
    steps = emitted = accepted = proposed = tested = 0
    while p < n:
        j = 0
        while j < k and p + j < n and match[p + j]:
            j += 1
        proposed += min(k, n - p)
        accepted += j
        tested += j + (1 if (j < k and p + j < n) else 0)
        emitted += min(j + 1, n - p)
        p += j + 1
        steps += 1
    return {"steps": steps, "emitted": emitted, "accepted": accepted, "proposed": proposed, "tested": tested}


def evaluate(
    target, draft, tok, prompts: list[str], new_tokens: int, chat: bool, head: list[int] | None = None
) -> dict:
    matches, full_matches, covered = [], [], 0
    head_ids = None if head is None else torch.tensor(head)
    for i, text in enumerate(prompts):
        if chat:
            ids = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tok(text).input_ids
        x = torch.tensor([list(ids)])
        with torch.inference_mode():
            out = target.generate(x, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            gen = out[0, x.shape[1] :]
            full = out[:, : x.shape[1] + len(gen)]
            logits = draft(full).logits[0, x.shape[1] - 1 : x.shape[1] - 1 + len(gen)]
        full_matches.append((logits.argmax(-1) == gen).tolist())
        if head_ids is None:
            m = full_matches[-1]
        else:
            m = (head_ids[logits[:, head_ids].argmax(-1)] == gen).tolist()
            covered += int(torch.isin(gen, head_ids).sum())
        matches.append(m)
        print(f"  [{i + 1}/{len(prompts)}] agree {sum(m)}/{len(m)}  {text.splitlines()[0][:60]!r}", flush=True)
    total = sum(len(m) for m in matches)
    a = sum(sum(m) for m in matches) / max(1, total)
    res = {
        "prompts": len(prompts),
        "target_tokens": total,
        "acceptance_a": a,
        "acceptance_a_full_vocab": sum(sum(m) for m in full_matches) / max(1, total),
        "head_vocab_coverage": covered / max(1, total) if head is not None else None,
        "per_prompt": [sum(m) / max(1, len(m)) for m in matches],
        "k": {},
    }
    for k in range(1, 6):
        agg = {"steps": 0, "emitted": 0, "accepted": 0, "proposed": 0, "tested": 0}
        for m in matches:
            for key, v in simulate(m, k).items():
                agg[key] += v
        res["k"][k] = {
            "tokens_per_step": agg["emitted"] / agg["steps"],
            "accepted_per_proposed": agg["accepted"] / agg["proposed"],
            "accepted_per_tested": agg["accepted"] / agg["tested"],
            "predicted_E_from_a": (k + 1) if a == 1 else (1 - a ** (k + 1)) / (1 - a),
        }
    return res


def table(name: str, r: dict) -> str:
    head = (
        ""
        if r.get("head_vocab_coverage") is None
        else f" over the head vocabulary ({r['head_vocab_coverage']:.1%} of the target's tokens are in it; "
        f"{r['acceptance_a_full_vocab']:.3f} over the whole vocabulary)"
    )
    lines = [
        f"**{name}**: {r['prompts']} prompts, {r['target_tokens']} target tokens, "
        f"per-token acceptance a = **{r['acceptance_a']:.3f}**{head}",
        "",
        "| k | tokens/step (simulated) | (1-a^(k+1))/(1-a) | accepted/tested | accepted/proposed |",
        "|---|---|---|---|---|",
    ]
    for k, v in r["k"].items():
        lines.append(
            f"| {k} | {v['tokens_per_step']:.3f} | {v['predicted_E_from_a']:.3f} | "
            f"{v['accepted_per_tested']:.3f} | {v['accepted_per_proposed']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draft", default="drafting/models/smollm2-draft")
    ap.add_argument("--num-prompts", type=int, default=20)
    ap.add_argument("--num-chat-prompts", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--full-head", action="store_true", help="ignore the draft's head_vocab.json")
    ap.add_argument("--json", default=None, help="default: <draft>/acceptance.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from runtime.models import load_model, load_tokenizer

    t0 = time.time()
    tok = load_tokenizer("smollm2")
    target = load_model("smollm2")
    draft = load_model(args.draft)
    head = None if args.full_head else head_vocab.load(args.draft)
    results = {
        "draft": args.draft,
        "new_tokens": args.new_tokens,
        "target": "smollm2 (float32)",
        "head_vocab_size": None if head is None else len(head),
    }
    print("code prompts (held-out stdlib functions):", flush=True)
    results["code"] = evaluate(
        target, draft, tok, code_prompts(args.num_prompts), args.new_tokens, chat=False, head=head
    )
    if args.num_chat_prompts:
        print("chat prompts:", flush=True)
        results["chat"] = evaluate(
            target, draft, tok, CHAT_PROMPTS[: args.num_chat_prompts], args.new_tokens, chat=True, head=head
        )
    results["seconds"] = time.time() - t0
    md = table("Code (held-out stdlib functions)", results["code"])
    if "chat" in results:
        md += "\n\n" + table("Chat (SmolLM2 chat template)", results["chat"])
    print("\n" + md)
    results["markdown"] = md
    path = args.json or os.path.join(args.draft, "acceptance.json")
    with open(path, "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

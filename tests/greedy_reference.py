"""Checks a greedy continuation against Hugging Face, tolerating only proven near-ties."""

from __future__ import annotations

import copy

import torch

NEAR_TIE = 1e-3

# Prompts of different lengths and kinds for greedy comparisons.
PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "Write a haiku about the sea.\n",
    "import os\nimport sys\n\ndef main():\n    args = sys.argv[1:]\n",
    "Q: What is 17 times 3?\nA:",
    "Once upon a time, in a kingdom far away, there lived a princess who loved to read books about dragons.",
    "List three prime numbers:",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> list[int]:
    """The target's own greedy continuation (`generate` stops at EOS; past it, plain argmax steps)."""
    if ignore_eos:
        ids = list(prompt_ids)
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt_ids) :]
    config = copy.deepcopy(model.generation_config)
    config.pad_token_id = config.eos_token_id
    config.max_new_tokens, config.max_length, config.do_sample = max_new_tokens, None, False
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            generation_config=config,
        )
    return out[0, len(prompt_ids) :].tolist()


def assert_same_greedy(model, prompt_ids: list[int], ours: list[int], theirs: list[int]) -> None:
    """Equal token for token, or the first difference is a near-tie of the reference.

    At a divergence the reference logits over the shared prefix must have a
    top-2 gap below NEAR_TIE with both candidates being the top two; after it
    the continuations legitimately differ.
    """
    for t, (a, b) in enumerate(zip(ours, theirs)):
        if a == b:
            continue
        with torch.inference_mode():
            logits = model(torch.tensor([prompt_ids + theirs[:t]])).logits[0, -1].float()
        top = torch.topk(logits, 2)
        gap = float(top.values[0] - top.values[1])
        assert set(top.indices.tolist()) == {a, b} and gap < NEAR_TIE, (
            f"token {t} differs: ours {a}, reference {b}; reference top-2 {top.indices.tolist()} "
            f"gap {gap:.2e} is no near-tie"
        )
        return
    assert len(ours) == len(theirs), f"lengths differ: ours {len(ours)}, reference {len(theirs)}"


# Prompts the built-in model continues with repeats (code, lists, echoes) and without: the
# local stack's end-to-end tests drive these, so drafts are both accepted and rejected.
STACK_PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "Rewrite in capitals: the quick brown fox jumps over the lazy dog.\nTHE QUICK",
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "import os\nimport sys\n\ndef main():\n    args = sys.argv[1:]\n",
    "The capital of France is",
    "Repeat after me: red green blue, red green blue, red",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Q: What is 17 times 3?\nA:",
]

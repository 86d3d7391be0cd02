"""Prompts for the load generator: a small built-in set, or a ShareGPT-style file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_PASSAGE_SPECULATION = (
    "Speculative decoding runs a small draft model ahead of a large target model. "
    "The draft proposes several tokens, and the target checks them all in a single "
    "forward pass, keeping the longest prefix it agrees with. When the draft guesses "
    "well, several tokens come out of one expensive step; when it guesses badly, the "
    "extra work is wasted and latency can get worse than plain decoding."
)
_PASSAGE_LIGHTHOUSE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying "
    "a can of oil and a rag. For forty years the lamp had never failed, even on the "
    "night of the great storm, when waves broke over the gallery and the glass shook "
    "in its frame. Ships passing the headland still dip their flags to the tower, "
    "though the light has been automatic for a decade."
)
_PASSAGE_MEETING = (
    "hi all - quick update. the migration to the new database slipped again bc the "
    "vendor hasn't sent the licence keys. we think next tuesday is realistic but "
    "honestly no promises. in the meantime pls dont run the nightly reports by hand, "
    "they lock the tables and the backup fails. thx, sam"
)

# Chat questions, code completions and passage rewrites: they differ in how
# predictable the output is, which is what decides whether speculation pays.
BUILTIN_PROMPTS: list[str] = [
    # Chat questions.
    "What is the capital of Australia, and why is it not Sydney?",
    "Explain the difference between a process and a thread in simple terms.",
    "Give me three tips for getting better sleep.",
    "Why is the sky blue? Answer in two sentences.",
    "What are the main causes of inflation?",
    "Write a haiku about autumn rain.",
    "How does a hash table handle collisions?",
    "List the planets of the solar system in order from the Sun.",
    # Code completions.
    "def fibonacci(n):",
    'def is_prime(n: int) -> bool:\n    """Return True if n is a prime number."""\n',
    'def quicksort(items):\n    """Sort a list with quicksort and return a new list."""\n',
    'class Stack:\n    """A last-in, first-out stack backed by a Python list."""\n\n    def __init__(self):\n',
    'import json\n\ndef load_config(path):\n    """Read a JSON config file and return a dict."""\n',
    "// Returns the sum of an array of numbers.\nfunction sum(values) {",
    "SELECT customer_id, COUNT(*) AS orders\nFROM orders\n",
    "def binary_search(sorted_items, target):",
    # Rewrites and summaries of a given passage.
    f"Summarise the following passage in one sentence.\n\n{_PASSAGE_SPECULATION}",
    f"Rewrite the following passage for a ten-year-old.\n\n{_PASSAGE_SPECULATION}",
    f"Summarise the following story in three bullet points.\n\n{_PASSAGE_LIGHTHOUSE}",
    f"Rewrite the following story in the present tense.\n\n{_PASSAGE_LIGHTHOUSE}",
    f"Translate the following story into French.\n\n{_PASSAGE_LIGHTHOUSE}",
    f"Rewrite this message as a polite, well-formatted email.\n\n{_PASSAGE_MEETING}",
    f"Summarise this message in one line for a status report.\n\n{_PASSAGE_MEETING}",
    f"Fix the spelling, grammar and capitalisation of this message.\n\n{_PASSAGE_MEETING}",
]

_PASSAGE_BRIDGE = (
    "The old stone bridge across the river was built by hand over seven summers. Each block "
    "was cut in the quarry on the hill, dragged down on sledges, and set without mortar. "
    "Floods have swept away two wooden bridges upstream since then, but the stone arch has "
    "stood through every one of them, and carts still cross it on market days."
)
_PASSAGE_GARDEN = (
    "Every spring the community garden opens its gates on the first warm Saturday. Volunteers "
    "turn the soil, mend the fences and plant rows of beans, carrots and lettuce. Children "
    "water the seedlings with small green cans, and by midsummer the beds are so full that "
    "the extra vegetables are given away at the gate to anyone who passes."
)
_PASSAGE_TRAIN = (
    "The night train left the city a few minutes after ten. Most passengers were asleep before "
    "the lights of the suburbs had faded, but an old man in the dining car sat by the window "
    "with a cup of tea, watching the dark fields go by. At dawn the train reached the coast, "
    "and he was the first to step down onto the empty platform."
)


def _typos(text: str) -> str:
    """A few misspellings for a copy-editing task: swap two letters in every ninth word."""
    words = text.split(" ")
    for i in range(4, len(words), 9):
        w = words[i]
        if len(w) > 4 and w.isalpha():
            words[i] = w[:2] + w[3] + w[2] + w[4:]
    return " ".join(words)


# Input-grounded tasks: the answer mostly restates a passage given in the prompt,
# which is where n-gram prompt lookup drafts well.
GROUNDED_PROMPTS: list[str] = [
    *(
        f"Correct the spelling mistakes in the following passage and write out the corrected passage.\n\n{_typos(p)}"
        for p in (_PASSAGE_LIGHTHOUSE, _PASSAGE_BRIDGE, _PASSAGE_GARDEN, _PASSAGE_TRAIN)
    ),
    *(
        f"Rewrite the following story in the present tense.\n\n{p}"
        for p in (_PASSAGE_LIGHTHOUSE, _PASSAGE_BRIDGE, _PASSAGE_GARDEN, _PASSAGE_TRAIN)
    ),
    f"Summarise the following passage in one sentence.\n\n{_PASSAGE_SPECULATION}",
    f"Fix the spelling, grammar and capitalisation of this message.\n\n{_PASSAGE_MEETING}",
]

PROMPT_SETS = {"builtin": BUILTIN_PROMPTS, "grounded": GROUNDED_PROMPTS}

_HUMAN_ROLES = ("human", "user")


def load_prompts(path: str | None) -> list[str]:
    """Return a built-in set (None or 'builtin', 'grounded'), or the prompts of a JSON file.

    The file is a list whose items are prompt strings, objects with a "prompt"
    key, or ShareGPT conversations (the first human turn is the prompt).
    ShareGPT items without a human turn are skipped, because real dumps hold many.
    """
    if path is None or path in PROMPT_SETS:
        return list(PROMPT_SETS[path or "builtin"])
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of prompts, got {type(data).__name__}")
    prompts = []
    for index, item in enumerate(data):
        prompt = _prompt_of(item, f"{path}: item {index}")
        if prompt and prompt.strip():
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no non-empty prompts found")
    return prompts


def _prompt_of(item: Any, where: str) -> str | None:
    if isinstance(item, str):
        return item
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a string or an object, got {type(item).__name__}")
    if "prompt" in item:
        if not isinstance(item["prompt"], str):
            raise ValueError(f'{where}: "prompt" must be a string')
        return item["prompt"]
    if "conversations" in item:
        return _first_human_turn(item["conversations"], where)
    raise ValueError(f'{where}: object has neither "prompt" nor "conversations"')


def _first_human_turn(conversations: Any, where: str) -> str | None:
    if not isinstance(conversations, list):
        raise ValueError(f'{where}: "conversations" must be a list')
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f'{where}: each turn must be an object with a string "value"')
        if turn.get("from") in _HUMAN_ROLES:
            return turn["value"]
    return None

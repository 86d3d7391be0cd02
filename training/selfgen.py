"""Prompts and SmolLM2's own greedy continuations, as training text for the draft model.

A draft is accepted when it predicts what the *target* writes, so the most useful text to
distil from is the target's own output on requests like those it serves. The prompts come
from the training half of the standard library only (``stdlib_files()[0]``; the held-out
files stay for ``eval_draft``): code completions (the first lines of a function) and
chat-templated requests built from a function and its docstring (write it, explain it,
summarise or rewrite the docstring). ``generate`` decodes them greedily in batches and
``pack`` joins prompt + continuation sequences into fixed windows for the teacher phase.
"""

from __future__ import annotations

import ast
import random
import textwrap
import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Function:
    name: str
    head: str  # the first lines of the definition, dedented
    source: str  # up to the first 12 lines, dedented
    doc: str  # first paragraph of the docstring ("" if none)


def functions(src: str, lines: int = 3) -> list[Function]:
    """Functions of at least 6 lines in one source file, in file order (empty if it does not parse)."""
    try:
        tree = ast.parse(src)
    except SyntaxError:
        return []
    srclines = src.splitlines()
    nodes = sorted(
        (
            n
            for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= 6
        ),
        key=lambda n: n.lineno,
    )
    out = []
    for n in nodes:
        head = textwrap.dedent("\n".join(srclines[n.lineno - 1 : n.lineno - 1 + lines])) + "\n"
        source = textwrap.dedent("\n".join(srclines[n.lineno - 1 : min(n.end_lineno, n.lineno + 11)])) + "\n"
        doc = (ast.get_docstring(n) or "").split("\n\n")[0].strip()
        out.append(Function(n.name, head, source, " ".join(doc.split())))
    return out


def chat_request(fn: Function, rng: random.Random) -> str | None:
    """One user request about `fn`, of a kind picked by `rng`; None when the kind needs a docstring it lacks."""
    kind = rng.randrange(4)
    if kind == 0:
        return f"Explain what this Python function does.\n\n```python\n{fn.source}```"
    if len(fn.doc) < 40:
        return None
    if kind == 1:
        return f"Write a Python function `{fn.name}`. It should do this: {fn.doc}"
    if kind == 2:
        return f"Summarise in one sentence: {fn.doc}"
    return f"Rewrite the following text in plain words.\n\n{fn.doc}"


def prompts(tok, sources: list[str], seed: int) -> list[list[int]]:
    """Token ids of one code completion per function and a chat request for about half of them, shuffled."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    for src in sources:
        for fn in functions(src):
            out.append(tok(fn.head).input_ids)
            text = chat_request(fn, rng) if rng.random() < 0.5 else None
            if text is not None:
                out.append(
                    list(
                        tok.apply_chat_template(
                            [{"role": "user", "content": text}],
                            add_generation_prompt=True,
                            tokenize=True,
                            return_dict=False,
                        )
                    )
                )
    rng.shuffle(out)
    return out


def generate(model, tok, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations of one batch of prompts: prompt + continuation, cut after the first eos."""
    pad = tok.pad_token_id
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
        )
    seqs = []
    for p, row in zip(batch, out[:, width:].tolist()):
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id) + 1]
        seqs.append(p + row)
    return seqs


def batches(prompt_ids: list[list[int]], batch_size: int, max_prompt: int = 160) -> list[list[list[int]]]:
    """The decode order: prompts up to `max_prompt` tokens, sorted by length within blocks of
    8 batches (less padding)."""
    kept = [p for p in prompt_ids if len(p) <= max_prompt]
    out = []
    for start in range(0, len(kept), batch_size * 8):
        block = sorted(kept[start : start + batch_size * 8], key=len)
        out.extend(block[b : b + batch_size] for b in range(0, len(block), batch_size))
    return out


def generate_all(
    model,
    tok,
    prompt_ids: list[list[int]],
    new_tokens: int,
    batch_size: int,
    minutes: float,
    max_batches: int = 0,
    log=print,
) -> tuple[list[list[int]], int]:
    """Decode the batches in order until all (or `max_batches`) are done or `minutes` (0: no limit) run out.

    Returns the sequences and the number of batches decoded (pass it back as `max_batches` to repeat a run)."""
    order = batches(prompt_ids, batch_size)[: max_batches or None]
    seqs: list[list[int]] = []
    t0 = time.time()
    done = 0
    for batch in order:
        if minutes and time.time() - t0 > 60 * minutes:
            break
        seqs.extend(generate(model, tok, batch, new_tokens))
        done += 1
        if done % 8 == 0:
            log(
                f"generate: {done} batches, {len(seqs)} sequences, {sum(map(len, seqs))} tokens, "
                f"{time.time() - t0:.0f}s"
            )
    return seqs, done


def pack(seqs: list[list[int]], eos: int, seq_len: int) -> np.ndarray:
    """Concatenate sequences (eos between them, as the stdlib windows have between files) into seq_len windows."""
    flat: list[int] = []
    for s in seqs:
        flat.extend(s)
        if not s or s[-1] != eos:
            flat.append(eos)
    n = len(flat) // seq_len
    return np.asarray(flat[: n * seq_len], dtype=np.int64).reshape(n, seq_len)

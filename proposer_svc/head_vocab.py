"""A draft model's output layer over the tokens it can usefully propose.

A small draft spends most of its step in the output layer: the built-in draft has two
256-wide layers and a 49,152 x 256 unembedding, and at batch 1 the unembedding took 2.9 ms
of a 4.5 ms step on one core. Restricting the output layer to the most frequent tokens of
the text the draft was trained on (its "head vocabulary") makes that 0.4 ms at 8,192 tokens.

Verification stays lossless. A greedy draft is the argmax over the head vocabulary; the
target decides every token. A sampled draft returns its exact distribution, which is zero
outside the head vocabulary, and the rejection sampler's residual max(0, p - q) gives those
tokens their full target probability. What a smaller head can cost is acceptance: the
draft can no longer propose a rare token the target is about to write. The built-in
draft's card gives the measured acceptance with and without it.

The vocabulary lives next to the weights as `head_vocab.json`. Build it with

    python -m proposer_svc.head_vocab --cache-dir /tmp/smartspec-draft-cache --size 8192

from the caches that `proposer_svc.train_draft` writes (the standard-library windows of the
teacher phase and SmolLM2's own continuations of the generate phase).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np
import torch
from torch import nn

FILE = "head_vocab.json"


def most_frequent(counts: np.ndarray, size: int, always: list[int] = ()) -> list[int]:
    """The `size` most counted token ids (ties to the lower id) plus `always`, sorted ascending."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    order = np.argsort(-counts, kind="stable")
    return sorted({int(t) for t in order[:size]} | {int(t) for t in always})


def load(directory: str) -> list[int] | None:
    """The head vocabulary saved with a draft model, or None when the model has none."""
    path = os.path.join(directory, FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return list(json.load(fh)["token_ids"])


def restrict_head(model, token_ids: list[int]) -> torch.Tensor:
    """Replaces the model's output layer by its rows for `token_ids` (in place; the input
    embedding stays whole). Column j of the new logits is token token_ids[j]; returns the ids
    as a tensor to map columns back."""
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    ids = torch.tensor(token_ids, dtype=torch.long)
    if ids.numel() == 0 or len(set(token_ids)) != len(token_ids) or ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"head vocabulary must be distinct token ids in [0, {vocab}), got {len(token_ids)} ids")
    small = nn.Linear(head.in_features, len(token_ids), bias=head.bias is not None,
                      device=head.weight.device, dtype=head.weight.dtype)
    rows = ids.to(head.weight.device)
    with torch.no_grad():
        small.weight.copy_(head.weight[rows])
        if head.bias is not None:
            small.bias.copy_(head.bias[rows])
    small.requires_grad_(False)
    model.set_output_embeddings(small)
    model.config.tie_word_embeddings = False  # a later tie_weights() must not put the whole embedding back
    return ids


def count_tokens(cache_dir: str, seed: int, vocab: int) -> tuple[np.ndarray, list[str]]:
    """Token counts over the draft's training caches: stdlib windows (teacher shards) and selfgen windows."""
    counts = np.zeros(vocab, dtype=np.int64)
    sources = sorted(glob.glob(os.path.join(cache_dir, f"teacher_seed{seed}_k*_*.npz")))
    for path in sources:
        np.add.at(counts, np.load(path)["ids"].ravel(), 1)
    selfgen = os.path.join(cache_dir, f"selfgen_windows_seed{seed}.npy")
    if os.path.isfile(selfgen):
        np.add.at(counts, np.load(selfgen).ravel(), 1)
        sources.append(selfgen)
    if not sources:
        raise FileNotFoundError(f"no training caches in {cache_dir}: run proposer_svc.train_draft first")
    shards = len(sources) - os.path.isfile(selfgen)
    return counts, [f"{shards} teacher shards (stdlib windows)"] + ([os.path.basename(selfgen)] if shards < len(sources) else [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Writes a draft model's head vocabulary from its training caches.")
    ap.add_argument("--cache-dir", default="/tmp/smartspec-draft-cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--draft", default=os.path.join(os.path.dirname(__file__), "models", "smollm2-draft"))
    args = ap.parse_args(argv)
    from transformers import AutoConfig, AutoTokenizer

    vocab = AutoConfig.from_pretrained(args.draft).vocab_size
    tok = AutoTokenizer.from_pretrained(args.draft)
    counts, sources = count_tokens(args.cache_dir, args.seed, vocab)
    ids = most_frequent(counts, args.size, tok.all_special_ids)
    covered = counts[ids].sum() / counts.sum()
    out = {"size": len(ids), "counted_tokens": int(counts.sum()), "distinct_tokens": int((counts > 0).sum()),
           "coverage_of_counted": round(float(covered), 5), "sources": sources,
           "command": "python -m proposer_svc.head_vocab " + " ".join(argv if argv is not None else sys.argv[1:]),
           "token_ids": ids}
    path = os.path.join(args.draft, FILE)
    with open(path, "w") as fh:
        json.dump(out, fh, separators=(",", ":"))
    print(f"wrote {path}: {len(ids)} ids covering {covered:.4f} of {counts.sum()} counted tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Builds a draft model's head vocabulary (`drafting.head_vocab`) from its training caches.

    python -m training.head_vocab --cache-dir /tmp/smartspec-draft-cache --size 8192

reads the caches that `training.train_draft` writes (the standard-library windows of the
teacher phase and SmolLM2's own continuations of the generate phase) and writes
`head_vocab.json` next to the draft's weights.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

from drafting.builtin import builtin_draft_dir
from drafting.head_vocab import FILE


def most_frequent(counts: np.ndarray, size: int, always: list[int] = ()) -> list[int]:
    """The `size` most counted token ids (ties to the lower id) plus `always`, sorted ascending."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    order = np.argsort(-counts, kind="stable")
    return sorted({int(t) for t in order[:size]} | {int(t) for t in always})


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
        raise FileNotFoundError(f"no training caches in {cache_dir}: run training.train_draft first")
    shards = len(sources) - os.path.isfile(selfgen)
    return counts, [f"{shards} teacher shards (stdlib windows)"] + (
        [os.path.basename(selfgen)] if shards < len(sources) else []
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Writes a draft model's head vocabulary from its training caches.")
    ap.add_argument("--cache-dir", default="/tmp/smartspec-draft-cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--draft", default=builtin_draft_dir())
    args = ap.parse_args(argv)
    from transformers import AutoConfig, AutoTokenizer

    vocab = AutoConfig.from_pretrained(args.draft).vocab_size
    tok = AutoTokenizer.from_pretrained(args.draft)
    counts, sources = count_tokens(args.cache_dir, args.seed, vocab)
    ids = most_frequent(counts, args.size, tok.all_special_ids)
    covered = counts[ids].sum() / counts.sum()
    out = {
        "size": len(ids),
        "counted_tokens": int(counts.sum()),
        "distinct_tokens": int((counts > 0).sum()),
        "coverage_of_counted": round(float(covered), 5),
        "sources": sources,
        "command": "python -m training.head_vocab " + " ".join(argv if argv is not None else sys.argv[1:]),
        "token_ids": ids,
    }
    path = os.path.join(args.draft, FILE)
    with open(path, "w") as fh:
        json.dump(out, fh, separators=(",", ":"))
    print(f"wrote {path}: {len(ids)} ids covering {covered:.4f} of {counts.sum()} counted tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())

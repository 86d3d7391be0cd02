"""The draft's training text: the Python standard library's sources, cut into token windows.

Every 25th source file (sorted) is held out for evaluation; the training windows are
shuffled with the seed and cached.
"""

from __future__ import annotations

import glob
import os

import numpy as np

STDLIB = os.path.dirname(os.__file__)
SEQ_LEN = 256
HELDOUT_EVERY = 25  # every 25th stdlib file (sorted) is held out for evaluation
EXCLUDE = (
    "/test/",
    "/tests/",
    "/idlelib/",
    "/site-packages/",
    "/lib2to3/tests",
    "/turtledemo/",
    "/__phello__",
    "/encodings/",
)


def stdlib_files(root: str = STDLIB) -> tuple[list[str], list[str]]:
    """(train files, held-out files): sorted stdlib .py sources without tests and the like."""
    files = sorted(
        f
        for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
        if not any(x in f.replace(root, "/") for x in EXCLUDE)
    )
    held = [f for i, f in enumerate(files) if i % HELDOUT_EVERY == HELDOUT_EVERY // 2]
    train = [f for f in files if f not in set(held)]
    return train, held


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def build_windows(tok, files: list[str], seq_len: int = SEQ_LEN) -> np.ndarray:
    """Concatenate the files' tokens (eos between files) and cut into seq_len windows."""
    ids: list[int] = []
    for f in files:
        ids.extend(tok(read(f)).input_ids)
        ids.append(tok.eos_token_id)
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def train_windows(tok, seed: int, cache_dir: str) -> np.ndarray:
    """Training windows in the seeded order shared by all phases (cached as .npy)."""
    path = os.path.join(cache_dir, f"windows_seed{seed}.npy")
    if os.path.exists(path):
        return np.load(path)
    train, _ = stdlib_files()
    w = build_windows(tok, train)
    rng = np.random.default_rng(seed)
    w = w[rng.permutation(len(w))]
    os.makedirs(cache_dir, exist_ok=True)
    np.save(path, w)
    return w

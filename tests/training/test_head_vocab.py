"""Building a head vocabulary: choosing the tokens from a draft's training caches."""

from __future__ import annotations

import numpy as np
import pytest

from training import head_vocab


def test_most_frequent_takes_the_top_counts_plus_the_always_ids_sorted():
    counts = np.array([5, 0, 9, 9, 1, 7])
    assert head_vocab.most_frequent(counts, 3) == [2, 3, 5]  # counts 9, 9, 7
    assert head_vocab.most_frequent(counts, 4) == [0, 2, 3, 5]
    assert head_vocab.most_frequent(counts, 2, always=[1, 4]) == [1, 2, 3, 4]
    assert head_vocab.most_frequent(counts, 2, always=[3]) == [2, 3]  # no duplicates
    with pytest.raises(ValueError, match="size must be positive"):
        head_vocab.most_frequent(counts, 0)


def test_count_tokens_reads_both_training_caches(tmp_path):
    np.savez(tmp_path / "teacher_seed0_k16_00000.npz", ids=np.array([[1, 2, 2], [3, 3, 3]]))
    np.save(tmp_path / "selfgen_windows_seed0.npy", np.array([[4, 4, 3]]))
    counts, sources = head_vocab.count_tokens(str(tmp_path), 0, vocab=6)
    assert counts.tolist() == [0, 1, 2, 4, 2, 0]
    assert sources == ["1 teacher shards (stdlib windows)", "selfgen_windows_seed0.npy"]
    with pytest.raises(FileNotFoundError, match="run training.train_draft"):
        head_vocab.count_tokens(str(tmp_path / "empty"), 0, vocab=6)

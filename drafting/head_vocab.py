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

The vocabulary lives next to the weights as `head_vocab.json`; `training.head_vocab`
builds it from a draft's training text.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

FILE = "head_vocab.json"


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
    small = nn.Linear(
        head.in_features, len(token_ids), bias=head.bias is not None, device=head.weight.device, dtype=head.weight.dtype
    )
    rows = ids.to(head.weight.device)
    with torch.no_grad():
        small.weight.copy_(head.weight[rows])
        if head.bias is not None:
            small.bias.copy_(head.bias[rows])
    small.requires_grad_(False)
    model.set_output_embeddings(small)
    model.config.tie_word_embeddings = False  # a later tie_weights() must not put the whole embedding back
    return ids
